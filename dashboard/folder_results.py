"""The served folders' own results, for the Results tab: the `report.json` and
`routing_value.json` that `./scripts/demo.sh` (`python -m probes.report --json`, `python -m
probes.routing_value --json`) writes beside the trace, shown as a table of their headline
numbers with the whole JSON one click away. Only regular files inside a served trace's folder
are read (symlinks out are not followed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dash import dcc, html

from .common import Context, error_text, message
from .data import inside
from .jobs import no_paths

FILES = ("report.json", "routing_value.json")
MAX_ROWS = 40  # headline rows per file; the whole JSON is under "all of it"
MAX_JSON_CHARS = 200_000


def folders(ctx: Context) -> list[Path]:
    """The folders of the served traces, each once, in serving order."""
    seen: list[Path] = []
    for e in ctx.registry.entries.values():
        if e.path.parent not in seen:
            seen.append(e.path.parent)
    return seen


def scalar_rows(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(dotted key, value) of the numbers, strings and booleans of a JSON object, down to depth 2
    and without long lists: what a reader scans first."""
    rows: list[tuple[str, str]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (dict, list)) and depth < 2:
                rows += scalar_rows(v, key, depth + 1)
            elif isinstance(v, (int, float, str, bool)) or v is None:
                rows.append((key, f"{v:.4g}" if isinstance(v, float) else no_paths(str(v))[:80]))
    elif isinstance(obj, list) and len(obj) <= 8:
        for i, v in enumerate(obj):
            rows += scalar_rows(v, f"{prefix}[{i}]", depth + 1) if isinstance(v, dict) else \
                ([(f"{prefix}[{i}]", str(v)[:80])] if not isinstance(v, list) else [])
    return rows


def file_section(path: Path, name: str) -> html.Div:
    try:
        data = json.loads(path.read_text())
    except Exception as exc:  # one unreadable file is one line
        return message(f"{name}: {error_text(exc)}", "error")
    rows = scalar_rows(data)
    table = html.Table([html.Tr([html.Th("key"), html.Th("value")])]
                       + [html.Tr([html.Td(k, style={"textAlign": "left"}), html.Td(v)]) for k, v in rows[:MAX_ROWS]],
                       className="evidence")
    more = f" (first {MAX_ROWS} of {len(rows)} values)" if len(rows) > MAX_ROWS else ""
    text = no_paths(json.dumps(data, indent=1))  # a report names its trace by absolute path
    return html.Div([
        html.H3(f"{name}{more}"), table,
        html.Details([html.Summary("all of it (JSON)"),
                      dcc.Markdown(f"```json\n{text[:MAX_JSON_CHARS]}\n```")]),
    ], className="panel result", id=f"folder-result-{path.stem}")


def section(ctx: Context) -> list:
    """The served folders' report.json and routing_value.json, or nothing when there are none."""
    parts = []
    for folder in folders(ctx):
        for fname in FILES:
            path = folder / fname
            if inside(path, folder):
                parts.append(file_section(path, f"{folder.name}/{fname}"))
    if not parts:
        return []
    return [html.H2("Results in the served folders", style={"fontSize": "15px"})] + parts

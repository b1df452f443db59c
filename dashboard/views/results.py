"""View 10, results: what `python -m rsr_model evaluate` wrote (NAME.json and NAME.md) under the
results folder (`--results`, default runs/evaluate): the ablation table, class-conditioned
quality, planning figures and the scorer check. Each result gets its heading, its markdown
table, the evidence behind its differences (spread over seeds or checkpoints, the McNemar test)
and figures. The tab needs no trace; the files are re-read whenever it is opened.

Every number shown is in the JSON (or, for one run's overall score, comes from the table's own
`category_scores`); a file that is not valid JSON or lacks the keys of its kind is one line on
the tab, and the other results still render.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import dash
import plotly.graph_objects as go
from dash import Output, dcc, html
from plotly.subplots import make_subplots

from cli_common.errors import UserError

from .. import folder_results
from ..common import GRAPH_CONFIG, Context, View, error_text, expert_colour, message, view_body

MAKE_THEM = "python -m rsr_model evaluate --table --quick --out runs/evaluate"


class ResultError(UserError):
    """A result file the tab cannot show (not JSON, or not the shape its name promises)."""


# --- reading ----------------------------------------------------------------------------------

def rows_of(result: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The rows of a result as a list (class_conditioned keeps them in a dict by name)."""
    rows = result[key]
    if isinstance(rows, dict):
        return [{"name": name, **row} if isinstance(row, dict) else row for name, row in rows.items()]
    return list(rows)


def has(row: Any, dotted: str) -> bool:
    """Whether `row` holds the nested key `dotted` ("scores.overall.std")."""
    for key in dotted.split("."):
        if not isinstance(row, dict) or key not in row:
            return False
        row = row[key]
    return True


def load_result(path: Path, kind: "Kind") -> dict[str, Any]:
    """The parsed JSON of one result file, checked against its kind's keys; otherwise ResultError
    (its message says what is wrong; the caller names the file)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"not a readable JSON file ({exc})") from None
    if not isinstance(result, dict):
        raise ResultError(f"expected a JSON object, found {type(result).__name__}")
    missing = [k for k in kind.keys if k not in result]
    if missing:
        raise ResultError(f"lacks {', '.join(missing)} (not written by `{kind.command}`?)")
    rows = result[kind.rows]
    if not isinstance(rows, (list, dict)) or not rows:
        raise ResultError(f"'{kind.rows}' holds no rows")
    for i, row in enumerate(rows_of(result, kind.rows)):
        lacking = [k for k in kind.row_keys if not has(row, k)]
        if lacking:
            raise ResultError(f"row {i} of '{kind.rows}' lacks {', '.join(lacking)}")
    return result


def find_results(folder: Path) -> list[Path]:
    """NAME.json files of every known kind under `folder` (any depth, checkpoints/ skipped); only
    regular files: reading a FIFO or a device of that name would hang the tab."""
    found = [p for name in KINDS for p in folder.rglob(f"{name}.json")
             if "checkpoints" not in p.relative_to(folder).parts and p.is_file()]
    return sorted(found, key=lambda p: (list(KINDS).index(p.stem), str(p)))


# --- the ablation table -----------------------------------------------------------------------

def trained_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows without its base row (the figures draw the base as a reference instead)."""
    return [r for r in result["rows"] if r["mode"] != "base"]


def spread_note(seeds: list[int]) -> str:
    return "one training seed: no spread" if len(seeds) < 2 else f"error bars: std over training seeds {seeds}"


def table_overall_figure(result: dict[str, Any]) -> go.Figure:
    """Overall score per (target, mode), std over training seeds as error bars, the base as a line."""
    rows = trained_rows(result)
    overall = [r["scores"]["overall"] for r in rows]
    fig = go.Figure(go.Bar(x=[f"{r['target']} · {r['mode']}" for r in rows], y=[s["mean"] for s in overall],
                           error_y=dict(type="data", array=[s["std"] for s in overall], visible=True),
                           customdata=[len(r["seeds"]) for r in rows], marker_color=expert_colour(0),
                           hovertemplate="%{x}<br>overall %{y:.1f} ± %{error_y.array:.1f} %<br>%{customdata} "
                                         "seed(s)<extra></extra>"))
    fig.add_hline(y=100 * result["base_scores"]["overall"], line_dash="dash", line_color="#555",
                  annotation_text="base", annotation_position="top left")
    fig.update_layout(height=300, margin=dict(l=50, r=10, t=40, b=60), yaxis_title="overall score (%)",
                      title=dict(text=f"overall score per row ({spread_note(rows[0]['seeds'])})", font_size=12))
    return fig


def table_category_figure(result: dict[str, Any]) -> go.Figure:
    """Every category's score per row, with the same error bars."""
    from evaluation.table import COLUMNS

    fig = go.Figure()
    for i, row in enumerate(trained_rows(result)):
        scores = [row["scores"][c] for c in COLUMNS]
        fig.add_trace(go.Bar(x=list(COLUMNS.values()), y=[s["mean"] for s in scores], name=f"{row['target']} · "
                             f"{row['mode']}", marker_color=expert_colour(i),
                             error_y=dict(type="data", array=[s["std"] for s in scores], visible=True)))
    fig.add_trace(go.Scatter(x=list(COLUMNS.values()), y=[100 * result["base_scores"][c] for c in COLUMNS],
                             mode="markers", marker=dict(symbol="line-ew-open", size=18, color="#555"), name="base"))
    fig.update_layout(barmode="group", height=300, margin=dict(l=50, r=10, t=40, b=40), yaxis_title="score (%)",
                      legend_font_size=10, title=dict(text="score per category", font_size=12))
    return fig


def run_overall(run: dict[str, Any], plan: list[dict[str, Any]]) -> float:
    """One checkpoint's overall score (%), by the table's own category_scores."""
    from evaluation.prompts import PlannedImage
    from evaluation.table import category_scores

    return 100 * category_scores(run["correct"], [PlannedImage(**p) for p in plan])["overall"]


def specialization_figure(result: dict[str, Any]) -> go.Figure | None:
    """Quality beside specialization: each checkpoint's overall score against its routing value
    (with its 95% interval) and its normalised gate entropy. None when no row has a gate."""
    runs = [r for r in result["runs"] if "routing_value" in r.get("routing", {})]
    if not runs:
        return None
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=["routing value (95% interval)", "gate entropy / log K"])
    groups = list(dict.fromkeys((r["target"], r["mode"]) for r in runs))
    for i, (target, mode) in enumerate(groups):
        group = [r for r in runs if (r["target"], r["mode"]) == (target, mode)]
        score = [run_overall(r, result["plan"]) for r in group]
        value = [r["routing"]["routing_value"] for r in group]
        ci = [r["routing"].get("routing_value_ci95") or [v, v] for r, v in zip(group, value)]
        style = dict(mode="markers", marker=dict(size=9, color=expert_colour(i)), name=f"{target} · {mode}",
                     legendgroup=f"{target}{mode}", text=[r["name"] for r in group])
        interval = dict(type="data", array=[c[1] - v for c, v in zip(ci, value)],
                        arrayminus=[v - c[0] for c, v in zip(ci, value)])
        fig.add_trace(go.Scatter(x=value, y=score, error_x=interval,
                                 hovertemplate="%{text}<br>routing value %{x:.4f}<br>overall %{y:.1f} %<extra></extra>",
                                 **style), row=1, col=1)
        fig.add_trace(go.Scatter(x=[r["routing"].get("gate_entropy") for r in group], y=score, showlegend=False,
                                 hovertemplate="%{text}<br>H(gate)/log K %{x:.3f}<br>overall %{y:.1f} %<extra></extra>",
                                 **style), row=1, col=2)
    fig.add_vline(x=0, line_dash="dot", line_color="#999", row=1, col=1)
    fig.update_yaxes(title_text="overall score (%)", row=1, col=1)
    fig.update_layout(height=300, margin=dict(l=50, r=10, t=50, b=40), legend_font_size=10,
                      title=dict(text="quality beside specialization, one point per checkpoint", font_size=12))
    return fig


def table_figures(result: dict[str, Any]) -> list[go.Figure | str]:
    scatter = specialization_figure(result)
    return [table_overall_figure(result), table_category_figure(result),
            scatter if scatter is not None else "No row has a gate (routing figures exist only for rows with several "
                                                "experts), so there is no quality-beside-specialization plot."]


def table_evidence(result: dict[str, Any]) -> list[str]:
    from evaluation.table import paired_sentence

    lines = [paired_sentence(target, t) for target, t in result["rsr_vs_sft"].items()]
    if not lines:
        lines.append("No RSR vs SFT test: the table lacks one of the two rows for every target.")
    b = result["budget"]
    return lines + [f"Scores in %, mean ± std over training seeds {list(b.get('seeds', []))}; "
                    f"{b.get('images_per_category')} images per category; base {result.get('base', '')}."]


def table_markdown(result: dict[str, Any]) -> str:
    from evaluation.table import markdown

    return markdown(result, result)


# --- class-conditioned quality ----------------------------------------------------------------

def figure_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The numeric figures of class-conditioned rows (FD, sFD, IS, precision, recall, ...)."""
    return [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def class_conditioned_figure(result: dict[str, Any]) -> go.Figure:
    """Each figure per row: bar = mean over training seeds, dots = each seed."""
    rows = rows_of(result, "rows")
    keys = figure_keys(rows)
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=keys, horizontal_spacing=0.05)
    for col, key in enumerate(keys, start=1):
        fig.add_trace(go.Bar(x=[r["name"] for r in rows], y=[r.get(key) for r in rows], showlegend=False,
                             marker_color=[expert_colour(i) for i in range(len(rows))]), row=1, col=col)
        seeds = [(r["name"], run) for r in rows for run in r.get("runs", [])]
        fig.add_trace(go.Scatter(x=[name for name, _ in seeds], y=[run.get(key) for _, run in seeds], mode="markers",
                                 marker=dict(color="#222", size=6), name="each training seed", showlegend=col == 1,
                                 text=[f"seed {run.get('seed')}" for _, run in seeds]), row=1, col=col)
    fig.update_xaxes(tickangle=45, tickfont_size=9)
    fig.update_layout(height=360, margin=dict(l=40, r=10, t=50, b=120), legend_font_size=10,
                      title=dict(text="bars: mean over training seeds; dots: each seed", font_size=12))
    return fig


def class_conditioned_evidence(result: dict[str, Any]) -> list[str]:
    b = result["budget"]
    return [f"Means over training seeds {list(b.get('seeds', []))} (± std in the table where there are several); "
            "no test between rows: judge a difference by the per-seed dots and the spread.",
            f"{result['samples']} samples per row; feature classifier test accuracy "
            f"{100 * result['classifier_test_accuracy']:.1f} %. 'real test split' (297 images) is a reference, not a "
            f"floor: FD is biased upward on small sets."]


def class_conditioned_markdown(result: dict[str, Any]) -> str:
    from evaluation.digits_quality import markdown

    return markdown(result)


# --- planning ---------------------------------------------------------------------------------

def planning_figure(result: dict[str, Any]) -> go.Figure:
    """Success, action and frame accuracy per (map size, training steps, mode), std over
    checkpoints as error bars."""
    from evaluation.planning import FIGURES, budget_label

    fig = make_subplots(rows=1, cols=len(FIGURES), subplot_titles=list(FIGURES.values()), shared_yaxes=True)
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    for col, key in enumerate(FIGURES, start=1):
        for i, mode in enumerate(modes):
            rows = [r for r in result["rows"] if r["mode"] == mode]
            fig.add_trace(go.Bar(x=[budget_label(r) for r in rows], y=[r[key]["mean"] for r in rows], name=mode,
                                 legendgroup=mode, showlegend=col == 1, marker_color=expert_colour(i),
                                 customdata=[r["checkpoints"] for r in rows],
                                 error_y=dict(type="data", array=[r[key]["std"] for r in rows], visible=True),
                                 hovertemplate="%{x} " + mode + "<br>%{y:.3f} ± %{error_y.array:.3f}<br>"
                                               "%{customdata} checkpoint(s)<extra></extra>"), row=1, col=col)
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(barmode="group", height=300, margin=dict(l=40, r=10, t=50, b=40),
                      title=dict(text="mean ± std over the checkpoints of a row", font_size=12))
    return fig


def planning_evidence(result: dict[str, Any]) -> list[str]:
    from evaluation.planning import budget_label, paired_sentence

    counts = ", ".join(f"{budget_label(r)} {r['mode']}: {r['checkpoints']}" for r in result["rows"])
    tests = [paired_sentence(group, t) for group, t in result.get("rsr_vs_shared", {}).items()]
    return [f"Checkpoints per row: {counts}; {result['maps']} held-out maps per checkpoint.",
            *(tests or ["No map size and budget has RSR and the shared module with the same seeds: no paired test; "
                        "a difference counts only beyond the error bars."])]


def planning_markdown(result: dict[str, Any]) -> str:
    from evaluation.planning import markdown

    return markdown(result)


# --- scorer check -----------------------------------------------------------------------------

def scorer_check_figure(result: dict[str, Any]) -> go.Figure:
    """Accuracy on rendered ground truth (clean and blurred/noisy) and the worst rejection of an
    altered scene, per category and resolution."""
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, subplot_titles=["accuracy", "accuracy, blurred + noisy",
                                                                           "worst rejection of an alteration"])
    for i, resolution in enumerate(result["resolutions"]):
        cells = {key.split("/")[1]: c for key, c in result["cells"].items() if key.split("/")[0] == str(resolution)}
        values = [[c["accuracy"] for c in cells.values()], [c["noisy_accuracy"] for c in cells.values()],
                  [min(c["rejection"].values(), default=None) for c in cells.values()]]
        for col, y in enumerate(values, start=1):
            fig.add_trace(go.Bar(x=list(cells), y=[100 * v if v is not None else None for v in y],
                                 name=f"{resolution} px", legendgroup=str(resolution), showlegend=col == 1,
                                 marker_color=expert_colour(i)), row=1, col=col)
    fig.add_hline(y=100 * result["target"], line_dash="dash", line_color="#555", annotation_text="target")
    fig.update_yaxes(title_text="%", row=1, col=1)
    fig.update_layout(barmode="group", height=300, margin=dict(l=40, r=10, t=50, b=60),
                      title=dict(text=f"{result['scenes']} scenes per (resolution, category) cell", font_size=12))
    return fig


def scorer_check_evidence(result: dict[str, Any]) -> list[str]:
    verdict = "meets" if result["passed"] else "misses"
    return [f"Worst accuracy {100 * result['worst_accuracy']:.1f} %, worst rejection "
            f"{100 * result['worst_rejection']:.1f} % over {result['scenes']} scenes per cell: {verdict} the "
            f"{100 * result['target']:.0f} % target."]


def scorer_check_markdown(result: dict[str, Any]) -> str:
    from evaluation.check import check_table

    return check_table(result)


# --- the shifted task and its controls (evaluate --shift) --------------------------------------

def shift_figure(result: dict[str, Any]) -> go.Figure:
    """Held-out loss of every (row, seed) with the frozen base as a line; the gated rows' routing value."""
    from evaluation.shift import ROWS

    fig = make_subplots(rows=1, cols=2, subplot_titles=["held-out loss", "routing value, all steps (95% interval)"])
    for i, row in enumerate(ROWS):
        runs = [r for r in result["runs"] if r["row"] == row]
        style = dict(mode="markers", marker=dict(size=9, color=expert_colour(i)), legendgroup=row,
                     text=[f"seed {r['seed']}" for r in runs])
        fig.add_trace(go.Scatter(x=[row] * len(runs), y=[r["loss"] for r in runs], name=row, **style), row=1, col=1)
        if runs and all("value" in r for r in runs):
            interval = dict(type="data", array=[r["value_ci95"][1] - r["value"] for r in runs],
                            arrayminus=[r["value"] - r["value_ci95"][0] for r in runs])
            fig.add_trace(go.Scatter(x=[row] * len(runs), y=[r["value"] for r in runs], error_y=interval,
                                     showlegend=False, **style), row=1, col=2)
    fig.add_hline(y=result["base_loss"], line_dash="dash", line_color="#555", annotation_text="frozen base",
                  row=1, col=1)
    fig.add_hline(y=0, line_dash="dot", line_color="#999", row=1, col=2)
    fig.update_layout(height=300, margin=dict(l=50, r=10, t=50, b=40), legend_font_size=10,
                      title=dict(text="one point per training seed", font_size=12))
    return fig


def shift_evidence(result: dict[str, Any]) -> list[str]:
    words = {None: "not measured", True: "met", False: "not met"}
    return [f"{t['figure']} ({t['target']}): {'; '.join(t['per_seed'])}: {words[t['met']]}." for t in result["targets"]]


def shift_markdown(result: dict[str, Any]) -> str:
    from evaluation.shift import markdown

    return markdown(result)


# --- kinds and the page -----------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """One kind of result file: what it must hold, and how it is shown."""

    title: str
    command: str  # the command that writes it
    keys: tuple[str, ...]  # top-level keys it must have
    rows: str  # the key of its rows
    row_keys: tuple[str, ...]  # keys every row must have ("a.b": key b inside a)
    figures: Callable[[dict[str, Any]], list[go.Figure | str]]
    evidence: Callable[[dict[str, Any]], list[str]]
    markdown: Callable[[dict[str, Any]], str]  # the table from the JSON, when NAME.md is missing


KINDS = {
    "table": Kind("Ablation table (Table 3 in small)", "python -m rsr_model evaluate --table",
                  ("rows", "rsr_vs_sft", "base_scores", "budget", "seconds", "runs", "plan"), "rows",
                  ("target", "mode", "seeds", "scores.overall.mean", "scores.overall.std", "routing"),
                  table_figures, table_evidence, table_markdown),
    "class_conditioned": Kind("Class-conditioned quality (Table 1 in small)",
                              "python -m rsr_model evaluate --class-conditioned",
                              ("rows", "budget", "samples", "classifier_test_accuracy"), "rows", ("fd",),
                              lambda r: [class_conditioned_figure(r)], class_conditioned_evidence,
                              class_conditioned_markdown),
    "planning": Kind("Planning (FrozenLake)", "python -m rsr_model evaluate --planning",
                     ("rows", "maps"), "rows",
                     ("size", "mode", "checkpoints", "success_env.mean", "success_env.std", "action_accuracy.mean",
                      "action_accuracy.std", "frame_accuracy.mean", "frame_accuracy.std"),
                     lambda r: [planning_figure(r)], planning_evidence, planning_markdown),
    "scorer_check": Kind("Scorer check", "python -m rsr_model evaluate --scorer-check",
                         ("cells", "resolutions", "scenes", "target", "passed", "worst_accuracy", "worst_rejection"),
                         "cells", ("accuracy", "noisy_accuracy", "rejection"),
                         lambda r: [scorer_check_figure(r)], scorer_check_evidence, scorer_check_markdown),
    "shift": Kind("Shifted task and its controls (issue 20)", "python -m rsr_model evaluate --shift",
                  ("runs", "rows", "targets", "base_loss", "budget"), "runs", ("row", "seed", "loss"),
                  lambda r: [shift_figure(r)], shift_evidence, shift_markdown),
}


def render_result(path: Path, folder: Path) -> html.Div:
    """One result: heading, markdown table with its evidence beside it, figures; or one message line."""
    kind = KINDS[path.stem]
    where = str(path.relative_to(folder))
    try:
        result = load_result(path, kind)
        md = path.with_suffix(".md")
        table = md.read_text() if md.is_file() else kind.markdown(result)
        table = table.replace("[", "\\[")  # "seeds [0, 1]" is text, not a markdown link
        figures = [dcc.Graph(figure=f, config=GRAPH_CONFIG) if isinstance(f, go.Figure) else message(f)
                   for f in kind.figures(result)]
        evidence = html.Div([html.H3("evidence")] + [html.P(line) for line in kind.evidence(result)],
                            className="panel", style={"maxWidth": "420px"})
    except Exception as exc:  # one bad file is one line; the other results still render
        return message(f"{where}: {error_text(exc)}", "error")
    return html.Div([
        html.H2(kind.title, style={"fontSize": "15px", "marginBottom": "2px"}),
        html.Div(where, className="sub", style={"color": "#555"}),
        html.Div([dcc.Markdown(table, className="evidence"), evidence], className="cols"),
        *(html.Div(f, className="panel") for f in figures),
    ], className="result", id=f"result-{path.stem}")


def results_page(folder: Path | None) -> list:
    if folder is None:
        return [message(f"No results folder: runs/evaluate does not exist here and --results was not given. Make "
                        f"results with `{MAKE_THEM}`, then start `python -m dashboard --results runs/evaluate`.")]
    paths = find_results(folder)
    if not paths:
        return [message(f"No evaluation results under {folder}. Make them with `{MAKE_THEM}` (or `--scorer-check`, "
                        f"`--class-conditioned`, `--planning CKPT ...`), then reopen this tab.")]
    return [html.Div(f"{len(paths)} result file(s) under {folder}", className="sub")] + \
        [render_result(p, folder) for p in paths]


def layout(ctx: Context):
    return dcc.Loading(html.Div(id="results-body"))


def register(app: dash.Dash, ctx: Context) -> None:
    # the files are read when the tab opens, so new results show without a restart
    @view_body(app, VIEW.key, Output("results-body", "children"), trace=False)
    def render():
        return folder_results.section(ctx) + results_page(ctx.results)  # the served folders' own, then evaluate's


VIEW = View("results", "Results", layout, register)

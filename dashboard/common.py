"""What every view shares: the app context, expert colours, images as data URIs, messages."""

from __future__ import annotations

import base64
import functools
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from dash import html

from cli_common.errors import UserError

from .data import DashboardError, Registry, find_traces
from .jobs import Jobs

log = logging.getLogger("dashboard")

# Qualitative palette (Plotly's D3 / tab10 order), repeated for K > 10.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
DEFAULT_DIR = "runs"  # traces served when none are named
DEFAULT_RESULTS = "runs/evaluate"  # the Results tab's folder when none is named
GRAPH_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


@dataclass
class Context:
    """Server-side state shared by the callbacks of every view."""

    registry: Registry
    ckpt: Path | None = None
    results: Path | None = None  # folder of `python -m rsr_model evaluate` results (the Results tab)
    jobs: Jobs = field(default_factory=Jobs)
    # derived results that cost a pass over the trace: (trace id, steps, name, args) -> value
    memo: dict = field(default_factory=dict)
    model: Any = None  # (task, transformer, rsr) of ckpt, loaded on first use

    def cached(self, tid: str, name: str, fn: Callable[[], Any], *key: Any) -> Any:
        steps = self.registry.reader(tid).steps
        k = (tid, steps, name) + key
        if k not in self.memo:
            if len(self.memo) > 256:
                self.memo.clear()
            self.memo[k] = fn()
        return self.memo[k]

def make_context(traces: list[str], ckpt: Path | None = None, permutations: int = 199,
                 results: Path | None = None) -> Context:
    """The served registry and app context from command-line style arguments."""
    if traces:
        paths = find_traces(traces)
    else:
        paths = find_traces([DEFAULT_DIR]) if Path(DEFAULT_DIR).is_dir() else []
    if ckpt is not None and not Path(ckpt).is_file():
        raise DashboardError(f"--ckpt {ckpt}: no such file")
    if results is not None and not Path(results).is_dir():
        raise DashboardError(f"--results {results}: no such folder")
    if results is None and Path(DEFAULT_RESULTS).is_dir():
        results = Path(DEFAULT_RESULTS)
    return Context(Registry(paths, n_perm=permutations), Path(ckpt) if ckpt else None,
                   Path(results) if results is not None else None)


def expert_colour(k: int) -> str:
    return PALETTE[k % len(PALETTE)]


def discrete_colourscale(K: int) -> list[list]:
    """A stepped colourscale for integer z in 0..K-1 (one flat band per expert)."""
    scale = []
    for k in range(K):
        scale += [[k / K, expert_colour(k)], [(k + 1) / K, expert_colour(k)]]
    return scale


def expert_rgb(K: int) -> np.ndarray:
    """(K+1, 3) uint8 colours; row K is grey for invalid ids (unwritten, ablated)."""
    rgb = [tuple(int(expert_colour(k)[i:i + 2], 16) for i in (1, 3, 5)) for k in range(K)]
    return np.array(rgb + [(128, 128, 128)], np.uint8)


def png_uri(image: np.ndarray, scale: int = 1) -> str:
    """uint8 (H, W, 3) -> PNG data URI, upscaled by nearest neighbour."""
    from PIL import Image

    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def routing_rgb(ids: np.ndarray, K: int, grid: tuple[int, int], size: tuple[int, int] | None = None) -> np.ndarray:
    """Colour image of a token grid of expert ids, upsampled (nearest) to `size` (H, W)."""
    rgb = expert_rgb(K)[np.minimum(ids, K)].reshape(grid[0], grid[1], 3)
    if size:
        rgb = rgb.repeat(-(-size[0] // grid[0]), 0).repeat(-(-size[1] // grid[1]), 1)[: size[0], : size[1]]
    return rgb


def message(text: str, kind: str = "info") -> html.Div:
    return html.Div(text, className=f"msg msg-{kind}")


def error_text(exc: BaseException) -> str:
    if isinstance(exc, (UserError, OSError)):
        return str(exc)
    log.exception("view failed")
    return f"{type(exc).__name__}: {exc}"


def guarded(fn: Callable) -> Callable:
    """A view callback that returns one `children`: any failure becomes a message in the view,
    so a bad trace never takes the page down."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- shown to the user
            return message(error_text(exc), "error")
    return run


def view_body(app, view: str, output, *inputs) -> Callable:
    """Register `fn(trace_id, *input_values)` as the callback that fills a view's body. It runs
    only while the view's tab is open and a trace is selected (callbacks of hidden views
    would cost every slider move), and any failure becomes a message in the view."""
    import dash
    from dash import Input

    def register(fn: Callable) -> Callable:
        @app.callback(output, Input("tabs", "value"), Input("sel-trace", "value"), *inputs)
        @functools.wraps(fn)
        def run(open_view, tid, *values):
            if open_view != view or tid is None:
                return dash.no_update
            return guarded(fn)(tid, *values)
        return run
    return register


def fmt(x: Any, spec: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return spec.format(x)

"""What every view shares: the app context, the `View` declaration, expert colours, images as
data URIs, messages, the error guard (`guarded`, `view_body`) and the poll of a background job."""

from __future__ import annotations

import base64
import contextvars
import functools
import io
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dash
import numpy as np
from dash import Input, Output, State, html

from cli_common.errors import UserError

from .data import DashboardError, Registry, find_traces
from .jobs import Jobs, no_paths
from .requests import SELECTION_IDS, check_selection

log = logging.getLogger("dashboard")

# Qualitative palette (Plotly's D3 / tab10 order), repeated for K > 10.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
DEFAULT_DIR = "runs"  # traces served when none are named
DEFAULT_RESULTS = "runs/evaluate"  # the Results tab's folder when none is named
# the toolbar only while the pointer is over a plot: shown always, it covered titles and subplot titles
GRAPH_CONFIG = {"displaylogo": False, "displayModeBar": "hover", "toImageButtonOptions": {"format": "png", "scale": 2}}


_defaults_lock = threading.Lock()
_defaults_set = False


def figure_defaults() -> None:
    """Every figure's title at the top left: the plot toolbar sits at the top right, and a centred
    title ran under it (the Specialization MI chart, Compare). Set on first use, not at import:
    building plotly's templates costs about 0.3 s, which would delay the server's start; `guarded`
    (every callback) calls this before its view builds a figure, and `app.warm_up` at start."""
    global _defaults_set
    with _defaults_lock:
        if _defaults_set:
            return
        import plotly.graph_objects as go
        import plotly.io as pio

        pio.templates["thinking_pixel"] = go.layout.Template(layout=dict(title=dict(x=0.01, xanchor="left")))
        pio.templates.default = "plotly+thinking_pixel"
        _defaults_set = True


@dataclass
class Context:
    """Server-side state shared by the callbacks of every view."""

    registry: Registry
    ckpt: Path | None = None
    results: Path | None = None  # folder of `python -m rsr_model evaluate` results (the Results tab)
    jobs: Jobs = field(default_factory=Jobs)
    # derived results that cost a pass over the trace: (trace id, steps, name, args) -> value, least
    # recently used first; bounded by bytes (`memo_budget`), not entries: one latent layer of a big
    # trace is tens of MiB, a crop strip a few KiB
    memo: dict = field(default_factory=dict)
    memo_budget: int = 512 * 2**20
    model: Any = None  # (task, transformer, rsr) of ckpt, loaded on first use
    bind: str = "127.0.0.1"  # the address served on (--host): which Host headers are answered (`security`)

    def cached(self, tid: str, name: str, fn: Callable[[], Any], *key: Any) -> Any:
        steps = self.registry.reader(tid).steps
        k = (tid, steps, name) + key
        if k in self.memo:
            self.memo[k] = self.memo.pop(k)  # most recently used: last
            return self.memo[k]
        value = fn()
        self.memo[k] = value
        while len(self.memo) > 1 and self.memo_bytes() > self.memo_budget:
            self.memo.pop(next(iter(self.memo)))  # the least recently used
        return value

    def memo_bytes(self) -> int:
        """Bytes held by the memo's arrays (what bounds it; other values count as small)."""
        return sum(nbytes(v) for v in self.memo.values())


def nbytes(value: Any) -> int:
    """Bytes of the NumPy arrays in a value (an array, or a dict / list / tuple of them)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value[:1000])
    return 64

def make_context(traces: list[str], ckpt: Path | None = None, permutations: int = 199,
                 results: Path | None = None, report_workers: int = 1) -> Context:
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
    return Context(Registry(paths, n_perm=permutations, workers=report_workers), Path(ckpt) if ckpt else None,
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


def expert_legend(K: int) -> html.Div:
    """The colour key of routing images drawn as pictures (no plotly colour bar): a swatch per
    expert, grey for no expert (unwritten or ablated)."""
    swatch = {"display": "inline-block", "width": "10px", "height": "10px", "marginRight": "2px",
              "verticalAlign": "middle"}
    items = [html.Span([html.Span(style={**swatch, "background": expert_colour(k)}), f"e{k} "]) for k in range(K)]
    items.append(html.Span([html.Span(style={**swatch, "background": "#808080"}), "none"]))
    return html.Div(items, className="legend", style={"fontSize": "11px"})


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
    """One line for the page: a user's error as it reads, anything else with its type (and logged
    with its traceback, since it is a bug)."""
    if isinstance(exc, (UserError, OSError)):
        text = str(exc)
    else:
        log.exception("view failed")
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(no_paths(text).split())


def guarded(fn: Callable | None = None, *, failed: Callable[[html.Div], Any] | None = None) -> Callable:
    """`fn` as a view callback that cannot take the page down: any exception becomes a one-line
    error message (`error_text`) in the view. A callback with one `children` output returns the
    message itself; any other passes `failed`, which places it among its outputs (e.g.
    `lambda msg: (go.Figure(), msg)`) or returns what to show instead. A decorator, bare
    (`@guarded`) or with `failed` (`@guarded(failed=...)`)."""
    if fn is None:
        return functools.partial(guarded, failed=failed)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            figure_defaults()
            return fn(*args, **kwargs)
        except Exception as exc:  # any failure is shown to the user (and logged when it is a bug)
            msg = message(error_text(exc), "error")
            return msg if failed is None else failed(msg)
    return run


def in_status(n_outputs: int = 1) -> Callable[[html.Div], Any]:
    """`failed=` for a callback with no place of its own for a message (the selection's, the play
    buttons', navigation): the line goes to the page's status line under the selection bar, and
    the callback's `n_outputs` outputs stay as they were."""
    def show(msg: html.Div) -> Any:
        dash.set_props("status", {"children": msg})
        return dash.no_update if n_outputs == 1 else (dash.no_update,) * n_outputs
    return show


def unguarded(exc: Exception) -> None:
    """The app's `on_error`: a callback that is not `guarded` (a bug: every callback should be)
    still answers with one error line in the status line, not an HTTP 500; its outputs stay."""
    log.error("%s from a callback that is not guarded", type(exc).__name__)  # the fuzz test looks for this line
    in_status()(message(error_text(exc), "error"))


# Controls whose values reach a view through its gate (`view_body`): the selection bar and the
# live trace's version. A view's other inputs (its own controls) are Inputs of its callback.
GATED = ("sel-trace", *SELECTION_IDS, "version")
_changed: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("changed", default=())

# The gate of one view callback, run in the browser: while the view's tab is open (and, for a
# trace view, a trace is selected) it copies the values of the controls the callback reads into
# its store, which is the callback's input; otherwise it leaves the store alone, so the server
# hears nothing of a hidden view (at load, eleven callbacks fired where one view shows; every
# slider move asked every view). `changed`: the controls that moved (`changed_controls`).
GATE_JS = """function(view) {
    const dc = window.dash_clientside, ids = %(ids)s, values = Array.prototype.slice.call(arguments, 1);
    if (view !== %(view)s) { return dc.no_update; }
    const out = {view: view, at: Date.now(),
                 changed: ((dc.callback_context || {}).triggered || []).map(t => t.prop_id.split('.')[0])};
    ids.forEach((id, i) => { out[id] = values[i]; });
    if (%(trace)s && out['sel-trace'] == null) { return dc.no_update; }
    return out;
}"""


def changed_controls() -> tuple[str, ...]:
    """The selection controls (ids) whose move made the running view callback fire ("tabs" when
    its tab was opened); () when the view's own control did."""
    return _changed.get()


def gate_value(app: dash.Dash, store: str, values: dict[str, Any], changed: str | None = None) -> dict | None:
    """What the page's gate (`GATE_JS`) writes into `store` given control values ('id.prop' ->
    value, as a request carries them, 'tabs.value' the open tab); None where it writes nothing.
    For driving view callbacks as the page does (tests, benchmarks)."""
    g = app.dashboard_gates[store]
    if values.get("tabs.value") != g["view"]:
        return None
    out = {cid: values.get(f"{cid}.{prop}") for cid, prop in g["ids"]}
    if g["trace"] and out.get("sel-trace") is None:
        return None
    return {**out, "view": g["view"], "at": 0, "changed": [changed.split(".")[0]] if changed else []}


def view_body(app: dash.Dash, view: str, outputs: Output | list[Output], *inputs: Input | State,
              failed: Callable[[html.Div], Any] | None = None, trace: bool = True) -> Callable:
    """Register `fn(trace_id, *input_values)` as a callback of the view whose key is `view` (the
    callback every view renders its body with). It runs only while the view's tab is open and,
    with `trace`, a trace is selected: the selection values it reads (`GATED`) come through a
    gate run in the browser (`GATE_JS`), so hidden views cost no request; without `trace` it is
    `fn(*input_values)`. Failures are `guarded` (see there for `failed`). `outputs` is one Output
    or a list; `inputs` may end with States. Selection values among the inputs (sample, timestep,
    step, expert, layer, branch) are checked against the selected trace first
    (`requests.check_selection`; the app's `dashboard_context` holds the registry)."""
    several = isinstance(outputs, (list, tuple))
    outs = list(outputs) if several else [outputs]
    skip = tuple(dash.no_update for _ in outs) if several else dash.no_update
    gated = [isinstance(x, Input) and x.component_id in GATED for x in inputs]
    ids = (["sel-trace"] if trace else []) + [x.component_id for x, g in zip(inputs, gated) if g]
    ids = list(dict.fromkeys(ids))
    props = {x.component_id: x.component_property for x in inputs} | {"sel-trace": "value"}
    gates = app.__dict__.setdefault("dashboard_gates", {})
    store = f"gate-{view}-{len(gates)}"
    gates[store] = {"view": view, "trace": trace, "ids": [(i, props[i]) for i in ids]}
    app.clientside_callback(GATE_JS % {"ids": json.dumps(ids), "view": json.dumps(view), "trace": json.dumps(trace)},
                            Output(store, "data"), Input("tabs", "value"), *[Input(i, props[i]) for i in ids])
    own = [x for x, g in zip(inputs, gated) if not g]
    selection_at = {i: x.component_id for i, x in enumerate(inputs) if x.component_id in SELECTION_IDS}

    def register(fn: Callable) -> Callable:
        def checked(*values):
            # a selection value from the request that names no part of the trace is refused here,
            # once for every view, before it could wrap (-1) or fail deep inside h5py
            ctx = getattr(app, "dashboard_context", None)
            if trace and ctx is not None and selection_at:
                check_selection(ctx.registry.reader(values[0]), {cid: values[1 + i] for i, cid in selection_at.items()})
            return fn(*values)
        body = guarded(functools.wraps(fn)(checked), failed=failed)

        # prevent_initial_call: at load only the open view's gate writes its store and fires this
        @app.callback(*outs, Input(store, "data"), *own, prevent_initial_call=True)
        @functools.wraps(fn)
        def run(gate, *own_values):
            if not isinstance(gate, dict) or gate.get("view") != view or (trace and gate.get("sel-trace") is None):
                return skip
            mine = iter(own_values)
            values = [gate.get(x.component_id) if g else next(mine) for x, g in zip(inputs, gated)]
            trig = dash.ctx.triggered_id
            _changed.set(tuple(str(c) for c in gate.get("changed") or ()) if trig in (store, None) else ())
            return body(*([gate.get("sel-trace")] if trace else []), *values)
        return run
    return register


@dataclass
class JobPoll:
    """What one tick of a background job's poll shows (`poll_job`)."""

    state: str  # "unknown" (no such job: a restarted server), "running", "failed" or "done"
    message: Any  # the line to show: progress, error, or done(seconds); dash.no_update when unknown
    result: Any = None  # the job's result, once done

    @property
    def stop(self) -> bool:
        """Whether the poll's dcc.Interval should stop."""
        return self.state != "running"


def poll_job(jobs: Jobs, job_id: str | None, done: Callable[[float], str]) -> JobPoll:
    """One tick of the poll of job `job_id` (the id `Jobs.start` returned, kept in a dcc.Store
    while a dcc.Interval ticks): a progress line while it runs, its error when it failed,
    `done(seconds)` when it finished."""
    job = jobs.get(job_id)
    if job is None:
        return JobPoll("unknown", dash.no_update)
    st = job.status()
    if not st["done"]:
        return JobPoll("running", message(f"⏳ {st['message']}… {st['elapsed_s']:.1f} s"))
    if st["error"]:
        return JobPoll("failed", message(" ".join(st["error"].split()), "error"))  # one line, as `guarded`
    return JobPoll("done", message(done(st["elapsed_s"])), job.result)


class ViewError(Exception):
    """A view declared wrongly (a bug in dashboard/views/, raised when the app is built)."""


@dataclass(frozen=True)
class View:
    """One tab of the page. Each module in `dashboard/views/` ends with `VIEW = View(...)`, and
    `dashboard.views.VIEWS` lists them in tab order: the one place a view is registered (the
    tabs, the link's `view=` and the callbacks are all built from that list)."""

    key: str  # the tab's value and the link's `view=`; `view_body(app, key, ...)` runs while it is open
    label: str  # the tab's label
    layout: Callable[[Context], Any]  # layout(ctx): the tab's components, built once per page
    register: Callable[[dash.Dash, Context], None]  # register(app, ctx): its callbacks

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.key):
            raise ViewError(f"View key {self.key!r}: lowercase letters, digits and _ (it goes in links)")
        if not isinstance(self.label, str) or not self.label.strip():
            raise ViewError(f"View {self.key!r}: needs a label for its tab")
        for name in ("layout", "register"):
            if not callable(getattr(self, name)):
                raise ViewError(f"View {self.key!r}: {name} must be a function, got {getattr(self, name)!r}")


def fmt(x: Any, spec: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return spec.format(x)

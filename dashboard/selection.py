"""The one shared selection (trace, sample, branch, timestep, layer, recursion step, expert,
view), kept in the selection bar's controls and mirrored in the URL query string so a view
can be shared by link.

One callback owns the controls' values: it fills them from the URL on load, resets them to
valid ones when the trace changes, applies navigation requests from views (`nav` store:
e.g. clicking an expert opens its page), and writes the URL back. Moving a control only
rewrites the URL, so a slider move triggers the views once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode

import dash
from dash import Input, Output, State, dcc, html

from .common import Context, View, guarded, in_status, message

KEYS = ("trace", "sample", "branch", "t", "layer", "step", "expert", "view")
CONTROLS = {"trace": "sel-trace", "sample": "sel-sample", "branch": "sel-branch", "t": "sel-t",
            "layer": "sel-layer", "step": "sel-step", "expert": "sel-expert", "view": "tabs"}

NO_TRACES = ("No traces found. Make one with `./scripts/demo.sh` (or `python -m probes.record --ckpt CKPT "
             "--prompts examples/prompts.txt --out runs/trace.h5 --probs --latent-tokens 64 --decode`), "
             "then start `python -m dashboard runs/`.")


@dataclass
class Selection:
    """Control values as the views use them (positions, except layer = block index and branch name)."""

    trace: str | None
    sample: int = 0
    branch: str | None = None
    t: int = 0
    layer: int | None = None
    step: int = 0
    expert: int = 0


def selection_bar() -> html.Div:
    def labelled(text: str, comp) -> html.Div:
        return html.Div([html.Label(text), comp], className="ctl")

    return html.Div([
        labelled("trace", dcc.Dropdown(id="sel-trace", clearable=False, style={"width": "230px"})),
        labelled("sample", dcc.Dropdown(id="sel-sample", clearable=False, style={"width": "260px"})),
        labelled("branch", dcc.Dropdown(id="sel-branch", clearable=False, style={"width": "90px"})),
        labelled("layer", dcc.Dropdown(id="sel-layer", clearable=False, style={"width": "70px"})),
        labelled("expert", dcc.Dropdown(id="sel-expert", clearable=False, style={"width": "70px"})),
        html.Div([html.Label("diffusion timestep"),
                  html.Div([html.Button("▶", id="play-t", className="play", title="play timesteps"),
                            html.Div(dcc.Slider(id="sel-t", min=0, max=0, step=1, value=0), className="slider")],
                           className="row")], className="ctl wide"),
        html.Div([html.Label("recursion step"),
                  html.Div([html.Button("▶", id="play-step", className="play", title="play recursion steps"),
                            html.Div(dcc.Slider(id="sel-step", min=0, max=0, step=1, value=0),
                                     className="slider")], className="row")], className="ctl mid"),
        dcc.Interval(id="play-tick", interval=700, disabled=True),
        dcc.Store(id="playing", data=None),
    ], className="selbar")


def default_view(ctx: Context, views: list[View]) -> str:
    """The tab a page without a view in its link opens on: with evaluation results and no trace,
    Results (the only tab with something to show), else the first tab (the specialization overview)."""
    keys = [v.key for v in views]
    return "results" if not ctx.registry.entries and ctx.results is not None and "results" in keys else keys[0]


def read_query(search: str | None) -> dict[str, Any]:
    q = parse_qs((search or "").lstrip("?"))
    return {k: v[0] for k, v in q.items() if k in KEYS}


def _int(x: Any, default: int, n: int) -> int:
    try:
        v = int(x)
    except (TypeError, ValueError):
        return default
    return v if 0 <= v < n else default


def valid_selection(ctx: Context, want: dict[str, Any],
                    views: list[View]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(values, control options, message) for a wanted selection, clamped to the trace and `views`."""
    reg = ctx.registry
    trace_opts = reg.options()
    ok = [o["value"] for o in trace_opts if reg.entries[o["value"]].error is None]
    tid = want.get("trace") if want.get("trace") in reg.entries else (ok[0] if ok else None)
    view = want.get("view") if want.get("view") in {v.key for v in views} else default_view(ctx, views)
    out: dict[str, Any] = {"trace": tid, "view": view}
    opts: dict[str, Any] = {"trace": trace_opts}
    msg = None if trace_opts else NO_TRACES
    if want.get("trace") and want.get("trace") not in reg.entries:
        msg = "The link names a trace this dashboard does not serve; showing the first served trace."
    try:
        tr = reg.reader(tid) if tid else None
    except Exception as exc:  # a bad file: a message, and the rest of the page keeps working
        msg, tr = str(exc), None
    if tr is None:
        for k in ("sample", "branch", "layer", "expert"):
            out[k], opts[k] = None, []
        out.update(t=0, step=0)
        opts.update(t=(0, {}), step=(0, {}))
        return out, opts, msg
    c = tr.coords
    layers = [int(x) for x in c["layer"]]
    K = len(c["expert"])
    steps = [int(x) for x in c["step"]]
    if tr.kind == "sampling":
        smp = tr.samples()
        n = len(smp["prompt"])
        opts["sample"] = [{"label": f"{i}: {p[:28]} (seed {int(s)})", "value": i}
                          for i, (p, s) in enumerate(zip(smp["prompt"], smp["seed"]))]
        branches = [str(b) for b in c["branch"]]
        tv = [float(x) for x in c["timestep_value"]]
        out["sample"] = _int(want.get("sample"), 0, max(n, 1))
        out["branch"] = want.get("branch") if want.get("branch") in branches else branches[0]
        out["t"] = _int(want.get("t"), 0, len(tv))
        every = max(1, -(-len(tv) // 6))  # about six labels: more overlap on a laptop screen
        opts["t"] = (max(len(tv) - 1, 0), {i: f"{v:.0f}" for i, v in enumerate(tv) if i % every == 0})
        opts["branch"] = branches
    else:
        opts["sample"], opts["branch"], opts["t"] = [], [], (0, {})
        out.update(sample=None, branch=None, t=0)
    out["layer"] = int(want["layer"]) if str(want.get("layer")).lstrip("-").isdigit() and int(want["layer"]) in layers \
        else layers[0]
    out["step"] = _int(want.get("step"), 0, len(steps))
    out["expert"] = _int(want.get("expert"), 0, K)
    opts["layer"] = layers
    opts["step"] = (len(steps) - 1, {i: str(s) for i, s in enumerate(steps)})
    opts["expert"] = [{"label": str(k), "value": k} for k in range(K)]
    return out, opts, msg


def register(app: dash.Dash, ctx: Context, views: list[View]) -> None:
    controls = [Input(CONTROLS[k], "value") for k in KEYS]
    outputs = [Output("url", "search"), Output("status", "children"),
               Output("sel-trace", "options"), Output("sel-sample", "options"), Output("sel-branch", "options"),
               Output("sel-t", "max"), Output("sel-t", "marks"), Output("sel-layer", "options"),
               Output("sel-step", "max"), Output("sel-step", "marks"), Output("sel-expert", "options")] + \
              [Output(CONTROLS[k], "value") for k in KEYS]

    @app.callback(outputs, [Input("url", "search"), Input("nav", "data")] + controls)
    @guarded(failed=lambda msg: [dash.no_update, msg] + [dash.no_update] * (len(outputs) - 2))
    def sync(search, nav, *values):
        trig = dash.ctx.triggered_id
        current = dict(zip(KEYS, values))
        if trig not in ("url", "nav", "sel-trace", None):
            # A control moved: only the link changes (views listen to the controls themselves).
            return ["?" + urlencode({k: v for k, v in current.items() if v is not None})] + \
                [dash.no_update] * (len(outputs) - 1)
        if trig in ("url", None):
            want = {**current, **read_query(search)}
        elif trig == "nav":
            want = {**current, **(nav or {})}
        else:  # a new trace: keep what still fits
            want = current
        vals, opts, msg = valid_selection(ctx, want, views)
        link = "?" + urlencode({k: v for k, v in vals.items() if v is not None})
        return [link, message(msg, "warn") if msg else None,
                opts["trace"], opts["sample"], opts["branch"], opts["t"][0], opts["t"][1], opts["layer"],
                opts["step"][0], opts["step"][1], opts["expert"]] + [vals[k] for k in KEYS]

    @app.callback(Output("playing", "data"), Output("play-tick", "disabled"),
                  Input("play-t", "n_clicks"), Input("play-step", "n_clicks"), State("playing", "data"),
                  prevent_initial_call=True)
    @guarded(failed=in_status(2))
    def play(_t, _s, playing):
        which = "t" if dash.ctx.triggered_id == "play-t" else "step"
        if playing == which:
            return None, True
        return which, False

    @app.callback(Output("sel-t", "value", allow_duplicate=True), Output("sel-step", "value", allow_duplicate=True),
                  Input("play-tick", "n_intervals"), State("playing", "data"), State("sel-t", "value"),
                  State("sel-t", "max"), State("sel-step", "value"), State("sel-step", "max"),
                  prevent_initial_call=True)
    @guarded(failed=in_status(2))
    def advance(_n, playing, t, t_max, step, step_max):
        if playing == "t":
            return ((t or 0) + 1) % ((t_max or 0) + 1), dash.no_update
        if playing == "step":
            return dash.no_update, ((step or 0) + 1) % ((step_max or 0) + 1)
        return dash.no_update, dash.no_update

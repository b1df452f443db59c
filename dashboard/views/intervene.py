"""View 7, intervene (needs `--ckpt`): force or ablate an expert on a region painted on the token
grid (box-select on the map), within a diffusion-timestep window and at one recursion step
or all, at the selected layer; the server re-samples the selected sample's prompt and seed
with and without the intervention (`probes.interventions.Intervention`, the same hooks the
recorder and `probes.causal` use) and shows before, after, their difference and the routing
change at the selected timestep. Runs as a background job with a progress line.
"""

from __future__ import annotations

import threading
from typing import Any

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html

from ..common import (
    GRAPH_CONFIG,
    Context,
    View,
    discrete_colourscale,
    fmt,
    guarded,
    message,
    png_uri,
    poll_job,
    routing_rgb,
    view_body,
)
from .routing import token_grid

IMAGE_PX = 140
_model_lock = threading.Lock()


def layout(ctx: Context):
    if ctx.ckpt is None:
        return html.Div(id="intervene-body", children=message(
            "start the dashboard with --ckpt CKPT (the checkpoint the trace was recorded from) to intervene"))
    return html.Div(id="intervene-body", children=[
        html.Div([
            dcc.RadioItems(id="iv-kind", options=[{"label": " force", "value": "force"},
                                                  {"label": " ablate", "value": "ablate"}], value="force", inline=True),
            html.Span(" the selected expert at the selected layer; "),
            dcc.Checklist(id="iv-only-step", options=[{"label": " only at the selected recursion step", "value": "on"}],
                          value=[], inline=True),
            html.Label(" timestep window "),
            html.Div(dcc.RangeSlider(id="iv-window", min=0, max=1000, step=1, value=[0, 1000],
                                     marks={0: "0", 500: "500", 1000: "1000"}), style={"width": "260px"}),
            html.Button("run", id="iv-run", className="btn"),
        ], className="row"),
        html.Div(id="iv-msg"),
        html.Div([
            html.Div([html.H3("paint the region (box-select); none = whole image"),
                      dcc.Graph(id="iv-grid", config=GRAPH_CONFIG, style={"width": "300px", "height": "300px"}),
                      html.Div(id="iv-grid-msg"), html.Div(id="iv-region-text")], className="panel"),
            html.Div(id="iv-result", className="cols", style={"flex": "1", "minWidth": "600px"}),
        ], className="cols"),
        dcc.Store(id="iv-region"), dcc.Store(id="iv-job"),
        dcc.Interval(id="iv-poll", interval=500, disabled=True),
    ])


def model(ctx: Context):
    """(task, transformer, rsr) of --ckpt, loaded once."""
    from rsr_model.sample import load_model

    with _model_lock:
        if ctx.model is None:
            task, transformer, rsr, _ = load_model(ctx.ckpt)
            ctx.model = (task, transformer, rsr)
        return ctx.model


def run_intervention(ctx: Context, tr, sample: int, iv, layer: int, step: int,
                     t_index: int) -> dict[str, Any]:
    """Sample the trace's prompt and seed with and without `iv` (a `probes.interventions.Intervention`,
    imported on first use: torch is loaded only when someone intervenes) through
    `probes.causal.before_after`, the report's definition of the effect; images and the routing of
    (layer, step) at the sampler call nearest the selected timestep, before and after."""
    from probes.causal import before_after, routing_changed
    from probes.interventions import Intervention

    task, transformer, rsr = model(ctx)
    smp = tr.samples()
    item = smp["prompt"][sample] or str(int(smp["label"][sample]))
    items = task.parse_items([item])
    seeds = [int(smp["seed"][sample])]
    sched = tr.attrs.get("scheduler") or {}
    steps, guidance = int(sched.get("num_inference_steps", 8)), float(sched.get("guidance_scale", 3.0))
    capture = Intervention("force", 0, layers=(layer,), step=step).names()
    t_value = float(tr.coords["timestep_value"][t_index])
    r = before_after(task, transformer, rsr, items, seeds, [iv], steps, guidance, capture=capture)
    a, b = r["images_before"][0], r["images_after"][0]
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.uint8)  # drawn, not a statistic
    ids_a, ids_b = _nearest_ids(r["captured_before"], t_value), _nearest_ids(r["captured_after"], t_value)
    return {"before": a, "after": b, "diff": diff, "ids_before": ids_a, "ids_after": ids_b,
            "routing_changed": routing_changed(ids_a, ids_b) if ids_a is not None and ids_b is not None else None,
            "image_mean_abs_diff": r["image_mean_abs_diff"],
            "x0_mean_abs_diff": r["x0_mean_abs_diff"], "steps": steps, "guidance": guidance, "item": item,
            "seed": seeds[0]}


def _nearest_ids(seen: dict, t_value: float) -> np.ndarray | None:
    """The conditional row's expert ids at the captured call nearest timestep value `t_value`."""
    calls = next(iter(seen.values()), [])
    nearest = min(calls, key=lambda c: abs(float(c[0].timestep.reshape(-1)[-1]) - t_value)) if calls else None
    return nearest[1][-1].numpy().astype(np.int64) if nearest is not None else None  # cond row is last


def result_view(tr, r: dict, K: int) -> list:
    grid = token_grid(tr)
    scale = max(1, IMAGE_PX // r["before"].shape[0])
    diff_vis = np.clip(r["diff"].astype(np.float32) * 8, 0, 255).astype(np.uint8)
    panels = [html.Div([html.H3(title), html.Img(src=png_uri(im, scale), width=IMAGE_PX, id=f"iv-img-{key}")],
                       className="panel")
              for key, title, im in (("before", "before", r["before"]), ("after", "after", r["after"]),
                                     ("diff", "|after − before| × 8", diff_vis))]
    if r["ids_before"] is not None and r["ids_after"] is not None:
        for key, ids in (("before", r["ids_before"]), ("after", r["ids_after"])):
            valid = np.where(ids < 0, K, ids)  # -1 (ablated): grey
            panels.append(html.Div([html.H3(f"routing {key}"),
                                    html.Img(src=png_uri(routing_rgb(valid, K, grid), max(1, 100 // grid[0])),
                                             width=100)], className="panel"))
        panels.append(html.Div(f"tokens whose expert changed: {r['routing_changed']:.1%}"))
    panels.append(html.Div(f"{r['item']!r}, seed {r['seed']}, {r['steps']} steps, guidance {r['guidance']}: image mean "
                           f"|diff| {fmt(r['image_mean_abs_diff'], '{:.3g}')} / 255, x0 mean |diff| "
                           f"{fmt(r['x0_mean_abs_diff'], '{:.3g}')}", id="iv-summary"))
    return panels


def intervention(tr, kind: str, expert: int | None, layer: int, step: int | None, only_step: list,
                 window: list[float], region: dict | None):
    """(the `probes.interventions.Intervention` the controls describe, the selected recursion step's value)."""
    from probes.interventions import Intervention

    step_value = int(tr.coords["step"][step or 0])
    iv = Intervention(kind, int(expert or 0), layers=(int(layer),), step=step_value if only_step else None,
                      rows=tuple(region["rows"]) if region else None, cols=tuple(region["cols"]) if region else None,
                      t_min=float(window[0]), t_max=float(window[1]))
    return iv, step_value


def grid_figure(z: np.ndarray, K: int, region: dict | None) -> go.Figure:
    """The routing map to paint the region on (box-select), the region drawn as a black frame."""
    fig = go.Figure(go.Heatmap(z=z, zmin=-0.5, zmax=K - 0.5, colorscale=discrete_colourscale(K), showscale=False,
                               hovertemplate="row %{y}, col %{x}<extra></extra>"))
    if region:
        fig.add_shape(type="rect", x0=region["cols"][0] - 0.5, x1=region["cols"][1] - 0.5,
                      y0=region["rows"][0] - 0.5, y1=region["rows"][1] - 0.5, line=dict(color="black", width=3))
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    fig.update_layout(dragmode="select", margin=dict(l=20, r=10, t=10, b=20), height=300)
    return fig


def register(app: dash.Dash, ctx: Context) -> None:
    if ctx.ckpt is None:
        return
    register_region(app, ctx)
    register_run(app, ctx)


def register_region(app: dash.Dash, ctx: Context) -> None:
    """The map of the selected routing and the region box-selected on it."""
    @view_body(app, VIEW.key, [Output("iv-grid", "figure"), Output("iv-grid-msg", "children")],
               Input("sel-sample", "value"), Input("sel-branch", "value"), Input("sel-t", "value"),
               Input("sel-layer", "value"), Input("sel-step", "value"), Input("iv-region", "data"),
               failed=lambda msg: (go.Figure(), msg))
    def grid(tid, sample, branch, t, layer, step, region):
        from .routing import map_data

        tr = ctx.registry.reader(tid)
        z, _ = map_data(tr, sample or 0, branch, t or 0, layer, step or 0)
        return grid_figure(z, len(tr.coords["expert"]), region), None

    @app.callback(Output("iv-region", "data"), Output("iv-region-text", "children"), Input("iv-grid", "selectedData"),
                  prevent_initial_call=True)
    def paint(selected):
        if not selected or "range" not in selected:
            return None, "whole image"
        (x0, x1), (y0, y1) = selected["range"]["x"], sorted(selected["range"]["y"])
        rows = [max(0, int(np.ceil(y0 - 0.5))), int(np.floor(y1 + 0.5))]
        cols = [max(0, int(np.ceil(x0 - 0.5))), int(np.floor(x1 + 0.5))]
        return {"rows": rows, "cols": cols}, f"region rows {rows[0]}:{rows[1]}, cols {cols[0]}:{cols[1]}"


def register_run(app: dash.Dash, ctx: Context) -> None:
    """The run button: the intervention in a background job (its failures are the job's error
    line), polled until before and after are shown."""
    @app.callback(Output("iv-job", "data"), Output("iv-poll", "disabled"), Input("iv-run", "n_clicks"),
                  State("sel-trace", "value"), State("sel-sample", "value"), State("sel-t", "value"),
                  State("sel-layer", "value"), State("sel-step", "value"), State("sel-expert", "value"),
                  State("iv-kind", "value"), State("iv-only-step", "value"), State("iv-window", "value"),
                  State("iv-region", "data"), prevent_initial_call=True)
    def start(_n, tid, sample, t, layer, step, expert, kind, only_step, window, region):
        def work(job):
            tr = ctx.registry.reader(tid)
            iv, step_value = intervention(tr, kind, expert, layer, step, only_step, window, region)
            job.message = f"re-sampling with {kind} expert {iv.expert}"
            return run_intervention(ctx, tr, sample or 0, iv, int(layer), step_value, t or 0)
        key = f"iv:{tid}:{kind}:{expert}:{layer}:{step}:{bool(only_step)}:{window}:{region}:{sample}:{t}"
        return ctx.jobs.start(key, work).id, False

    @app.callback(Output("iv-msg", "children"), Output("iv-result", "children"),
                  Output("iv-poll", "disabled", allow_duplicate=True),
                  Input("iv-poll", "n_intervals"), State("iv-job", "data"), State("sel-trace", "value"),
                  prevent_initial_call=True)
    @guarded(failed=lambda msg: (msg, [], True))
    def poll(_n, job_id, tid):
        tick = poll_job(ctx.jobs, job_id, lambda s: f"done in {s:.1f} s")
        if tick.state != "done":
            return tick.message, [] if tick.state == "failed" else dash.no_update, tick.stop
        tr = ctx.registry.reader(tid)
        return tick.message, result_view(tr, tick.result, len(tr.coords["expert"])), True


VIEW = View("intervene", "Intervene", layout, register)

"""View 7, intervene (needs `--ckpt`): force or ablate an expert on a region painted on the token
grid (box-select on the map), within a diffusion-timestep window and at one recursion step
or all, at the selected layer; the server re-samples the selected sample's prompt and seed
with and without the intervention (`probes.interventions.Intervention`, the same hooks the
recorder and `probes.causal` use) and shows before, after, their difference and the routing
change at the selected timestep. Runs as a background job with a progress line.

Before a run the page says which sampled timesteps the window covers and refuses a window
that covers none, a region outside the grid, an unknown kind or an index the trace does not
have (`dashboard.requests`). A run that changed no routing decision is flagged as having no
effect. Runs are kept side by side in a table (kind, expert, where, tokens changed, image
change, routing change), newest first, as Neuronpedia lists feature ablations.
"""

from __future__ import annotations

import threading
from typing import Any

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html

from .. import requests
from ..common import (
    GRAPH_CONFIG,
    Context,
    View,
    discrete_colourscale,
    expert_legend,
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
                                     marks={0: "0", 500: "500", 1000: "1000"}), style={"width": "380px"}),
            html.Button("run", id="iv-run", className="btn"),
        ], className="row"),
        html.Div(id="iv-covered", className="sub"),
        html.Div(id="iv-msg"),
        html.Div([
            html.Div([html.H3("paint the region (box-select); none = whole image"),
                      dcc.Graph(id="iv-grid", config=GRAPH_CONFIG, style={"width": "300px", "height": "300px"}),
                      html.Div(id="iv-grid-msg"),
                      html.Div([html.Span("whole image", id="iv-region-text"),
                                html.Button("clear region", id="iv-clear", className="btn")], className="row")],
                     className="panel"),
            html.Div(id="iv-result", className="cols", style={"flex": "1", "minWidth": "600px"}),
        ], className="cols"),
        html.Div([html.H3("runs (newest first)"), html.Div(id="iv-runs-table")], className="panel"),
        dcc.Store(id="iv-region"), dcc.Store(id="iv-job"), dcc.Store(id="iv-runs", data=[]),
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
    from probes.interventions import Intervention, sampled_timesteps

    task, transformer, rsr = model(ctx)
    smp = tr.samples()
    item = smp["prompt"][sample] or str(int(smp["label"][sample]))
    items = task.parse_items([item])
    seeds = [int(smp["seed"][sample])]
    sched = tr.attrs.get("scheduler") or {}
    steps, guidance = int(sched.get("num_inference_steps", 8)), float(sched.get("guidance_scale", 3.0))
    capture = Intervention("force", 0, layers=(layer,), step=step).names()
    t_value = float(tr.coords["timestep_value"][t_index])
    iv.check_selects(token_grid(tr), sampled_timesteps(task, steps))  # what the CLI refuses, refused here too
    r = before_after(task, transformer, rsr, items, seeds, [iv], steps, guidance, capture=capture)
    a, b = r["images_before"][0], r["images_after"][0]
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.uint8)  # drawn, not a statistic
    ids_a, ids_b = _nearest_ids(r["captured_before"], t_value), _nearest_ids(r["captured_after"], t_value)
    return {"before": a, "after": b, "diff": diff, "ids_before": ids_a, "ids_after": ids_b,
            "routing_changed": routing_changed(ids_a, ids_b) if ids_a is not None and ids_b is not None else None,
            "image_mean_abs_diff": r["image_mean_abs_diff"], "intervention": iv.to_dict(),
            "tokens_changed": int(r["interventions"][0]["tokens_changed"]),
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
        panels.append(html.Div([f"tokens whose expert changed at t, this layer and step: {r['routing_changed']:.1%}",
                                expert_legend(K)]))
    panels.append(html.Div(f"routing decisions the intervention changed over the run: {r['tokens_changed']:,}"
                           + (" (no effect)" if r["tokens_changed"] == 0 else ""), id="iv-changed",
                           className="flag" if r["tokens_changed"] == 0 else None))
    panels.append(html.Div(f"{r['item']!r}, seed {r['seed']}, {r['steps']} steps, guidance {r['guidance']}: image mean "
                           f"|diff| {fmt(r['image_mean_abs_diff'], '{:.3g}')} / 255, x0 mean |diff| "
                           f"{fmt(r['x0_mean_abs_diff'], '{:.3g}')}", id="iv-summary"))
    return panels


def intervention(tr, kind: str, expert: Any, layer: Any, step: Any, only_step: Any, window: Any,
                 region: Any):
    """(the `probes.interventions.Intervention` the controls describe, the selected recursion
    step's value), every value checked first (`dashboard.requests`): RequestError otherwise."""
    from probes.interventions import Intervention

    requests.check_selection(tr, {"sel-expert": expert, "sel-layer": layer, "sel-step": step})
    if expert is None or layer is None:
        raise requests.RequestError("choose an expert and a layer first")
    lo, hi = requests.window(window)
    hit = requests.covered([float(v) for v in tr.coords["timestep_value"]], lo, hi)
    if not hit:
        raise requests.RequestError(f"timestep window {lo:g}..{hi:g} covers none of the sampled timesteps "
                                    f"({sampled_text(tr)}); the intervention would change nothing")
    area = requests.region(region, token_grid(tr))
    step_value = int(tr.coords["step"][step or 0])
    iv = Intervention(requests.kind(kind), int(expert), layers=(int(layer),),
                      step=step_value if only_step else None,
                      rows=tuple(area["rows"]) if area else None, cols=tuple(area["cols"]) if area else None,
                      t_min=lo, t_max=hi)
    return iv, step_value


def sampled_text(tr) -> str:
    return ", ".join(f"{float(v):.0f}" for v in tr.coords["timestep_value"])


def covered_line(tr, window: Any) -> tuple[Any, bool]:
    """The line under the controls: which sampled timesteps the window covers; and whether the
    run button is disabled (it covers none, or the window is malformed)."""
    try:
        lo, hi = requests.window(window)
    except requests.RequestError as exc:
        return message(str(exc), "error"), True
    values = [float(v) for v in tr.coords["timestep_value"]]
    hit = requests.covered(values, lo, hi)
    if not hit:
        return message(f"window {lo:.0f}..{hi:.0f} covers none of the sampled timesteps ({sampled_text(tr)}): "
                       "nothing to intervene on", "warn"), True
    # the trace's recorded timesteps (a subset when recorded with --timesteps); the run checks the
    # sampler's own list again before it starts
    return (f"window {lo:.0f}..{hi:.0f} covers {len(hit)} of {len(values)} sampled timesteps the trace recorded: "
            + ", ".join(f"{t:.0f}" for t in hit)), False


def grid_figure(z: np.ndarray, K: int, region: dict | None) -> go.Figure:
    """The routing map to paint the region on (box-select), the region drawn as a black frame."""
    fig = go.Figure(go.Heatmap(z=z, zmin=-0.5, zmax=K - 0.5, colorscale=discrete_colourscale(K),
                               colorbar=dict(title="expert", thickness=8, tickvals=list(range(K))),
                               hovertemplate="row %{y}, col %{x}<extra></extra>"))
    if region:
        fig.add_shape(type="rect", x0=region["cols"][0] - 0.5, x1=region["cols"][1] - 0.5,
                      y0=region["rows"][0] - 0.5, y1=region["rows"][1] - 0.5, line=dict(color="black", width=3))
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    # uirevision: a redraw (a new region frame, another timestep) keeps the box on the plot
    fig.update_layout(dragmode="select", margin=dict(l=20, r=10, t=10, b=20), height=300, uirevision="iv-grid")
    return fig


def region_of(selected: dict, grid: tuple[int, int]) -> dict[str, list[int]] | None:
    """The token rows and columns (half-open) whose cell centres a box selection on the grid
    contains (cell r spans r - 0.5..r + 0.5), clipped to the grid; the frame drawn then snaps to
    those cells' edges."""
    (x0, x1), (y0, y1) = sorted(selected["range"]["x"]), sorted(selected["range"]["y"])
    rows = [max(0, int(np.ceil(y0))), min(grid[0], int(np.floor(y1)) + 1)]
    cols = [max(0, int(np.ceil(x0))), min(grid[1], int(np.floor(x1)) + 1)]
    if rows[0] >= rows[1] or cols[0] >= cols[1]:
        return None
    return {"rows": rows, "cols": cols}


def region_text(region: dict | None) -> str:
    return "whole image" if not region else \
        f"region rows {region['rows'][0]}:{region['rows'][1]}, cols {region['cols'][0]}:{region['cols'][1]}"


def register(app: dash.Dash, ctx: Context) -> None:
    if ctx.ckpt is None:
        return
    register_region(app, ctx)
    register_run(app, ctx)


def register_region(app: dash.Dash, ctx: Context) -> None:
    """The map of the selected routing, the region box-selected on it, the covered timesteps."""
    @view_body(app, VIEW.key, [Output("iv-grid", "figure"), Output("iv-grid-msg", "children")],
               Input("sel-sample", "value"), Input("sel-branch", "value"), Input("sel-t", "value"),
               Input("sel-layer", "value"), Input("sel-step", "value"), Input("iv-region", "data"),
               failed=lambda msg: (go.Figure(), msg))
    def grid(tid, sample, branch, t, layer, step, region):
        from .routing import map_data

        tr = ctx.registry.reader(tid)
        z, _ = map_data(tr, sample or 0, branch, t or 0, layer, step or 0)
        return grid_figure(z, len(tr.coords["expert"]), region), None

    @view_body(app, VIEW.key, [Output("iv-covered", "children"), Output("iv-run", "disabled")],
               Input("iv-window", "value"), failed=lambda msg: (msg, True))
    def covered(tid, window):
        return covered_line(ctx.registry.reader(tid), window)

    @app.callback(Output("iv-region", "data"), Output("iv-region-text", "children"), Input("iv-grid", "selectedData"),
                  Input("iv-clear", "n_clicks"), State("iv-region", "data"), State("sel-trace", "value"),
                  prevent_initial_call=True)
    @guarded(failed=lambda msg: (dash.no_update, msg))
    def paint(selected, _clear, region, tid):
        # The grid is redrawn with the region's frame, and plotly then reports an empty selection:
        # only a new box changes the region, only the button clears it (else the paint never sticks).
        if dash.ctx.triggered_id == "iv-clear":
            return None, region_text(None)
        if not isinstance(selected, dict) or "range" not in selected:
            return dash.no_update, region_text(region)
        new = region_of(selected, token_grid(ctx.registry.reader(tid)))
        return (new, region_text(new)) if new else (dash.no_update, region_text(region))


def register_run(app: dash.Dash, ctx: Context) -> None:
    """The run button: the intervention, checked, in a background job (its failures are the job's
    error line), polled until before and after are shown and the run joins the table."""
    @app.callback(Output("iv-job", "data"), Output("iv-poll", "disabled"),
                  Output("iv-msg", "children", allow_duplicate=True), Input("iv-run", "n_clicks"),
                  State("sel-trace", "value"), State("sel-sample", "value"), State("sel-t", "value"),
                  State("sel-layer", "value"), State("sel-step", "value"), State("sel-expert", "value"),
                  State("iv-kind", "value"), State("iv-only-step", "value"), State("iv-window", "value"),
                  State("iv-region", "data"), prevent_initial_call=True)
    @guarded(failed=lambda msg: (dash.no_update, True, msg))
    def start(_n, tid, sample, t, layer, step, expert, kind, only_step, window, region):
        tr = ctx.registry.reader(tid)
        if tr.kind != "sampling":
            raise requests.RequestError("interventions re-sample a sampling trace; this is a training trace")
        requests.check_selection(tr, {"sel-sample": sample, "sel-t": t})
        iv, step_value = intervention(tr, kind, expert, layer, step, only_step, window, region)

        def work(job):
            job.message = f"re-sampling with {iv.kind} expert {iv.expert}"
            return run_intervention(ctx, tr, sample or 0, iv, int(layer), step_value, t or 0)
        key = f"iv:{tid}:{iv}:{sample}:{t}"
        return ctx.jobs.start(key, work).id, False, None

    @app.callback(Output("iv-msg", "children"), Output("iv-result", "children"),
                  Output("iv-poll", "disabled", allow_duplicate=True), Output("iv-runs", "data"),
                  Input("iv-poll", "n_intervals"), State("iv-job", "data"), State("sel-trace", "value"),
                  State("iv-runs", "data"), prevent_initial_call=True)
    @guarded(failed=lambda msg: (msg, [], True, dash.no_update))
    def poll(_n, job_id, tid, runs):
        tick = poll_job(ctx.jobs, job_id, lambda s: f"done in {s:.1f} s")
        if tick.state != "done":
            return tick.message, [] if tick.state == "failed" else dash.no_update, tick.stop, dash.no_update
        tr = ctx.registry.reader(tid)
        r = tick.result
        runs = [run for run in (runs if isinstance(runs, list) else []) if run.get("job") != job_id]
        runs = [run_row(job_id, r, len(runs) + 1)] + runs[:MAX_RUNS - 1]
        msg = message(NO_EFFECT, "warn") if r["tokens_changed"] == 0 else tick.message
        return msg, result_view(tr, r, len(tr.coords["expert"])), True, runs

    @app.callback(Output("iv-runs-table", "children"), Input("iv-runs", "data"))
    @guarded
    def table(runs):
        return runs_table(runs if isinstance(runs, list) else [])


MAX_RUNS = 12
NO_EFFECT = ("this intervention changed no routing decision (0 tokens): it never fired, so every difference "
             "shown is zero by construction; widen the window or the region")


def run_row(job_id: str, r: dict, number: int) -> dict[str, Any]:
    """One run as the runs table shows it (numbers from `probes.causal.before_after`)."""
    iv = r["intervention"]
    where = f"layer {iv['layers'][0]}, " + ("all steps" if iv["step"] is None else f"step {iv['step']}")
    area = "whole image" if iv["rows"] is None else f"rows {iv['rows'][0]}:{iv['rows'][1]}, " \
                                                    f"cols {iv['cols'][0]}:{iv['cols'][1]}"
    return {"job": job_id, "run": number, "what": f"{iv['kind']} e{iv['expert']}", "where": where, "area": area,
            "window": f"{iv['t_min']:.0f}..{iv['t_max']:.0f}", "tokens_changed": r["tokens_changed"],
            "routing_changed": r["routing_changed"], "image_diff": r["image_mean_abs_diff"],
            "after": png_uri(r["after"], max(1, 48 // r["after"].shape[0]))}


def runs_table(runs: list[dict]) -> Any:
    if not runs:
        return html.Div("no runs yet", className="sub")
    head = ["run", "intervention", "where", "area", "window", "routing decisions changed",
            "tokens changed at t (layer, step)", "image mean |diff| / 255", "after"]
    rows = [html.Tr([html.Td(str(run["run"])), html.Td(run["what"]), html.Td(run["where"]), html.Td(run["area"]),
                     html.Td(run["window"]),
                     html.Td(f"{run['tokens_changed']:,}" + (" (no effect)" if run["tokens_changed"] == 0 else ""),
                             className="flag" if run["tokens_changed"] == 0 else None),
                     html.Td(fmt(run["routing_changed"], "{:.1%}")), html.Td(fmt(run["image_diff"], "{:.3g}")),
                     html.Td(html.Img(src=run["after"], width=48))]) for run in runs]
    return html.Table([html.Tr([html.Th(h) for h in head])] + rows, className="evidence", id="iv-runs-rows")


VIEW = View("intervene", "Intervene", layout, register)

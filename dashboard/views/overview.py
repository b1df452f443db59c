"""View 1, specialization overview: the paper's Figure 4 made interactive, beside the evidence.

Left: expert share across diffusion timesteps, one panel per (layer, recursion step), coloured
by lift over 1/K (share x K; 1 = uniform), raw share on hover. Clicking a cell selects that
timestep, layer, step and expert. Right: for the selected layer and step, the mutual
information of the expert with each label against its permutation null (bar = MI, whisker =
null mean + 2 sd), with p-value and AMI, and the gate's entropy and top-1 margin; a gate
whose mean margin is below `probes.views.FLAT_GATE_MARGIN` is flagged as a flat gate.
"""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import ALL, Input, Output, State, dcc, html
from plotly.subplots import make_subplots

from probes.views import FLAT_GATE_MARGIN, flat_gate

from ..common import GRAPH_CONFIG, Context, View, fmt, guarded, in_status, message, view_body


def layout(ctx: Context):
    return html.Div(id="overview-body")


def share_figure(report: dict) -> go.Figure:
    layers = report["layers"]
    K = report["trace"]["experts"]
    steps = max((list(lo["steps"]) for lo in layers.values()), key=len)
    # A facet grid: x shared by column (every panel has the same timesteps: tick labels on the bottom row
    # only), y by row, one title per column and per row instead of one per panel. With 4 layers x 5 steps
    # this drew in 260-270 ms instead of 290-470 (fresh page, headless Chromium), most of it fewer labels.
    fig = make_subplots(rows=len(layers), cols=len(steps), shared_yaxes=True, shared_xaxes=True,
                        column_titles=[f"step {s}" for s in steps], row_titles=[f"layer {layer}" for layer in layers],
                        horizontal_spacing=0.02, vertical_spacing=0.08)
    sampling = report["trace"]["kind"] == "sampling"
    for i, (layer, lo) in enumerate(layers.items()):
        for j, (step, d) in enumerate(lo["steps"].items()):
            if sampling:
                x = np.asarray(d["share_by_timestep"]["timestep_value"], float)
                share = np.asarray(d["share_by_timestep"]["share"], float)
            else:
                x = np.asarray([0.5 * (b["t_min"] + b["t_max"]) for b in report["timestep_bins"]])
                share = np.asarray([b["share"] for b in d["load_by_timestep_bin"]], float)
            order = np.argsort(-x, kind="stable")  # noisiest first, as the title says (training bins run up)
            x, share = x[order], share[order]
            fig.add_trace(go.Heatmap(
                x=timestep_labels(x), y=[f"e{k}" for k in range(K)], z=(share * K).T, customdata=share.T,
                # lift runs 0..K (K: the expert takes every token); a cap at 2 made every specialised cell alike
                zmin=0, zmax=K, zmid=1, colorscale="RdBu_r", showscale=(i == 0 and j == 0),
                colorbar=dict(title="lift", len=0.6, thickness=10, x=1.05),  # right of the row titles
                hovertemplate="t=%{x}<br>expert %{y}<br>share %{customdata:.3f}<br>lift %{z:.2f}<extra>"
                              + f"layer {layer} step {step}</extra>",
                meta=[int(layer), int(step)]), row=i + 1, col=j + 1)
    fig.update_annotations(font_size=12)  # the row and column titles
    # at most about 10 labelled timesteps per panel: each label is measured in the browser before it is drawn
    n_timesteps = max(len(trace.x) for trace in fig.data) if fig.data else 1
    fig.update_xaxes(title_text="", tickfont_size=9, type="category", tick0=0, dtick=-(-n_timesteps // 10))
    fig.update_layout(height=min(620, 170 + 150 * len(layers)), margin=dict(l=40, r=30, t=50, b=30),
                      title=dict(text="Expert share by diffusion timestep (noise → clean), lift over 1/K",
                                 font_size=13))
    return fig


def timestep_labels(values: np.ndarray) -> list[str]:
    """Category labels of timestep values, with as few decimals as keep them apart (two timesteps
    under one label would be drawn as one column)."""
    for decimals in range(4):
        labels = [f"{v:.{decimals}f}" for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{v:.6g}" for v in values]


def overview_figure(ctx: Context, tid: str) -> go.Figure:
    """`share_figure` of the trace's report, built once per trace version: the warm-up builds it
    before the page asks (0.2 s for 4 layers x 5 steps, most of it `make_subplots`)."""
    return ctx.cached(tid, "overview-share", lambda: share_figure(ctx.registry.report(tid)))


def evidence(report: dict, layer: int, step: int) -> html.Div:
    lo = report["layers"].get(str(layer))
    if lo is None:
        return message(f"layer {layer} is not in the report", "warn")
    d = lo["steps"].get(str(int(report["trace"]["steps"][step])))
    if d is None:
        return message(f"recursion step {step} is not in the report", "warn")
    mis = dict(d.get("mi", {}))  # this step's labels, and the recursion step (one MI per layer)
    if "recursion_step" in lo.get("mi", {}):
        mis["recursion_step (layer)"] = lo["mi"]["recursion_step"]
    names = list(mis)
    mi = [mis[k].get("mi") for k in names]
    null_hi = [(mis[k].get("null_mean") or 0) + 2 * (mis[k].get("null_std") or 0) for k in names]
    fig = go.Figure([
        go.Bar(x=names, y=[m if m is not None else 0 for m in mi], name="MI (nats)", marker_color="#1f77b4",
               customdata=[[mis[k].get("p_value"), mis[k].get("ami"), mis[k].get("n")] for k in names],
               hovertemplate="%{x}<br>MI %{y:.4f} nats<br>p %{customdata[0]}<br>AMI %{customdata[1]:.4f}"
                             "<br>n %{customdata[2]}<extra></extra>"),
        go.Scatter(x=names, y=null_hi, mode="markers", marker=dict(symbol="line-ew", size=22, line_width=2,
                                                                  color="#d62728"),
                   name="null mean + 2 sd"),
    ])
    fig.update_layout(height=260, margin=dict(l=40, r=10, t=50, b=60), title=dict(  # legend under the title
        text=f"MI of the expert with each label, layer {layer} step {step}", font_size=12, y=0.97, yanchor="top"),
        legend=dict(orientation="h", y=1.02, yanchor="bottom", font_size=10), yaxis_title="nats")
    rows = [html.Tr([html.Th(h) for h in ("label", "MI", "null ± sd", "p", "AMI")])]
    for k in names:
        m = mis[k]
        rows.append(html.Tr([html.Td(k), html.Td(fmt(m.get("mi"), "{:.4f}")),
                             html.Td(f"{fmt(m.get('null_mean'), '{:.4f}')} ± {fmt(m.get('null_std'), '{:.4f}')}"),
                             html.Td(fmt(m.get("p_value"), "{:.3g}")), html.Td(fmt(m.get("ami"), "{:.4f}"))]))
    g = d.get("gate") or {}
    gate_lines = [html.Div(f"gate entropy {fmt(g.get('mean_entropy'), '{:.3f}')} nats "
                           f"(normalised {fmt(g.get('mean_norm_entropy'), '{:.3f}')}), top-1 margin "
                           f"{fmt(g.get('mean_margin'), '{:.3f}')}, sampled ≠ argmax "
                           f"{fmt(g.get('disagreement'), '{:.3f}')}")] if g.get("n") else \
        [html.Div("gate probabilities not stored (record with --probs): entropy and margin unknown")]
    if flat_gate(g):
        gate_lines.append(html.Div(f"⚠ argmax over a flat gate: mean top-1 margin {g['mean_margin']:.3f} < "
                                   f"{FLAT_GATE_MARGIN} (soft MI {fmt(g.get('soft_mi'), '{:.4f}')} nats): the gate "
                                   f"is nearly uniform and the chosen expert is decided by tiny probability "
                                   f"differences, so it flips under small perturbations; routing structure here is "
                                   f"structure of those differences, not of confident choices", className="flag"))
    if d.get("verdict"):  # the report's verdict for this layer and step (probes.verdict), with its evidence
        gate_lines.append(html.Div(f"verdict: {d['verdict']['text']}", className="verdict", id="overview-verdict"))
    gate_lines.append(html.Div(_value_source(report), className="hint"))
    ld = d.get("load", {})
    gate_lines.append(html.Div(f"load: effective experts {fmt(ld.get('effective_experts'), '{:.2f}')} of "
                               f"{report['trace']['experts']}, CV {fmt(ld.get('cv'), '{:.2f}')}, "
                               f"dead {ld.get('n_dead')}"))
    return html.Div([dcc.Graph(figure=fig, config=GRAPH_CONFIG, id="overview-mi"),
                     html.Table(rows, className="evidence"), html.Div(gate_lines)], className="panel",
                    style={"width": "440px"})


def _value_source(report: dict) -> str:
    """Where the verdict's routing value came from, or how to make one."""
    rv = report.get("routing_value")
    if rv is None:
        return ("no probes.routing_value result for this trace's checkpoint beside the trace or the checkpoint: "
                "python -m probes.routing_value --ckpt CKPT --json routing_value.json (in the trace's folder)")
    return (f"routing value of checkpoint {str(rv.get('checkpoint', '?')).rsplit('/', 1)[-1]} "
            f"(sha256 {str(rv.get('checkpoint_sha256', ''))[:12]}; schema {rv.get('schema_version')}, "
            f"{rv.get('held_out_sets', 1)} held-out set(s), {rv.get('random_draws')} draws)")


def register(app: dash.Dash, ctx: Context) -> None:
    @view_body(app, VIEW.key, Output("overview-body", "children"), Input("sel-layer", "value"),
               Input("sel-step", "value"), Input("version", "data"))
    def render(tid, layer, step, _version):
        report = ctx.registry.report(tid)
        K = report["trace"]["experts"]
        buttons = [html.Button(f"expert {k} →", id={"type": "open-expert", "k": k}, className="btn")
                   for k in range(K)]
        return html.Div([
            html.Div([dcc.Graph(id="overview-share", figure=overview_figure(ctx, tid), config=GRAPH_CONFIG)],
                     className="panel", style={"flex": "1", "minWidth": "520px"}),
            html.Div([evidence(report, layer, step or 0),
                      html.Div(["open an expert's page: ", *buttons])]),
        ], className="cols")

    @app.callback(Output("nav", "data", allow_duplicate=True), Input({"type": "open-expert", "k": ALL}, "n_clicks"),
                  prevent_initial_call=True)
    @guarded(failed=in_status())
    def open_expert(clicks):
        if not any(clicks or []):
            return dash.no_update
        return {"expert": dash.ctx.triggered_id["k"], "view": "expert"}

    @app.callback(Output("nav", "data", allow_duplicate=True), Input("overview-share", "clickData"),
                  State("sel-trace", "value"), prevent_initial_call=True)
    @guarded(failed=lambda _msg: dash.no_update)  # the figure clicked on came from this report: no new failure
    def pick_cell(click, tid):
        """A click on a cell selects its timestep, layer, step and expert."""
        if not click:
            return dash.no_update
        pt = click["points"][0]
        report = ctx.registry.report(tid)
        meta = None
        fig_curve = pt.get("curveNumber", 0)
        layers = report["layers"]
        flat = [(int(layer), int(s)) for layer, lo in layers.items() for s in lo["steps"]]
        if fig_curve < len(flat):
            meta = flat[fig_curve]
        nav = {"expert": int(str(pt["y"]).lstrip("e"))}
        if meta:
            nav["layer"] = meta[0]
            nav["step"] = [int(s) for s in report["trace"]["steps"]].index(meta[1])
        if report["trace"]["kind"] == "sampling":
            tv = [f"{v:.0f}" for v in report["trace"]["timestep_values"]]
            if str(pt["x"]) in tv:
                nav["t"] = tv.index(str(pt["x"]))
        return nav


VIEW = View("overview", "Specialization", layout, register)

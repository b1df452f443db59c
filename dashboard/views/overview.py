"""View 1, specialization overview: the paper's Figure 4 made interactive, beside the evidence.

Left: expert share across diffusion timesteps for every (layer, recursion step), one heatmap row
per layer with the recursion steps side by side, coloured by lift over 1/K (share x K; 1 =
uniform), raw share on hover. Clicking a cell selects that
timestep, layer, step and expert. Right: for the selected layer and step, the mutual
information of the expert with each label against its permutation null (bar = MI, whisker =
null mean + 2 sd), with p-value and AMI, and the gate's entropy and top-1 margin; a gate
whose mean margin is below `probes.views.FLAT_GATE_MARGIN` is flagged as a flat gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import dash
import numpy as np
import plotly.graph_objects as go
from dash import ALL, Input, Output, State, dcc, html
from plotly.subplots import make_subplots

from probes.views import FLAT_GATE_MARGIN, flat_gate, timestep_axis, timestep_lift

from ..common import GRAPH_CONFIG, Context, View, fmt, guarded, in_status, message, view_body


def layout(ctx: Context):
    return html.Div(id="overview-body")


@dataclass
class ShareGrid:
    """Where each (layer, recursion step, timestep) of a report sits in the overview: one heatmap row per
    layer, the recursion steps side by side in it, each a block of `n_timesteps` columns (noisiest first)
    followed by one empty column. `share_figure` draws it; a click is read back with `cell_at`."""

    layers: list[int]
    steps: list[list[int]]  # per layer, its recursion steps in order
    labels: list[str]  # timestep labels of a block's columns, noisiest first
    order: list[int]  # per block column, the index of its timestep in the report's order

    @property
    def width(self) -> int:
        return len(self.labels) + 1  # a step's columns and the empty one after it

    def columns(self, row: int) -> list[str]:
        """The category of each column of a layer's row: "t=<timestep> · step <s>", and in each gap a
        label of spaces of its own (categories must differ; the hover shows the name)."""
        names = []
        for j, step in enumerate(self.steps[row]):
            names += [f"t={label} · step {step}" for label in self.labels] + [" " * (j + 1)]
        return names[:-1]

    def cell_at(self, row: int, name: str) -> tuple[int, int, int] | None:
        """(layer, step, index of the timestep in the report's order) at a heatmap cell of a row, by its
        column's category; None in a gap or outside the grid."""
        if not 0 <= row < len(self.layers) or name not in (names := self.columns(row)):
            return None
        block, at = divmod(names.index(name), self.width)
        if at == len(self.labels):  # the empty column after a step
            return None
        return self.layers[row], self.steps[row][block], self.order[at]


def share_grid(report: dict) -> ShareGrid:
    """The overview's layout of a report (`ShareGrid`)."""
    x = timestep_axis(report)
    order = np.argsort(-x, kind="stable")  # noisiest first, as the title says (training bins run up)
    return ShareGrid(layers=[int(layer) for layer in report["layers"]],
                     steps=[[int(s) for s in lo["steps"]] for lo in report["layers"].values()],
                     labels=timestep_labels(x[order]), order=order.tolist())


def share_figure(report: dict) -> go.Figure:
    """Expert share by timestep, coloured by lift over 1/K, for every (layer, recursion step): the
    paper's Figure 4. One heatmap per layer with the steps side by side (`ShareGrid`), not one panel
    per (layer, step): a plotly subplot costs the browser its axes and drag layers, and 4 layers x 5
    steps drew in 80-95 ms as 4 rows against 310-440 ms as 20 panels (fresh headless Chromium page)."""
    grid, K = share_grid(report), report["trace"]["experts"]
    n_t, width = len(grid.labels), grid.width
    fig = make_subplots(rows=len(grid.layers), cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        row_titles=[f"layer {layer}" for layer in grid.layers])
    for i, (layer, lo) in enumerate(report["layers"].items()):
        lift = np.full((K, len(lo["steps"]) * width - 1), np.nan)  # (expert, column), NaN in the gaps
        for j, cell in enumerate(lo["steps"].values()):
            lift[:, j * width: j * width + n_t] = timestep_lift(report, cell)[grid.order].T
        fig.add_trace(go.Heatmap(
            z=lift, customdata=lift / K, x=grid.columns(i), y=[f"e{k}" for k in range(K)], hoverongaps=False,
            # lift runs 0..K (K: the expert takes every token); a cap at 2 made every specialised cell alike
            zmin=0, zmax=K, zmid=1, colorscale="RdBu_r", showscale=(i == 0),
            colorbar=dict(title="lift", len=0.6, thickness=10, x=1.05),  # right of the row titles
            hovertemplate="%{x}<br>expert %{y}<br>share %{customdata:.3f}<br>lift %{z:.2f}<extra>"
                          + f"layer {layer}</extra>",
            meta=int(layer)), row=i + 1, col=1)
        fig.update_yaxes(showgrid=False, row=i + 1, col=1)
    every = -(-n_t // 10)  # at most about 10 labelled timesteps per step: each label is measured before drawing
    widest = max(range(len(grid.layers)), key=lambda row: len(grid.steps[row]))
    names = grid.columns(widest)
    ticks = [j * width + c for j in range(len(grid.steps[widest])) for c in range(0, n_t, every)]
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names, tickvals=[names[t] for t in ticks],
                     ticktext=[grid.labels[t % width] for t in ticks], tickfont_size=9, showgrid=False)
    for j, step in enumerate(grid.steps[widest]):
        fig.add_annotation(text=f"step {step}", x=j * width + (n_t - 1) / 2, xref="x", y=1.0, yref="paper",
                           yanchor="bottom", showarrow=False)
    fig.update_annotations(font_size=12)  # the step and layer titles
    fig.update_layout(height=min(620, 170 + 150 * len(grid.layers)), margin=dict(l=40, r=30, t=60, b=30),
                      plot_bgcolor="white",  # the gaps between the steps
                      title=dict(text="Expert share by diffusion timestep (noise → clean), lift over 1/K",
                                 font_size=13))
    return fig


def timestep_labels(values: np.ndarray) -> list[str]:
    """Category labels of timestep values, with as few decimals as keep them apart (two timesteps
    under one label would read as one)."""
    for decimals in range(4):
        labels = [f"{v:.{decimals}f}" for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{v:.6g}" for v in values]


def overview_figure(ctx: Context, tid: str) -> go.Figure:
    """`share_figure` of the trace's report, built once per trace version: the warm-up builds it
    before the page asks (0.1-0.13 s for 4 layers x 5 steps once plotly is warm)."""
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
        cell = share_grid(report).cell_at(pt.get("curveNumber", 0), str(pt.get("x")))
        if cell is None:  # the empty column between two steps
            return dash.no_update
        layer, step, timestep = cell
        nav = {"expert": int(str(pt["y"]).lstrip("e")), "layer": layer,
               "step": [int(s) for s in report["trace"]["steps"]].index(step)}
        if report["trace"]["kind"] == "sampling":
            nav["t"] = timestep
        return nav


VIEW = View("overview", "Specialization", layout, register)

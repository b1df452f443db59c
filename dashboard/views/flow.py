"""View 3, recursion flow: how tokens move between experts from one recursion step to the next.

Transition matrices P(expert at s+1 | expert at s) from the report, headed by how determined
the next expert is: the conditional entropy H(next | current) against H(next), its value
if consecutive steps were independent (0 = the current expert fixes the next one, whatever
the persistence), with the persistence and its chance level beside it; and a Sankey of expert
paths step 0 -> 1 -> ... whose grey links show the chance flow. Over all timesteps from the
report; per timestep bin from `probes.views.bin_transitions` (the report keeps no per-bin
matrices). Flows come from `probes.views.transition_flows`.
"""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html
from plotly.subplots import make_subplots

from probes.views import bin_transitions, transition_flows

from ..common import GRAPH_CONFIG, Context, View, expert_colour, fmt, view_body

ALL_BINS = {"label": "all timesteps", "value": "all"}


def layout(ctx: Context):
    return html.Div([
        html.Div([html.Label("timestep bin "), dcc.Dropdown(id="flow-bin", value="all", clearable=False,
                                                             options=[ALL_BINS], style={"width": "260px"})],
                 className="row"),
        html.Div(id="flow-body"),
    ])


def matrices_figure(report: dict, layer: str) -> go.Figure:
    """The transition matrices of `report` (the report, or one bin's `flow_report`) at `layer`."""
    trans = report["layers"][layer].get("transitions", {})
    K = report["trace"]["experts"]
    keys = list(trans)
    fig = make_subplots(rows=1, cols=max(1, len(keys)), subplot_titles=[headline(k, trans[k]) for k in keys] or [""])
    for i, k in enumerate(keys):
        m = np.asarray(trans[k]["matrix"], float)
        fig.add_trace(go.Heatmap(z=m, x=[f"e{j}" for j in range(K)], y=[f"e{j}" for j in range(K)], zmin=0, zmax=1,
                                 colorscale="Blues", showscale=i == 0, text=np.round(m, 2), texttemplate="%{text}",
                                 colorbar=dict(title="P(to | from)", thickness=10),
                                 hovertemplate="from %{y} to %{x}: %{z:.3f}<extra></extra>"), row=1, col=i + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="from (step s)", col=1)
    fig.update_xaxes(title_text="to (step s+1)")
    fig.update_layout(height=340, margin=dict(l=50, r=10, t=80, b=40), title=dict(
        text=f"layer {layer}: transition matrices between recursion steps", font_size=12, y=0.98, yanchor="top"))
    fig.update_annotations(font_size=11)
    return fig


def headline(pair: str, stats: dict) -> str:
    """How determined the next expert is (conditional entropy against its independent-steps value,
    both in nats, from the report), then persistence against its chance level."""
    return (f"step {pair}: H(next | current) {fmt(stats.get('cond_entropy'), '{:.2f}')} "
            f"vs {fmt(stats.get('next_entropy'), '{:.2f}')} if independent<br>"
            f"persistence {fmt(stats.get('persistence'), '{:.2f}')} vs chance {fmt(stats.get('chance'), '{:.2f}')}")


def flow_report(ctx: Context, tid: str, layer: int, time_bin: int | None) -> dict:
    """The report, or for a timestep bin a report-shaped dict of that bin's transitions and loads."""
    report = ctx.registry.report(tid)
    if time_bin is None:
        return report
    bins = report["timestep_bins"]
    if not 0 <= time_bin < len(bins):
        raise LookupError(f"timestep bin {time_bin}: this trace has bins 0..{len(bins) - 1}")
    tr = ctx.registry.reader(tid)
    part = ctx.cached(tid, "bin-transitions", lambda: bin_transitions(tr, layer, bins[time_bin]["timesteps"]),
                      layer, time_bin)
    return {"trace": report["trace"], "layers": {str(layer): part}}


def sankey_figure(report: dict, layer: str) -> go.Figure:
    K = report["trace"]["experts"]
    flows = transition_flows(report, layer)
    steps = flows["steps"]
    labels = [f"s{s} e{k}" for s in steps for k in range(K)]
    colours = [expert_colour(k) for _ in steps for k in range(K)]
    src, dst, val, col = [], [], [], []
    for link in flows["links"]:
        a, b = steps.index(link["from_step"]), steps.index(link["to_step"])
        f, c = np.asarray(link["flow"]), np.asarray(link["chance"])
        for i in range(K):
            for j in range(K):
                if f[i, j] > 0:
                    src.append(a * K + i)
                    dst.append(b * K + j)
                    val.append(f[i, j])
                    col.append("rgba(31,119,180,0.35)" if f[i, j] >= c[i, j] else "rgba(150,150,150,0.35)")
    hover = "%{source.label} → %{target.label}: %{value:.3f}<extra></extra>"
    fig = go.Figure(go.Sankey(node=dict(label=labels, color=colours, pad=8, thickness=12),
                              link=dict(source=src, target=dst, value=val, color=col, hovertemplate=hover)))
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), title=dict(
        text="expert paths across recursion steps (share of tokens; blue = above chance, grey = at or below)",
        font_size=12))
    return fig


def register(app: dash.Dash, ctx: Context) -> None:
    @view_body(app, VIEW.key, Output("flow-bin", "options"), failed=lambda _msg: [ALL_BINS])  # the body says why
    def bins(tid):
        return [ALL_BINS] + [{"label": f"bin {b['bin']}: t {b['t_max']:.0f}…{b['t_min']:.0f}", "value": b["bin"]}
                             for b in ctx.registry.report(tid)["timestep_bins"]]

    @view_body(app, VIEW.key, Output("flow-body", "children"), Input("sel-layer", "value"), Input("flow-bin", "value"),
               Input("version", "data"))
    def render(tid, layer, time_bin, _version):
        time_bin = None if time_bin in (None, "all") else int(time_bin)
        report = flow_report(ctx, tid, int(layer), time_bin)
        if not report["layers"][str(layer)].get("transitions"):
            return html.Div("fewer than two consecutive recursion steps recorded: no transitions")
        return html.Div([
            html.Div(dcc.Graph(figure=matrices_figure(report, str(layer)), config=GRAPH_CONFIG),
                     className="panel"),
            html.Div(dcc.Graph(figure=sankey_figure(report, str(layer)), config=GRAPH_CONFIG),
                     className="panel"),
        ])


VIEW = View("flow", "Recursion flow", layout, register)

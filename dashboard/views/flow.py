"""View 3, recursion flow: how tokens move between experts from one recursion step to the next.

Transition matrices P(expert at s+1 | expert at s) from the report, with the persistence
against its chance level (independent steps with the same marginals), and a Sankey of
expert paths step 0 -> 1 -> ... whose grey links show the chance flow. All per timestep bin
or over all timesteps. Flows come from `probes.views.transition_flows`.
"""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html
from plotly.subplots import make_subplots

from probes.views import transition_flows

from ..common import GRAPH_CONFIG, Context, View, expert_colour, fmt, view_body

ALL_BINS = {"label": "all timesteps", "value": "all"}


def layout(ctx: Context):
    return html.Div([
        html.Div([html.Label("timestep bin "), dcc.Dropdown(id="flow-bin", value="all", clearable=False,
                                                             options=[ALL_BINS], style={"width": "260px"})],
                 className="row"),
        html.Div(id="flow-body"),
    ])


def matrices_figure(report: dict, layer: str, time_bin: int | None) -> go.Figure:
    trans = report["layers"][layer].get("transitions", {})
    K = report["trace"]["experts"]
    keys = list(trans)
    fig = make_subplots(rows=1, cols=max(1, len(keys)), subplot_titles=[
        f"step {k}: persistence {fmt(_at(trans[k], time_bin).get('persistence'), '{:.2f}')} "
        f"vs chance {fmt(_at(trans[k], time_bin).get('chance'), '{:.2f}')}" for k in keys] or [""])
    for i, k in enumerate(keys):
        m = np.asarray(_at(trans[k], time_bin)["matrix"], float)
        fig.add_trace(go.Heatmap(z=m, x=[f"e{j}" for j in range(K)], y=[f"e{j}" for j in range(K)], zmin=0, zmax=1,
                                 colorscale="Blues", showscale=i == 0, text=np.round(m, 2), texttemplate="%{text}",
                                 hovertemplate="from %{y} to %{x}: %{z:.3f}<extra></extra>"), row=1, col=i + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="from (step s)", col=1)
    fig.update_xaxes(title_text="to (step s+1)")
    fig.update_layout(height=300, margin=dict(l=50, r=10, t=40, b=40), title=dict(
        text=f"layer {layer}: transition matrices between recursion steps", font_size=12))
    fig.update_annotations(font_size=11)
    return fig


def _at(tr_: dict, time_bin: int | None) -> dict:
    return tr_ if time_bin is None else tr_["by_timestep_bin"][time_bin]


def sankey_figure(report: dict, layer: str, time_bin: int | None) -> go.Figure:
    K = report["trace"]["experts"]
    flows = transition_flows(report, layer, time_bin)
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
        report = ctx.registry.report(tid)
        time_bin = None if time_bin in (None, "all") else int(time_bin)
        if not report["layers"][str(layer)].get("transitions"):
            return html.Div("fewer than two consecutive recursion steps recorded: no transitions")
        return html.Div([
            html.Div(dcc.Graph(figure=matrices_figure(report, str(layer), time_bin), config=GRAPH_CONFIG),
                     className="panel"),
            html.Div(dcc.Graph(figure=sankey_figure(report, str(layer), time_bin), config=GRAPH_CONFIG),
                     className="panel"),
        ])


VIEW = View("flow", "Recursion flow", layout, register)

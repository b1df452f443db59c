"""View 9, compare: two traces on the same grid (same prompts, seeds, timesteps, layers, steps;
e.g. RSR against an ablation, or two checkpoints). Routing agreement and Cohen's kappa per
layer and recursion step and per timestep bin (`probes.analysis.compare_traces`), and the
difference of their load shares per expert (from the two reports)."""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html
from plotly.subplots import make_subplots

from probes.views import share_difference

from ..common import GRAPH_CONFIG, Context, View, expert_colour, fmt, guarded, message, view_body


def layout(ctx: Context):
    return html.Div([
        html.Div([html.Label("compare the selected trace with "),
                  dcc.Dropdown(id="cmp-other", clearable=True, style={"width": "300px"})], className="row"),
        dcc.Loading(html.Div(id="compare-body")),
    ])


def agreement_figure(cmp: dict) -> go.Figure:
    layers = list(cmp["layers"])
    steps = list(next(iter(cmp["layers"].values())))
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Cohen's kappa (0 = chance agreement)",
                                                        "kappa by timestep bin (noise → clean)"])
    def table(key: str) -> np.ndarray:  # (layer, step); None (undefined) -> NaN, a kappa of 0 stays 0
        return np.array([[cmp["layers"][layer][s].get(key) for s in steps] for layer in layers], float)

    kappa, agree = table("kappa"), table("agreement")
    fig.add_trace(go.Heatmap(z=kappa, x=[f"step {s}" for s in steps], y=[f"layer {layer}" for layer in layers], zmin=-1,
                             zmax=1, colorscale="RdBu_r", customdata=agree, showscale=False, text=np.round(kappa, 2),
                             texttemplate="%{text}", hovertemplate="%{y} %{x}<br>kappa %{z:.3f}<br>agreement "
                                                                   "%{customdata:.3f}<extra></extra>"), row=1, col=1)
    for layer in layers:
        for s in steps:
            bins = cmp["layers"][layer][s]["by_timestep_bin"]
            fig.add_trace(go.Scatter(x=list(range(len(bins))), y=[b.get("kappa") for b in bins], mode="lines+markers",
                                     name=f"L{layer} s{s}"), row=1, col=2)
    fig.update_xaxes(title_text="timestep bin", row=1, col=2)
    fig.update_layout(height=300, margin=dict(l=60, r=10, t=30, b=40), legend_font_size=9)
    return fig


def share_difference_figure(a: dict, b: dict) -> go.Figure:
    diff = share_difference(a, b)
    fig = go.Figure()
    for k in range(a["trace"]["experts"]):
        fig.add_trace(go.Bar(x=[f"L{cell.replace(' ', ' s')}" for cell in diff], y=[d[k] for d in diff.values()],
                             name=f"e{k}", marker_color=expert_colour(k)))
    fig.update_layout(barmode="group", height=260, margin=dict(l=50, r=10, t=30, b=40), yaxis_title="share B − A",
                      title=dict(text="load share difference per expert (other − selected)", font_size=12))
    return fig


def register(app: dash.Dash, ctx: Context) -> None:
    def same_kind(tid: str, ids: list[str]) -> list[str]:
        kind = ctx.registry.reader(tid).kind
        return [i for i in ids if ctx.registry.reader(i).kind == kind]

    @view_body(app, VIEW.key, [Output("cmp-other", "options"), Output("cmp-other", "value")],
               State("cmp-other", "value"))
    def others(tid, current):
        """The other readable traces; by default the first of the same kind (any, when the
        selected trace cannot be read: the body says why)."""
        opts = [o for o in ctx.registry.options() if o["value"] != tid and ctx.registry.entry(o["value"]).error is None]
        ids = [o["value"] for o in opts]
        same = guarded(same_kind, failed=lambda _msg: ids)(tid, ids)
        return opts, current if current in ids else (same[0] if same else None)

    @view_body(app, VIEW.key, Output("compare-body", "children"), Input("cmp-other", "value"))
    def render(tid, other):
        if other is None:
            return message("choose a second trace recorded with the same prompts, seeds and grid")
        cmp = ctx.registry.compare(tid, other)
        a, b = ctx.registry.report(tid), ctx.registry.report(other)
        return html.Div([
            html.Div(f"A = {ctx.registry.entry(tid).path.name}, B = {ctx.registry.entry(other).path.name}; kappa "
                     f"{fmt(cmp['overall']['kappa'], '{:.3f}')} (mean over layers and steps, weighted by records)",
                     id="cmp-kappa"),
            html.Div(dcc.Graph(figure=agreement_figure(cmp), config=GRAPH_CONFIG), className="panel"),
            html.Div(dcc.Graph(figure=share_difference_figure(a, b), config=GRAPH_CONFIG), className="panel"),
        ])


VIEW = View("compare", "Compare", layout, register)

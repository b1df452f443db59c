"""View 8, training health (training traces, `python -m rsr_model train --trace ...`): the
logged scalars (loss, balance, ...) over training steps, and from the recorded routing per
window of steps (`probes.views.training_curves`): load share per expert, normalised load
entropy, mean gate entropy and top-1 margin, and MI(expert; timestep bin) against its
permutation null. Follows a live run (the page's live poll bumps `version`)."""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html
from plotly.subplots import make_subplots

from probes.views import FLAT_GATE_MARGIN, training_curves

from ..common import GRAPH_CONFIG, Context, View, expert_colour, message, view_body


def layout(ctx: Context):
    return html.Div(id="training-body")


def scalars_figure(logs: dict[str, np.ndarray]) -> go.Figure:
    names = [k for k in logs if k != "step"]
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names or [""])
    for i, k in enumerate(names):
        fig.add_trace(go.Scatter(x=logs["step"], y=logs[k], mode="lines", name=k, showlegend=False), row=1, col=i + 1)
    fig.update_xaxes(title_text="training step")
    fig.update_layout(height=230, margin=dict(l=40, r=10, t=30, b=40))
    return fig


def routing_figure(cur: dict, K: int) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, subplot_titles=["load share per expert", "gate entropy / top-1 margin",
                                                         "MI(expert; timestep bin) vs null"])
    x = cur["step"]
    share = np.asarray(cur["share"], float)
    for k in range(K):
        fig.add_trace(go.Scatter(x=x, y=share[:, k], stackgroup="share", name=f"e{k}", line_color=expert_colour(k)),
                      row=1, col=1)
    if cur.get("gate_entropy") is not None:
        fig.add_trace(go.Scatter(x=x, y=cur["gate_entropy"], name="gate entropy (nats)"), row=1, col=2)
        fig.add_trace(go.Scatter(x=x, y=cur["margin"], name="top-1 margin"), row=1, col=2)
        fig.add_hline(y=FLAT_GATE_MARGIN, line_dash="dot", row=1, col=2, annotation_text="flat gate",
                      annotation_font_size=9)
    fig.add_trace(go.Scatter(x=x, y=cur["norm_entropy"], name="load entropy (normalised)"), row=1, col=2)
    null_hi = np.asarray(cur["mi_null_mean"], float) + 2 * np.asarray(cur["mi_null_std"], float)
    fig.add_trace(go.Scatter(x=x, y=null_hi, name="null mean + 2 sd", line=dict(dash="dot", color="#d62728")),
                  row=1, col=3)
    fig.add_trace(go.Scatter(x=x, y=cur["mi"], name="MI (nats)", customdata=cur["mi_p_value"],
                             hovertemplate="MI %{y:.4f}<br>p %{customdata:.3g}<extra></extra>"), row=1, col=3)
    fig.update_xaxes(title_text="training step")
    fig.update_layout(height=280, margin=dict(l=40, r=10, t=30, b=40), legend_font_size=9)
    return fig


def register(app: dash.Dash, ctx: Context) -> None:
    @view_body(app, VIEW.key, Output("training-body", "children"), Input("version", "data"))
    def render(tid, _version):
        tr = ctx.registry.reader(tid)
        if tr.kind != "training":
            return message("this is a sampling trace; training health needs a training trace "
                           "(`python -m rsr_model train ... --trace train.h5`)")
        logs = tr.train()
        cur = ctx.cached(tid, "training", lambda: training_curves(tr))
        K = len(tr.coords["expert"])
        live = "" if tr.complete else " (incomplete: updates while the run writes)"
        return html.Div([
            html.Div(f"{tr.n_events} routing events, {len(logs['step'])} logged steps{live}"),
            html.Div(dcc.Graph(figure=scalars_figure(logs), config=GRAPH_CONFIG), className="panel"),
            html.Div(dcc.Graph(figure=routing_figure(cur, K), config=GRAPH_CONFIG), className="panel")
            if len(cur["step"]) else message("no routing events recorded yet"),
        ])


VIEW = View("training", "Training health", layout, register)

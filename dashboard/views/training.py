"""View 8, training health (training traces, `python -m rsr_model train --trace ...`): the
logged scalars (loss, balance, ...) over training steps, and from the recorded routing per
window of steps the report's `training_curves.pooled` (`probes.analysis.families.training_curves`,
every layer and step pooled): load share per expert, normalised load entropy, mean normalised
gate entropy and top-1 margin, and MI(expert; timestep bin) against its permutation null. The
view computes no statistic: it draws the cached report (`dashboard.data.Registry.report`), which
is re-analysed while a live run writes (the page's live poll bumps `version`)."""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html
from plotly.subplots import make_subplots

from probes.views import FLAT_GATE_MARGIN

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


def window_steps(curves: dict) -> list[float]:
    """The x of each window: the middle of its first and last recorded training step."""
    return [0.5 * (a + b) for a, b in zip(curves["window_start_step"], curves["window_end_step"])]


def routing_figure(curves: dict, K: int) -> go.Figure:
    """The report's pooled training curves (`training_curves.pooled`), drawn as they are."""
    cur = curves["pooled"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=["load share per expert", "gate entropy / top-1 margin",
                                                         "MI(expert; timestep bin) vs null"])
    x = window_steps(curves)
    share = np.asarray(cur["load_share"], float)
    for k in range(K):
        fig.add_trace(go.Scatter(x=x, y=share[:, k], stackgroup="share", name=f"e{k}", line_color=expert_colour(k)),
                      row=1, col=1)
    if cur.get("gate_norm_entropy") is not None:
        fig.add_trace(go.Scatter(x=x, y=cur["gate_norm_entropy"], name="gate entropy / log K"), row=1, col=2)
        fig.add_trace(go.Scatter(x=x, y=cur["gate_margin"], name="top-1 margin"), row=1, col=2)
        fig.add_hline(y=FLAT_GATE_MARGIN, line_dash="dot", row=1, col=2, annotation_text="flat gate",
                      annotation_font_size=9)
    fig.add_trace(go.Scatter(x=x, y=cur["load_norm_entropy"], name="load entropy (normalised)"), row=1, col=2)
    mi = cur["mi_timestep_bin"]
    null_hi = np.asarray(mi["null_mean"], float) + 2 * np.asarray(mi["null_std"], float)
    fig.add_trace(go.Scatter(x=x, y=null_hi, name="null mean + 2 sd", line=dict(dash="dot", color="#d62728")),
                  row=1, col=3)
    fig.add_trace(go.Scatter(x=x, y=mi["mi"], name="MI (nats)", customdata=mi["p_value"],
                             hovertemplate="MI %{y:.4f}<br>p %{customdata:.3g}<extra></extra>"), row=1, col=3)
    fig.update_xaxes(title_text="training step")
    # the legend below the three panels: at the right it was cut off by the panel's width
    fig.update_layout(height=340, margin=dict(l=40, r=10, t=30, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.28, x=0, font_size=9))
    return fig


def register(app: dash.Dash, ctx: Context) -> None:
    @view_body(app, VIEW.key, Output("training-body", "children"), Input("version", "data"))
    def render(tid, _version):
        tr = ctx.registry.reader(tid)
        if tr.kind != "training":
            return message("this is a sampling trace; training health needs a training trace "
                           "(`python -m rsr_model train ... --trace train.h5`)")
        logs = tr.train()
        curves = ctx.registry.report(tid).get("training_curves")  # the report's, cached beside the trace
        K = len(tr.coords["expert"])
        live = "" if tr.complete else " (incomplete: updates while the run writes)"
        return html.Div([
            html.Div(f"{tr.n_events} routing events, {len(logs['step'])} logged steps{live}"),
            html.Div(dcc.Graph(figure=scalars_figure(logs), config=GRAPH_CONFIG), className="panel"),
            html.Div(dcc.Graph(figure=routing_figure(curves, K), config=GRAPH_CONFIG), className="panel")
            if curves and sum(curves["records"]) else message("no routing events recorded yet"),
        ])


VIEW = View("training", "Training health", layout, register)

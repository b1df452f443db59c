"""View 5, expert page (SAE-Vis / Neuronpedia style), for the selected expert k:

* when it fires: its lift over 1/K across timesteps, one line per (layer, step);
* where: lift map over the token grid at the selected layer and step (counts from
  `probes.views.expert_position_counts`, relative to the expert's overall share);
* what it prefers: lift P(k | label) / P(k) per prompt and prompt attribute, with the
  label's MI p-value (from the report);
* its top tokens as image crops (`probes.views.top_tokens`, highest gate probability);
* which experts it follows / precedes across recursion steps (report transitions) vs chance;
* its causal effect when a `probes.causal` result is stored beside the trace
  (`<trace>.causal.json`) or the trace was recorded under an intervention.
"""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html

from probes.views import expert_position_counts, position_lift, timestep_axis, timestep_lift, top_tokens

from ..common import GRAPH_CONFIG, Context, View, expert_colour, fmt, message, png_uri, view_body
from .routing import token_grid

CROP_TOKENS = 3  # crop = this many tokens square around the token
CROP_PX = 72


def layout(ctx: Context):
    return html.Div(id="expert-body")


def timing_figure(report: dict, k: int) -> go.Figure:
    fig = go.Figure()
    x = timestep_axis(report)
    for layer, lo in report["layers"].items():
        for step, d in lo["steps"].items():
            fig.add_trace(go.Scatter(x=x, y=timestep_lift(report, d)[:, k], mode="lines+markers",
                                     name=f"L{layer} s{step}"))
    fig.add_hline(y=1, line_dash="dot", annotation_text="uniform (1/K)", annotation_font_size=10)
    fig.update_xaxes(autorange="reversed", title="diffusion timestep (noise → clean)")
    fig.update_layout(height=260, margin=dict(l=40, r=10, t=30, b=40), yaxis_title="lift",
                      title=dict(text=f"expert {k}: lift over 1/K by timestep", font_size=12), legend_font_size=9)
    return fig


def position_figure(counts: np.ndarray, k: int, grid: tuple[int, int], tokens: np.ndarray) -> go.Figure:
    """Lift of expert k per token on one fixed scale, 0..K with 1 (no preference) white: an
    auto-scaled map turns +-0.5 % noise into structure."""
    K = counts.shape[0]
    z = np.full(grid[0] * grid[1], np.nan)
    z[tokens] = position_lift(counts)[k]
    fig = go.Figure(go.Heatmap(z=z.reshape(grid), zmin=0, zmax=K, zmid=1, colorscale="RdBu_r",
                               colorbar=dict(title="lift", thickness=10),
                               hovertemplate="row %{y}, col %{x}<br>lift %{z:.2f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    fig.update_layout(height=260, width=300, margin=dict(l=30, r=10, t=30, b=20),
                      title=dict(text="where (lift per token)", font_size=12))
    return fig


def preference_figure(report: dict, layer: int, step_value: int, k: int) -> go.Figure:
    d = report["layers"][str(layer)]["steps"][str(step_value)]
    fig = go.Figure()
    for label, m in d.get("mi", {}).items():
        if label in ("timestep_bin", "position") or not m.get("lift"):
            continue
        names = [str(x) for x in m.get("labels", [])]
        lift = np.asarray(m["lift"], float)[k]
        # the p-value tests the label against the choice among all experts, not this expert alone
        fig.add_trace(go.Bar(x=[f"{label}: {n}"[:32] for n in names], y=lift,
                             name=f"{label} (p={fmt(m.get('p_value'), '{:.2g}')})"))
    fig.add_hline(y=1, line_dash="dot")
    # title (two lines), then the legend in one row, then the bars; the long tick labels below get
    # their own room (automargin): none of them runs into another or squeezes the bars
    fig.update_layout(height=380, margin=dict(l=45, r=10, t=90, b=10), yaxis=dict(title="lift", automargin=True),
                      title=dict(text="prompts and attributes it prefers: lift P(k|label) / P(k)<br><sup>p: "
                                      "permutation test of the label's MI with the routing (all experts)</sup>",
                                 font_size=12, x=0.01, y=0.96, yanchor="top"),
                      legend=dict(orientation="h", x=0, y=1.02, yanchor="bottom", font_size=9),
                      xaxis=dict(tickfont_size=9, automargin=True))
    return fig


def neighbours(report: dict, layer: int, k: int) -> html.Div:
    lo = report["layers"][str(layer)]
    rows = []
    for key, tr_ in lo.get("transitions", {}).items():
        m = np.asarray(tr_["matrix"], float)
        nxt, prev = m[k], m[:, k]
        rows.append(html.Div(f"{key}: after expert {k} → " + top_three(nxt, f"expert {k} is never chosen at step "
                                                                           f"{key.split('->')[0]}")
                             + f"; P(stay) chance {fmt(tr_.get('chance'), '{:.2f}')}; into {k} from: "
                             + top_three(prev, "no step-s expert was counted")))
    return html.Div([html.H3("follows / precedes (recursion steps)")] + (rows or ["no consecutive recorded steps"]),
                    className="panel", style={"maxWidth": "600px"})


INACTIVE_SHARE = 0.01  # below this share of tokens the per-token maps and crops show noise, not a preference


def inactive(report: dict, layer: int, step_value: int, k: int) -> str | None:
    """Why expert k's token maps are not drawn at (layer, step) -- it is (almost) never chosen
    there -- naming the steps where it is; None when it is active."""
    steps = report["layers"][str(layer)]["steps"]
    share = steps[str(step_value)]["load"]["share"][k]
    if share is None or not np.isfinite(share) or share >= INACTIVE_SHARE:
        return None
    active = [f"step {s} ({d['load']['share'][k]:.1%})" for s, d in steps.items()
              if d["load"]["share"][k] is not None and d["load"]["share"][k] >= INACTIVE_SHARE]
    return (f"expert {k} takes {share:.2%} of the tokens at layer {layer}, step {step_value}: its lift map and "
            "crops here would show noise, so they are not drawn. "
            + (f"It is active at {', '.join(active)}." if active else "It is active at no recorded step here."))


def top_three(p: np.ndarray, none: str) -> str:
    """The three largest finite probabilities as 'e1 0.80, e0 0.15, ...'; `none` when there are
    none (an expert never chosen has a row of NaN: no transitions from it, not 'nan')."""
    finite = [(j, v) for j, v in enumerate(p) if np.isfinite(v)]
    if not finite:
        return none
    return ", ".join(f"e{j} {v:.2f}" for j, v in sorted(finite, key=lambda x: -x[1])[:3])


def crops(tr, k: int, layer: int, step: int) -> html.Div:
    if not tr.has("/decoded/final"):
        return html.Div("no final images in this trace (record with --decode) — no crops", className="panel")
    h, w = token_grid(tr)
    best = top_tokens(tr, k, layer, step, n=16)
    figs = []
    for b in best:
        im = tr.final(sample=b["sample"])
        ph, pw = im.shape[0] // h, im.shape[1] // w
        r, c = divmod(b["token"], w)
        r0, c0 = max(0, r - CROP_TOKENS // 2) * ph, max(0, c - CROP_TOKENS // 2) * pw
        crop = im[r0:r0 + CROP_TOKENS * ph, c0:c0 + CROP_TOKENS * pw]
        p = "" if b["prob"] is None else f"p={b['prob']:.2f}"
        figs.append(html.Figure([html.Img(src=png_uri(crop, max(1, CROP_PX // max(crop.shape[:2]))), width=CROP_PX),
                                 html.Figcaption(f"s{b['sample']} {b['branch']} t={b['timestep_value']:.0f} {p}")]))
    title = (f"top tokens (highest gate probability; uniform = 1/K = {1 / len(tr.coords['expert']):.2f}), crops of "
             f"the final image") if tr.has("/routing/prob") else \
        "tokens routed to it (no gate probabilities stored), crops of the final image"
    return html.Div([html.H3(title), html.Div(figs or ["never chosen here"], className="crops")], className="panel",
                    style={"maxWidth": "640px"})


def causal(ctx: Context, tid: str, tr, k: int) -> html.Div:
    lines = []
    result = ctx.registry.causal(tid)
    if result:
        for kind in ("ablate", "force"):
            r = result.get(f"{kind}:{k}")
            if r:
                lines.append(html.Div(f"{kind} expert {k}: denoiser relative change "
                                      f"{fmt(r['denoiser'].get('pooled_relative_change'), '{:.3g}')}, "
                                      f"image mean |diff| {fmt(r.get('image_mean_abs_diff'), '{:.3g}')} / 255"))
        if "interventions" in result and any(iv.get("expert") == k for iv in result["interventions"]):
            lines.append(html.Div(f"{result['interventions']}: denoiser relative change "
                                  f"{fmt(result['denoiser'].get('pooled_relative_change'), '{:.3g}')}, "
                                  f"image mean |diff| {fmt(result.get('image_mean_abs_diff'), '{:.3g}')} / 255"))
    ivs = tr.attrs.get("interventions") or []
    for iv in ivs if isinstance(ivs, list) else []:
        if iv.get("expert") == k:
            lines.append(html.Div(f"this trace was recorded under {iv['kind']} of expert {k}"))
    if not lines:
        lines = ["no causal result stored for this expert: run `python -m probes.causal ... --json "
                 "<trace>.causal.json`, or use the Intervene view (needs --ckpt)"]
    return html.Div([html.H3("causal effect")] + lines, className="panel", style={"maxWidth": "600px"})


def register(app: dash.Dash, ctx: Context) -> None:
    @view_body(app, VIEW.key, Output("expert-body", "children"), Input("sel-expert", "value"),
               Input("sel-layer", "value"), Input("sel-step", "value"), Input("version", "data"))
    def render(tid, k, layer, step, _version):
        if k is None:
            return None
        tr = ctx.registry.reader(tid)
        report = ctx.registry.report(tid)
        step = step or 0
        step_value = int(tr.coords["step"][step])
        ld = report["layers"][str(layer)]["steps"][str(step_value)]["load"]
        head = html.H3([html.Span("■ ", style={"color": expert_colour(k)}),
                        f"Expert {k} — share {fmt(ld['share'][k], '{:.3f}')} at layer {layer}, step {step_value} "
                        f"(uniform {1 / report['trace']['experts']:.3f})"], id="expert-title")
        parts = [head, html.Div([html.Div(dcc.Graph(figure=timing_figure(report, k), config=GRAPH_CONFIG),
                                          className="panel", style={"flex": "1", "minWidth": "380px"})],
                                className="cols")]
        second = []
        idle = inactive(report, layer, step_value, k)
        if tr.kind == "sampling" and not idle:
            counts = ctx.cached(tid, "position", lambda: expert_position_counts(tr, layer, step), layer, step)
            second.append(html.Div(dcc.Graph(figure=position_figure(counts, k, token_grid(tr), tr.coords["token"]),
                                             config=GRAPH_CONFIG), className="panel"))
            second.append(html.Div(dcc.Graph(figure=preference_figure(report, layer, step_value, k),
                                             config=GRAPH_CONFIG), className="panel", style={"flex": "1",
                                                                                             "minWidth": "360px"}))
        parts[1].children += second
        row3 = [neighbours(report, layer, k), causal(ctx, tid, tr, k)]
        if tr.kind == "sampling" and not idle:
            row3.insert(0, ctx.cached(tid, "crops", lambda: crops(tr, k, layer, step), k, layer, step))
        parts.append(html.Div(row3, className="cols"))
        if idle:
            parts.insert(1, message(idle, "warn"))
        if tr.kind != "sampling":
            parts.append(message("training trace: no token grid or images; see Training health"))
        return html.Div(parts)


VIEW = View("expert", "Expert", layout, register)

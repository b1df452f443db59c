"""View 2, routing map: the token grid coloured by expert for the selected sample, branch,
timestep, layer and recursion step, beside the early-exit decode of that state and the final
image. The timestep and step sliders (with play buttons) recolour the map with a partial
update (`dash.Patch`: new z and hover data only), not a full figure redraw. Hovering a token
shows its gate probabilities.
"""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html

from traces import TraceReader

from ..common import (
    GRAPH_CONFIG,
    Context,
    View,
    changed_controls,
    discrete_colourscale,
    message,
    png_uri,
    view_body,
)

IMAGE_PX = 220  # displayed size of decoded images


def layout(ctx: Context):
    return html.Div([
        html.Div(id="routing-msg"),
        html.Div([
            html.Div([dcc.Graph(id="routing-map", config=GRAPH_CONFIG, style={"width": "400px", "height": "380px"})],
                     className="panel"),
            html.Div([html.H3("early-exit decode of this state"), html.Img(id="routing-decoded", width=IMAGE_PX),
                      html.Div(id="routing-decoded-note", style={"fontSize": "11px", "maxWidth": f"{IMAGE_PX}px"})],
                     className="panel"),
            html.Div([html.H3("final image"), html.Img(id="routing-final", width=IMAGE_PX)], className="panel"),
        ], className="cols"),
        dcc.Store(id="routing-key"),
    ])


def token_grid(tr: TraceReader) -> tuple[int, int]:
    """The trace's token grid by the report's rule (`probes.analysis.setup.token_grid`); a trace
    whose grid is unknown is drawn as one row of its token ids."""
    from probes.analysis.setup import token_grid as grid_of_tokens  # loads probes.stats: not at start-up

    return grid_of_tokens(tr.coords["token"], tr.attrs.get("token_grid")) or (1, int(tr.coords["token"].max()) + 1)


def navigation_plan(tr: TraceReader, sample: int) -> dict | None:
    """A FrozenLake plan trace's scene for one sample (map, plan, agreement, shortest plan), else None."""
    if "navigation" not in tr.attrs:
        return None
    scene = tr.scene(sample)  # one row: this runs on every slider move of the routing map
    return scene if isinstance(scene, dict) and "plan" in scene else None


def plan_step_label(plan: dict, step: int) -> str:
    """'right (94%)' for an applied step of the plan, 'after stop' past it."""
    if step >= plan.get("plan_length", 0):
        return "after stop"
    agreement = plan.get("agreement") or []
    share = f" ({100 * agreement[step]:.0f}%)" if step < len(agreement) else ""
    return f"{plan['plan'][step]}{share}"


def grid_values(tr: TraceReader, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """Stored tokens (n_stored, ...) placed on the (h, w, ...) token grid; unstored tokens = fill."""
    h, w = token_grid(tr)
    out = np.full((h * w,) + values.shape[1:], fill, float)
    out[tr.coords["token"]] = values
    return out.reshape((h, w) + values.shape[1:])


def map_data(tr: TraceReader, sample: int, branch: str, t: int, layer: int,
             step: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(z: expert ids on the grid, NaN where invalid; hover data: gate probabilities or None)."""
    K = len(tr.coords["expert"])
    ids = tr.routing(sample=sample, branch=branch, timestep=t, layer=layer, step=step).astype(float)
    ids[ids >= K] = np.nan
    prob = None
    if tr.has("/routing/prob"):
        prob = grid_values(tr, np.round(tr.prob(sample=sample, branch=branch, timestep=t, layer=layer,
                                                 step=step).astype(np.float32), 3))
    return grid_values(tr, ids), prob


def map_figure(z: np.ndarray, prob: np.ndarray | None, K: int, title: str) -> go.Figure:
    hover = "row %{y}, col %{x}<br>expert %{z}"
    if prob is not None:
        hover += "".join(f"<br>p(e{k}) %{{customdata[{k}]:.3f}}" for k in range(K))
    fig = go.Figure(go.Heatmap(z=z, customdata=prob, zmin=-0.5, zmax=K - 0.5, colorscale=discrete_colourscale(K),
                               colorbar=dict(title="expert", tickvals=list(range(K)), thickness=10),
                               hovertemplate=hover + "<extra></extra>", xgap=0, ygap=0))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showgrid=False)
    fig.update_xaxes(showgrid=False)
    fig.update_layout(title=dict(text=title, font_size=12), margin=dict(l=30, r=10, t=36, b=24), height=380)
    return fig


def title_of(tr: TraceReader, t: int, layer: int, step: int) -> str:
    tv = float(tr.coords["timestep_value"][t])
    return f"routing: t={tv:.0f}, layer {layer}, step {int(tr.coords['step'][step])}"


def images(tr: TraceReader, sample: int, t: int, layer: int, step: int) -> tuple[str | None, str | None, str]:
    dec = fin = None
    note = ""
    if tr.has("/decoded/step"):
        layers = [int(x) for x in tr.coords["layer"]]
        im = tr.decoded(sample=sample, decoded_branch=0, timestep=t, layer=layer if layer in layers else None,
                        step=step)
        if im.ndim == 4:
            im = im[0]
        dec = png_uri(im, max(1, IMAGE_PX // im.shape[0]))
        plan = navigation_plan(tr, sample)
        if plan is not None:  # FrozenLake: step l decodes to the frame after l actions
            s = int(tr.coords["step"][step])
            note = (f"frame decoded from latent step {s} (the agent after {s} action(s)); this step's action: "
                    f"{plan_step_label(plan, s)}; plan {' '.join(plan.get('plan', [])) or '(none)'}, "
                    f"shortest {' '.join(plan.get('shortest_plan', []))}")
        else:
            note = (f"x0 predicted from the state after recursion step {int(tr.coords['step'][step])} of layer "
                    f"{layer}, the remaining blocks run as usual")
    else:
        note = "no early-exit decodes in this trace (record with --decode)"
    if tr.has("/decoded/final") and tr.final_written[sample]:
        im = tr.final(sample=sample)
        fin = png_uri(im, max(1, IMAGE_PX // im.shape[0]))
    return dec, fin, note


def register(app: dash.Dash, ctx: Context) -> None:
    outputs = [Output("routing-map", "figure"), Output("routing-decoded", "src"), Output("routing-final", "src"),
               Output("routing-decoded-note", "children"), Output("routing-msg", "children"),
               Output("routing-key", "data")]

    @view_body(app, VIEW.key, outputs, Input("sel-sample", "value"), Input("sel-branch", "value"),
               Input("sel-t", "value"), Input("sel-layer", "value"), Input("sel-step", "value"),
               Input("version", "data"), State("routing-key", "data"),
               failed=lambda msg: (go.Figure(), None, None, "", msg, None))
    def render(tid, sample, branch, t, layer, step, _version, drawn):
        tr = ctx.registry.reader(tid)
        if tr.kind != "sampling":
            return (go.Figure(), None, None, "", message("the routing map needs a sampling trace "
                                                         "(this is a training trace: see Training health)"), None)
        t, step, sample = t or 0, step or 0, sample or 0
        z, prob = map_data(tr, sample, branch, t, layer, step)
        dec, fin, note = images(tr, sample, t, layer, step)
        key = [tid, sample, branch, layer, list(z.shape)]
        moved = changed_controls()
        if drawn == key and moved and set(moved) <= {"sel-t", "sel-step"}:
            fig = dash.Patch()  # same grid: send the new colours and hover data only
            fig["data"][0]["z"] = z
            fig["data"][0]["customdata"] = prob
            fig["layout"]["title"]["text"] = title_of(tr, t, layer, step)
        else:
            fig = map_figure(z, prob, len(tr.coords["expert"]), title_of(tr, t, layer, step))
        return fig, dec, fin, note, None, key


VIEW = View("routing", "Routing map", layout, register)

"""View 6, filmstrip: early-exit decodes of one sample across diffusion timesteps (rows) and
recursion steps (columns) at the selected layer, with an optional routing overlay (each
token tinted by its expert). For a FrozenLake plan trace the one row is the plan being made:
the frame decoded from every latent step, with the action chosen there and the share of
tokens that voted for it."""

from __future__ import annotations

import dash
import numpy as np
from dash import Input, Output, dcc, html

from ..common import Context, View, expert_legend, message, png_uri, routing_rgb, view_body
from .routing import navigation_plan, plan_step_label, token_grid

TILE_PX = 72
OVERLAY_ALPHA = 0.45


def layout(ctx: Context):
    return html.Div([
        dcc.Checklist(id="film-overlay", options=[{"label": " routing overlay", "value": "on"}], value=[],
                      inline=True),
        html.Div(id="filmstrip-body"),
    ])


def tile(image: np.ndarray, ids: np.ndarray | None, K: int, grid: tuple[int, int]) -> str:
    if ids is not None:
        colours = routing_rgb(ids, K, grid, image.shape[:2]).astype(float)
        image = ((1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours).astype(np.uint8)
    return png_uri(image, max(1, TILE_PX // image.shape[0]))


def film_rows(tr, sample: int, branch: str, layer: int, overlay: bool) -> list:
    """Table rows of one sample's decodes: a row per written timestep, a column per recursion step."""
    K = len(tr.coords["expert"])
    grid = token_grid(tr)
    steps = [int(s) for s in tr.coords["step"]]
    tv = tr.coords["timestep_value"]
    written = tr.written[sample]
    images = tr.decoded(sample=sample, decoded_branch=0, layer=layer)  # (T, R, H, W, C): one sample's chunks
    ids = tr.routing(sample=sample, branch=branch, layer=layer) if overlay else None  # (T, R, N)
    rows = [html.Tr([html.Th("t \\ step")] + [html.Th(f"step {s}") for s in steps])]
    for t in range(len(tv)):
        if not written[t]:
            continue
        cells = [html.Th(f"t={tv[t]:.0f}")]
        for r in range(len(steps)):
            grid_ids = None
            if ids is not None:
                grid_ids = np.full(grid[0] * grid[1], K, np.int64)
                grid_ids[tr.coords["token"]] = ids[t, r]
            cells.append(html.Td(html.Img(src=tile(images[t, r], grid_ids, K, grid), width=TILE_PX)))
        rows.append(html.Tr(cells))
    return rows


def register(app: dash.Dash, ctx: Context) -> None:
    @view_body(app, VIEW.key, Output("filmstrip-body", "children"), Input("sel-sample", "value"),
               Input("sel-branch", "value"), Input("sel-layer", "value"), Input("film-overlay", "value"),
               Input("version", "data"))
    def render(tid, sample, branch, layer, overlay, _version):
        tr = ctx.registry.reader(tid)
        if tr.kind != "sampling" or not tr.has("/decoded/step"):
            return message("this trace has no early-exit decodes (record a sampling trace with --decode)")
        sample = sample or 0
        rows = film_rows(tr, sample, branch, layer, bool(overlay))
        plan = navigation_plan(tr, sample)
        if plan is not None:
            rows.append(html.Tr([html.Th("action")] + [html.Td(plan_step_label(plan, int(s)), className="sub")
                                                      for s in tr.coords["step"]]))
            caption = (f"map {plan.get('map', sample)}: the frame decoded from each latent step and the action the "
                       f"gate's majority chose there (share of tokens agreeing); shortest plan "
                       f"{' '.join(plan.get('shortest_plan', []))}")
        else:
            caption = (f"sample {sample}: {tr.samples()['prompt'][sample]} — early-exit decodes at layer {layer} "
                       f"(rows: noise → clean)")
        key = [expert_legend(len(tr.coords["expert"]))] if overlay else []  # what the overlay's colours mean
        return html.Div([html.Div(caption)] + key + [html.Table(rows, className="film")])


VIEW = View("filmstrip", "Filmstrip", layout, register)

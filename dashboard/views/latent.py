"""View 4, latent explorer: the stored PCA / UMAP projections of h (`/derived`, written by
`probes.derive`) as a WebGL scatter, coloured by expert, timestep, recursion step, token
position, prompt or sample. Box / lasso selection fills a table and a grid of the selected
tokens' image patches (from the early-exit decode of that state, else the final image);
hovering a point shows its patch. "Trajectories" draws the paper's Figure 3: per image, the
mean projected latent across recursion steps, coloured by diffusion timestep.

A trace with latents but no projections offers to compute them (a background job with a
progress line); the trace is released while `probes.derive` writes into it.
"""

from __future__ import annotations

import dash
import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, dash_table, dcc, html

from .. import requests
from ..common import GRAPH_CONFIG, Context, View, discrete_colourscale, guarded, message, png_uri, poll_job, view_body
from .routing import token_grid

MAX_POINTS = 300_000
POINT_OPTIONS = [10_000, 50_000, 100_000, MAX_POINTS]
PATCH_PX = 48
COLOUR_BY = ["expert", "timestep", "step", "position", "prompt", "sample"]


def layout(ctx: Context):
    return html.Div([
        html.Div([
            html.Label("projection "),
            dcc.RadioItems(id="lat-method", options=["pca", "umap"], value="pca", inline=True),
            html.Label(" colour by "), dcc.Dropdown(id="lat-colour", options=COLOUR_BY, value="expert", clearable=False,
                                                    style={"width": "120px"}),
            html.Label(" points "), dcc.Dropdown(id="lat-max", options=POINT_OPTIONS,
                                                 value=50_000, clearable=False, style={"width": "100px"}),
            html.Button("Figure 3: trajectories", id="lat-traj", className="btn"),
            html.Button("compute projections", id="lat-derive", className="btn", style={"display": "none"}),
        ], className="row"),
        html.Div(id="lat-msg"),
        html.Div([
            html.Div([dcc.Graph(id="lat-scatter", config=GRAPH_CONFIG, style={"height": "470px", "width": "640px"}),
                      dcc.Tooltip(id="lat-tip")], className="panel"),
            html.Div([html.H3("selection"), html.Div(id="lat-patches"),
                      dash_table.DataTable(id="lat-table", page_size=8, style_table={"width": "560px"},
                                           style_cell={"fontSize": "11px", "padding": "2px"})],
                     className="panel", style={"width": "580px"}),
        ], className="cols"),
        dcc.Store(id="lat-job"), dcc.Store(id="lat-done", data=0),
        dcc.Interval(id="lat-poll", interval=500, disabled=True),
    ])


def points(tr, method: str, layer: int) -> dict[str, np.ndarray]:
    """Every stored projected latent of a layer with its grid position (sample, branch,
    timestep, step, stored token) and expert; at most MAX_POINTS (a fixed random subset)."""
    layers = [int(x) for x in tr.coords["layer"]]
    if method == "umap":
        if not tr.has("/derived/umap/coords"):
            raise LookupError("no UMAP stored: run `python -m probes.derive TRACE --umap --overwrite`")
        idx = tr.dataset("/derived/umap/index")[()]
        keep = idx[:, 3] == layers.index(layer)
        xy = tr.dataset("/derived/umap/coords")[()][keep]
        s, b, t, r, st = (idx[keep][:, i] for i in (0, 1, 2, 4, 5))
    else:
        c = tr.read("/derived/pca/coords", layer=layer)  # (sample, branch, timestep, step, stored_token, comp)
        s, b, t, r, st = (a.reshape(-1) for a in np.indices(c.shape[:-1]))
        xy = c.reshape(-1, c.shape[-1])[:, :2]
        ok = np.isfinite(xy).all(axis=1)
        xy, s, b, t, r, st = xy[ok], s[ok], b[ok], t[ok], r[ok], st[ok]
    if len(xy) > MAX_POINTS:
        pick = np.sort(np.random.default_rng(0).choice(len(xy), MAX_POINTS, replace=False))
        xy, s, b, t, r, st = xy[pick], s[pick], b[pick], t[pick], r[pick], st[pick]
    token = tr.coords["stored_token"][st]
    routing_pos = np.searchsorted(tr.coords["token"], token)
    ids = tr.routing(layer=layer)  # (sample, branch, timestep, step, token) of one layer
    K = len(tr.coords["expert"])
    expert = ids[s, b, t, r, np.minimum(routing_pos, ids.shape[-1] - 1)].astype(np.int64)
    expert[(routing_pos >= ids.shape[-1]) | (expert >= K)] = -1
    prompts = tr.samples()["prompt"]
    _, prompt_code = np.unique(np.asarray(prompts, object).astype(str), return_inverse=True)
    out = {"x": xy[:, 0].astype(np.float32), "y": xy[:, 1].astype(np.float32), "sample": s, "branch": b,
           "timestep": t, "step": r, "token": token, "expert": expert, "prompt": prompt_code.reshape(-1)[s]}
    for name, codes in attribute_codes(tr).items():  # the prompt attributes the task stored per sample
        out[f"{ATTRIBUTE}{name}"] = codes[s]
    return out


ATTRIBUTE = "attribute: "


def attribute_codes(tr) -> dict[str, np.ndarray]:
    """Attribute name -> (samples,) integer code of its value: the report's coding
    (`probes.analysis.setup.prompt_attribute_codes`)."""
    from probes.analysis.setup import prompt_attribute_codes

    return {name: codes for name, (_, codes) in prompt_attribute_codes(tr.samples()["scene"]).items()}


def shown(n_points: int, n: int) -> np.ndarray:
    """Which of the points the scatter draws (a fixed random subset of n); a selection's
    pointIndex indexes this array."""
    if n_points <= n:
        return np.arange(n_points)
    return np.sort(np.random.default_rng(1).choice(n_points, n, replace=False))


def scatter_figure(tr, pts: dict, colour: str, n: int) -> go.Figure:
    K = len(tr.coords["expert"])
    show = shown(len(pts["x"]), n)
    if colour == "expert":
        c, marker = pts["expert"][show], dict(cmin=-0.5, cmax=K - 0.5, colorscale=discrete_colourscale(K))
        marker["colorbar"] = dict(title="expert", thickness=10, tickvals=list(range(K)))
    elif colour == "timestep":
        c, marker = tr.coords["timestep_value"][pts["timestep"][show]].astype(np.float32), dict(colorscale="Viridis")
    elif colour == "position":
        c, marker = pts["token"][show].astype(np.float32), dict(colorscale="Turbo")
    else:
        c, marker = pts[colour][show].astype(np.float32), dict(colorscale="Turbo")
    fig = go.Figure(go.Scattergl(x=pts["x"][show], y=pts["y"][show], mode="markers",
                                 marker=dict(color=c, size=4 if len(show) < 20000 else 2, opacity=0.7,
                                             **{"colorbar": dict(title=colour, thickness=10), **marker}),
                                 hoverinfo="none"))
    fig.update_layout(dragmode="lasso", margin=dict(l=30, r=10, t=30, b=30), height=470, title=dict(
        text=f"{len(show):,} of {len(pts['x']):,} points, coloured by {colour}", font_size=12))
    return fig


def trajectory_figure(tr, layer: int, n_timesteps: int = 6) -> go.Figure:
    """Paper Fig. 3 as the report draws it (`probes.trajectories`: image-mean latent per recursion
    step on a PCA of those means), one line per (sample, timestep), thick line = mean over
    samples, colour = timestep."""
    from probes.trajectories import latent_trajectories, trajectory_lines

    traj = latent_trajectories(tr, layer)
    tv = traj["timestep_values"]
    lo, hi = float(np.min(tv)), float(np.max(tv))
    fig = go.Figure()
    for line in trajectory_lines(traj, n_timesteps):
        colour = _viridis((line["timestep_value"] - lo) / (hi - lo or 1))
        for xy in line["samples"].values():
            fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="lines", line=dict(color=colour, width=1),
                                     opacity=0.35, showlegend=False, hoverinfo="skip"))
        m = line["mean"]
        fig.add_trace(go.Scatter(x=m[:, 0], y=m[:, 1], mode="lines+markers+text", line=dict(color=colour, width=3),
                                 text=[f"l={x}" for x in line["steps"]], textposition="top center",
                                 name=f"t={line['timestep_value']:.0f}"))
    ev = traj["explained_variance_ratio"]
    fig.update_layout(height=470, margin=dict(l=30, r=10, t=30, b=30), xaxis_title=f"PC1 ({100 * ev[0]:.0f}%)",
                      yaxis_title=f"PC2 ({100 * ev[1]:.0f}%)",
                      title=dict(text=f"latent trajectories across recursion steps, layer {layer}, {traj['branch']} "
                                      "(paper Fig. 3; PCA of image-mean h_l)", font_size=12))
    return fig


def _viridis(u: float) -> str:
    from plotly.colors import sample_colorscale

    return sample_colorscale("Viridis", [float(np.clip(u, 0, 1))])[0]


def patch(tr, s: int, t: int, layer: int, r: int, token: int) -> np.ndarray | None:
    h, w = token_grid(tr)
    if tr.has("/decoded/step"):
        im = tr.decoded(sample=s, decoded_branch=0, timestep=t, layer=layer, step=r)
    elif tr.has("/decoded/final"):
        im = tr.final(sample=s)
    else:
        return None
    ph, pw = im.shape[0] // h, im.shape[1] // w
    row, col = divmod(int(token), w)
    r0, c0 = max(0, row - 1) * ph, max(0, col - 1) * pw
    return im[r0:r0 + 3 * ph, c0:c0 + 3 * pw]


TABLE_ROWS = 1000
PATCHES = 24


def selection_rows(tr, pts: dict, rows: np.ndarray) -> tuple[list, list]:
    """The table of selected points (data, columns): at most TABLE_ROWS of `rows`, in their order."""
    tv = tr.coords["timestep_value"]
    prompts = tr.samples()["prompt"]
    data = [{"sample": int(pts["sample"][i]), "t": float(tv[pts["timestep"][i]]), "step": int(pts["step"][i]),
             "token": int(pts["token"][i]), "expert": int(pts["expert"][i]),
             "prompt": prompts[pts["sample"][i]][:30]} for i in rows[:TABLE_ROWS]]
    return data, [{"name": k, "id": k} for k in ("sample", "t", "step", "token", "expert", "prompt")]


def selected_rows(selected: dict, show: np.ndarray) -> np.ndarray:
    """Rows of the points a selection names (its pointIndex values index the drawn points);
    RequestError for an index the scatter does not draw (a negative one would wrap)."""
    from ..requests import RequestError

    points = selected.get("points")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise RequestError("selection: expected a list of points")
    index = [p.get("pointIndex") for p in points]
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(show) for i in index):
        raise RequestError(f"selection: point indices must be whole numbers 0..{len(show) - 1}")
    return show[np.asarray(index, np.int64)]


def random_rows(rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n rows drawn at random from the selection (fixed seed: the same selection shows the same
    patches), not its first n, which are one sample's first timestep."""
    if len(rows) <= n:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))


def summary_figure(tr, pts: dict, rows: np.ndarray) -> go.Figure:
    """Histograms of expert, timestep, recursion step and prompt over the whole selection (plotly
    counts the values; nothing is counted here)."""
    from plotly.subplots import make_subplots

    K = len(tr.coords["expert"])
    prompts = np.asarray(tr.samples()["prompt"], object).astype(str)
    tv = tr.coords["timestep_value"]
    fig = make_subplots(rows=1, cols=4, subplot_titles=["expert", "timestep", "recursion step", "prompt"],
                        horizontal_spacing=0.06)
    columns = [([f"e{int(e)}" if e >= 0 else "none" for e in pts["expert"][rows]],
                [f"e{k}" for k in range(K)] + ["none"]),
               ([f"{float(tv[t]):.0f}" for t in pts["timestep"][rows]], [f"{float(v):.0f}" for v in tv]),
               ([str(int(tr.coords["step"][r])) for r in pts["step"][rows]], [str(int(s)) for s in tr.coords["step"]]),
               ([prompts[s][:14] for s in pts["sample"][rows]], None)]
    for i, (x, order) in enumerate(columns):
        fig.add_trace(go.Histogram(x=x, marker_color="#1f77b4", showlegend=False,
                                   hovertemplate="%{x}: %{y}<extra></extra>"), row=1, col=i + 1)
        if order:
            fig.update_xaxes(categoryorder="array", categoryarray=order, row=1, col=i + 1)
    fig.update_layout(height=170, margin=dict(l=30, r=10, t=24, b=40), bargap=0.1)
    fig.update_annotations(font_size=11)
    fig.update_xaxes(tickfont_size=9)
    return fig


def patch_of(tr, pts: dict, i: int, layer: int) -> np.ndarray | None:
    """The image patch around point i's token (`patch`)."""
    return patch(tr, int(pts["sample"][i]), int(pts["timestep"][i]), layer, int(pts["step"][i]), int(pts["token"][i]))


def patch_tiles(tr, pts: dict, rows: np.ndarray, layer: int) -> list:
    """Patches of PATCHES selected points drawn at random (`random_rows`), captioned by expert and t."""
    tiles = []
    tv = tr.coords["timestep_value"]
    for i in random_rows(rows, PATCHES):
        im = patch_of(tr, pts, i, layer)
        if im is not None:
            caption = f"e{int(pts['expert'][i])} t{float(tv[pts['timestep'][i]]):.0f}"
            tiles.append(html.Figure([html.Img(src=png_uri(im, max(1, PATCH_PX // im.shape[0])), width=PATCH_PX),
                                      html.Figcaption(caption)]))
    return tiles


HIDDEN = {"display": "none"}


def drawn(n) -> int:
    """How many points the scatter draws: one of the page's options (RequestError otherwise)."""
    if n not in POINT_OPTIONS or isinstance(n, bool):
        raise requests.RequestError(f"points {n!r}: one of {', '.join(map(str, POINT_OPTIONS))}")
    return n


def register(app: dash.Dash, ctx: Context) -> None:
    def pts_of(tid, method, layer):
        tr = ctx.registry.reader(tid)
        requests.check_selection(tr, {"sel-layer": layer})
        if method not in ("pca", "umap"):
            raise requests.RequestError(f"projection {method!r}: must be pca or umap")
        return tr, ctx.cached(tid, "latent-points", lambda: points(tr, method, layer), method, layer)

    register_scatter(app, ctx, pts_of)
    register_projections_job(app, ctx)
    register_selection(app, ctx, pts_of)


def register_scatter(app: dash.Dash, ctx: Context, pts_of) -> None:
    """The scatter (or the trajectories), the derive button when projections are missing, and
    the colour options (the fixed ones and the task's prompt attributes)."""
    @view_body(app, VIEW.key, [Output("lat-scatter", "figure"), Output("lat-msg", "children"),
                               Output("lat-derive", "style")],
               Input("sel-layer", "value"), Input("lat-method", "value"), Input("lat-colour", "value"),
               Input("lat-max", "value"), Input("lat-traj", "n_clicks"), Input("lat-done", "data"),
               Input("version", "data"), failed=lambda msg: (go.Figure(), msg, HIDDEN))
    def render(tid, layer, method, colour, n, _traj, _done, _version):
        tr = ctx.registry.reader(tid)
        if tr.kind != "sampling" or not tr.has("/latents/h"):
            return go.Figure(), message("this trace stores no latents: record with --latent-tokens N"), HIDDEN
        if not tr.has("/derived/pca/coords"):
            return go.Figure(), message("latents stored but no projections yet: compute them here "
                                        "(or run `python -m probes.derive TRACE`)"), {}
        if dash.ctx.triggered_id == "lat-traj":
            return trajectory_figure(tr, layer), None, HIDDEN
        tr, pts = pts_of(tid, method, layer)
        return scatter_figure(tr, pts, colour, drawn(n)), None, HIDDEN

    # reading the scenes costs ~1 s of imports: only once the tab is open; an unreadable trace
    # offers the fixed colours (the scatter says what is wrong)
    @view_body(app, VIEW.key, Output("lat-colour", "options"), failed=lambda _msg: COLOUR_BY)
    def colour_options(tid):
        return COLOUR_BY + [f"{ATTRIBUTE}{name}" for name in attribute_codes(ctx.registry.reader(tid))]


def register_projections_job(app: dash.Dash, ctx: Context) -> None:
    """The derive button: `probes.derive` in a background job (the trace released meanwhile), polled."""
    @app.callback(Output("lat-job", "data"), Output("lat-poll", "disabled"), Input("lat-derive", "n_clicks"),
                  State("sel-trace", "value"), prevent_initial_call=True)
    @guarded(failed=lambda msg: (dash.no_update, True))
    def start_derive(_n, tid):
        from probes.projections import derive

        tr = ctx.registry.reader(tid)
        # the page offers the button only for a trace with latents and no projections: a request
        # for any other trace would write /derived into it unasked
        if tr.kind != "sampling" or not tr.has("/latents/h") or tr.has("/derived/pca/coords"):
            raise requests.RequestError(f"{ctx.registry.entry(tid).path.name}: projections are computed only for "
                                        "a trace with latents and none yet")

        def work(job):
            job.message = "computing PCA of the stored latents"
            try:
                with ctx.registry.exclusive(tid, "projections are being written into it") as path:
                    return derive(path)
            finally:
                ctx.memo.clear()
        return ctx.jobs.start(f"derive:{tid}", work).id, False

    @app.callback(Output("lat-msg", "children", allow_duplicate=True),
                  Output("lat-poll", "disabled", allow_duplicate=True), Output("lat-done", "data"),
                  Input("lat-poll", "n_intervals"), State("lat-job", "data"), State("lat-done", "data"),
                  prevent_initial_call=True)
    @guarded(failed=lambda msg: (msg, True, dash.no_update))
    def poll(_n, job_id, done):
        tick = poll_job(ctx.jobs, job_id, lambda s: f"projections computed in {s:.1f} s")
        return tick.message, tick.stop, (done or 0) + 1 if tick.state == "done" else dash.no_update


def register_selection(app: dash.Dash, ctx: Context, pts_of) -> None:
    """A box / lasso selection fills the table and the patches; hovering a point shows its patch."""
    @app.callback(Output("lat-table", "data"), Output("lat-table", "columns"), Output("lat-patches", "children"),
                  Input("lat-scatter", "selectedData"), State("sel-trace", "value"), State("sel-layer", "value"),
                  State("lat-method", "value"), State("lat-max", "value"), prevent_initial_call=True)
    @guarded(failed=lambda msg: ([], [], [msg]))
    def select(selected, tid, layer, method, n):
        if not isinstance(selected, dict) or not selected.get("points"):
            return [], [], []
        tr, pts = pts_of(tid, method, layer)
        rows = selected_rows(selected, shown(len(pts["x"]), drawn(n)))
        data, cols = selection_rows(tr, pts, rows)
        tiles = patch_tiles(tr, pts, rows, layer)
        listed = f"the table lists all {len(data):,}" if len(data) == len(rows) else \
            f"the table lists the first {len(data):,} of {len(rows):,}"
        count = html.Div(f"{len(rows):,} points selected; {listed}; patches of {len(tiles)} drawn at random",
                         id="lat-count")
        summary = dcc.Graph(figure=summary_figure(tr, pts, rows), config=GRAPH_CONFIG, style={"height": "170px"},
                            id="lat-summary")
        return data, cols, [count, summary, html.Div(tiles, className="crops")]

    @app.callback(Output("lat-tip", "show"), Output("lat-tip", "bbox"), Output("lat-tip", "children"),
                  Input("lat-scatter", "hoverData"), State("sel-trace", "value"), State("sel-layer", "value"),
                  State("lat-method", "value"), State("lat-max", "value"), prevent_initial_call=True)
    @guarded(failed=lambda _msg: (False, dash.no_update, dash.no_update))  # a tooltip: the scatter shows errors
    def hover(hover_data, tid, layer, method, n):
        if not hover_data or "pointIndex" not in hover_data["points"][0]:
            return False, dash.no_update, dash.no_update
        pt = hover_data["points"][0]
        tr, pts = pts_of(tid, method, layer)
        i = int(selected_rows({"points": [pt]}, shown(len(pts["x"]), drawn(n)))[0])
        im = patch_of(tr, pts, i, layer)
        label = (f"sample {pts['sample'][i]}, t={tr.coords['timestep_value'][pts['timestep'][i]]:.0f}, "
                 f"step {pts['step'][i]}, token {pts['token'][i]}, expert {pts['expert'][i]}")
        body = [html.Div(label, style={"fontSize": "11px"})]
        if im is not None:
            body.insert(0, html.Img(src=png_uri(im, max(1, PATCH_PX // im.shape[0])), width=PATCH_PX))
        return True, pt.get("bbox"), body


VIEW = View("latent", "Latent explorer", layout, register)

"""The Dash app: a selection bar shared by every view, one tab per view, live updates.

`create_app(ctx)` builds the page from the view modules in `dashboard/views/` (each has a
`layout()` and a `register(app, ctx)`); `python -m dashboard` serves it. Every view but
Results (evaluation files, `views/results.py`) shows the selected trace.
"""

from __future__ import annotations

from pathlib import Path

import dash
from dash import Input, Output, State, dcc, html

from . import selection
from .common import Context
from .views import (compare, expert, filmstrip, flow, intervene, latent, overview, results, routing,
                    training)

VIEW_MODULES = {"overview": overview, "routing": routing, "flow": flow, "latent": latent, "expert": expert,
                "filmstrip": filmstrip, "intervene": intervene, "training": training, "compare": compare,
                "results": results}
LIVE_POLL_MS = 2000


def create_app(ctx: Context) -> dash.Dash:
    app = dash.Dash(__name__, title="Thinking Pixel dashboard", assets_folder=str(Path(__file__).with_name("assets")),
                    suppress_callback_exceptions=True, update_title=None)
    tabs = [dcc.Tab(label=label, value=key, className="tab-small", selected_className="tab-small",
                    children=html.Div(VIEW_MODULES[key].layout(ctx), className="view", id=f"view-{key}"))
            for key, label in selection.VIEWS]
    app.layout = html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Store(id="nav"),
        dcc.Store(id="version", data=0),
        dcc.Interval(id="live-tick", interval=LIVE_POLL_MS),
        html.Div([html.H1("Thinking Pixel"), html.Span("expert specialization across diffusion timesteps and "
                                                        "recursion steps", className="sub"),
                  html.Span(id="live-status", className="sub")], className="header"),
        selection.selection_bar(),
        html.Div(id="status"),
        dcc.Tabs(id="tabs", value=selection.default_view(ctx), children=tabs),
        # an empty graph in the first layout makes the browser fetch plotly.js while the first
        # callbacks run, not after the overview's figure arrives (about 0.5 s of the first page)
        dcc.Graph(id="plotly-preload", figure={}, style={"display": "none"}),
    ])
    selection.register(app, ctx)
    for module in VIEW_MODULES.values():
        module.register(app, ctx)

    @app.callback(Output("version", "data"), Output("live-status", "children"), Output("live-tick", "disabled"),
                  Input("live-tick", "n_intervals"), State("sel-trace", "value"), State("version", "data"))
    def live(_n, tid, version):
        """Follow a trace whose writer is still running: bump `version` when it grew."""
        try:
            tr = ctx.registry.reader(tid)
        except Exception:  # noqa: BLE001 -- no usable trace selected: nothing to follow
            return dash.no_update, "", False
        if tr.complete:
            return dash.no_update, "", False
        steps = ctx.registry.refresh(tid)
        label = (f"incomplete trace: {steps} steps written (writer closed without finishing)" if tr.closed else
                 f"incomplete trace: {steps} steps written; updating while its writer runs")
        return (steps if steps != version else dash.no_update), label, False

    return app

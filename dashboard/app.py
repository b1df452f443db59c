"""The Dash app: a selection bar shared by every view, one tab per view, live updates.

`create_app(ctx)` builds the page from `dashboard.views.VIEWS`, the one list of views (each
module in `dashboard/views/` declares its `VIEW`: key, label, layout, callbacks); `python -m
dashboard` serves it. Every view but Results (evaluation files, `views/results.py`) shows the
selected trace.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dash
from dash import Input, Output, State, dcc, html

from . import security, selection
from . import views as view_package
from .common import Context, View, guarded, unguarded

LIVE_POLL_MS = 2000


def create_app(ctx: Context, views: list[View] | None = None) -> dash.Dash:
    """The app serving `ctx` with `views` as its tabs (default: every view, `dashboard.views.VIEWS`);
    ViewError when a view is declared wrongly or missing from the list."""
    views = view_package.checked(view_package.VIEWS if views is None else views, view_package.view_modules())
    app = dash.Dash(__name__, title="Thinking Pixel dashboard", assets_folder=str(Path(__file__).with_name("assets")),
                    suppress_callback_exceptions=True, update_title=None,
                    on_error=unguarded)
    tabs = [dcc.Tab(label=v.label, value=v.key, className="tab-small", selected_className="tab-small",
                    children=html.Div(v.layout(ctx), className="view", id=f"view-{v.key}"))
            for v in views]
    app.dashboard_context = ctx  # view_body checks request values against the served traces
    security.install_host_check(app.server, security.allowed_hosts(ctx.bind))
    security.install_error_line(app.server)
    security.install_callback_check(app)  # a body the page would not send: 400 before Dash reads it
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
        dcc.Tabs(id="tabs", value=selection.default_view(ctx, views), children=tabs),
    ])
    selection.register(app, ctx, views)
    app.dashboard_gates = {}  # view_body: store id -> the view and controls its gate passes on
    for view in views:
        view.register(app, ctx)
    app.layout.children.append(html.Div([dcc.Store(id=store) for store in app.dashboard_gates], id="gates"))

    @app.callback(Output("version", "data"), Output("live-status", "children"), Output("live-tick", "disabled"),
                  Input("live-tick", "n_intervals"), State("sel-trace", "value"), State("version", "data"))
    @guarded(failed=lambda msg: (dash.no_update, msg, False))
    def live(_n, tid, version):
        """Follow a trace whose writer is still running: bump `version` when it grew."""
        try:
            tr = ctx.registry.reader(tid)
        except Exception:  # any failure means no usable trace is selected: nothing to follow
            return dash.no_update, "", False
        if tr.complete:
            return dash.no_update, "", False
        steps = ctx.registry.refresh(tid)
        if tr.closed:
            tr, steps = finished(ctx, tid, steps)
            if tr is not None and tr.complete:  # a bump of `version` redraws the views from the final file
                return (-1 if version == steps else steps), "", False
        label = (f"incomplete trace: {steps} steps written (writer closed without finishing)"
                 if tr is not None and tr.closed else
                 f"incomplete trace: {steps} steps written; updating while its writer runs")
        return (steps if steps != version else dash.no_update), label, False

    return app


def warm_up(ctx: Context) -> None:
    """What the first page's overview needs, done while the browser is still loading the page's
    scripts (`python -m dashboard` runs this in a thread once the server is built): plotly's figure
    defaults, the report of the trace the page opens on (from its cache, or computed) and its
    overview figure (kept for the page's first callback: `overview_figure`).
    A failure here is only logged: the page shows it when it asks for that report."""
    ok = [o["value"] for o in ctx.registry.options() if ctx.registry.entries[o["value"]].error is None]
    if not ok:  # no trace to open: nothing to warm (and no thread left importing plotly when Ctrl-C ends the server)
        return
    from .common import figure_defaults
    from .views.overview import evidence, overview_figure

    figure_defaults()
    try:
        report = ctx.registry.report(ok[0])
        overview_figure(ctx, ok[0])
        layer = next(iter(report["layers"]), None)
        if layer is not None:
            evidence(report, int(layer), 0)
    except Exception as exc:  # shown by the page, not here
        logging.getLogger("dashboard").info("warm-up: %s: %s", type(exc).__name__, exc)


def finished(ctx: Context, tid: str, steps: int):
    """(reader, steps) of a trace whose writer has closed, re-opened: a live (SWMR) reader never
    sees the `complete` flag the writer sets after leaving SWMR, so only a fresh open tells a
    finished recording from one whose writer stopped. (None, steps) while the writer still has
    the file (it sets the flag in a moment; the next tick tries again)."""
    with ctx.registry.exclusive(tid, "re-opening the finished recording"):
        pass  # closes the live reader and forgets its in-memory report
    try:
        tr = ctx.registry.reader(tid)
    except Exception:  # still held by the writer: not yet known
        ctx.registry.entry(tid).error = None
        return None, steps
    return tr, tr.steps

"""How the dashboard is put together, without a trace: every view declared once and in the one
list, a view left out or declared wrongly failing when the app is built (not a tab silently
missing), every view's failure shown as one line in that view, and the poll of a background job."""

import ast
import json
import threading
import types
from pathlib import Path

import dash
import pytest

from dashboard import views
from dashboard.app import create_app
from dashboard.common import View, ViewError, make_context, poll_job
from dashboard.jobs import Jobs

from .test_dashboard import call, text_of


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: nothing served
    return make_context([], ckpt=None)


def test_the_page_is_built_from_the_one_list(ctx):
    app = create_app(ctx)
    tabs = next(c for c in app.layout.children if getattr(c, "id", None) == "tabs")
    assert [(t.value, t.label) for t in tabs.children] == [(v.key, v.label) for v in views.VIEWS]
    assert {name: m.VIEW.key for name, m in views.view_modules().items()} == {v.key: v.key for v in views.VIEWS}
    # the link's view= accepts exactly the listed keys
    sync = next(k for k in app.callback_map if k.startswith("..url.search..."))
    for key in [v.key for v in views.VIEWS] + ["nonsense"]:
        out = call(app, sync, {"url.search": f"?view={key}"}, "url.search")
        assert out["tabs"]["value"] == (key if key != "nonsense" else "overview")


def test_a_view_left_out_of_the_list_fails_loudly(ctx):
    without_flow = [v for v in views.VIEWS if v.key != "flow"]
    with pytest.raises(ViewError, match=r"dashboard/views/flow\.py declares the view 'flow', but it is not in VIEWS"):
        create_app(ctx, without_flow)
    helper = types.ModuleType("helper")  # a module with no VIEW in dashboard/views/
    with pytest.raises(ViewError, match=r"dashboard/views/helper\.py declares no view"):
        views.checked(views.VIEWS, {**views.view_modules(), "helper": helper})


def test_a_view_declared_wrongly_fails_loudly(ctx):
    def layout(ctx):
        return None

    def register(app, ctx):
        pass

    for args, match in [(("Bad key", "Bad", layout, register), "lowercase"),
                        (("bad", "", layout, register), "needs a label"),
                        (("bad", "Bad", "layout", register), "layout must be a function"),
                        (("bad", "Bad", layout, None), "register must be a function")]:
        with pytest.raises(ViewError, match=match):
            View(*args)
    twice = views.VIEWS + [View("flow", "Flow again", layout, register)]
    with pytest.raises(ViewError, match="more than one view has the key flow"):
        create_app(ctx, twice)
    with pytest.raises(ViewError, match="not a dashboard.common.View"):
        create_app(ctx, views.VIEWS + [("flow", "Recursion flow")])


def layout_ids(component) -> set:
    found = set()
    if isinstance(component, (list, tuple)):
        for c in component:
            found |= layout_ids(c)
    elif hasattr(component, "to_plotly_json"):
        if isinstance(getattr(component, "id", None), str):
            found.add(component.id)
        found |= layout_ids(getattr(component, "children", None))
    return found


def test_every_callback_output_is_on_the_page(ctx):
    """Under suppress_callback_exceptions=True an output naming a missing component is silent."""
    ctx.ckpt = Path("model.pt")  # the Intervene view's full layout (the model is loaded on first use only)
    app = create_app(ctx)
    ids = layout_ids(app.layout)
    outputs = {o.split("@")[0].rsplit(".", 1)[0] for key in app.callback_map for o in key.strip(".").split("...")}
    assert outputs - ids == set()


def test_every_view_shows_its_failure_as_one_line(ctx, monkeypatch):
    """A bug in any view is one error line in that view (type and message, newlines folded), and
    the server answers (no 500): every view renders through `view_body` / `guarded`."""
    def boom(*args, **kwargs):
        raise RuntimeError("boom\n  second line")

    for name in ("reader", "report", "compare"):
        monkeypatch.setattr(ctx.registry, name, boom)
    monkeypatch.setattr(views.results, "find_results", boom)
    ctx.results, ctx.ckpt = Path("."), Path("model.pt")  # the Results tab, the Intervene view's full layout
    app = create_app(ctx)
    gated = [k for k, cb in app.callback_map.items() if any(i["id"] in app.dashboard_gates for i in cb["inputs"])]
    values = {"sel-trace.value": "some-trace", "sel-layer.value": 2, "sel-step.value": 0, "sel-expert.value": 0,
              "sel-sample.value": 0, "sel-t.value": 0, "cmp-other.value": "other-trace", "lat-method.value": "pca",
              "lat-colour.value": "expert", "lat-max.value": 10000, "flow-bin.value": "all"}
    for view in views.VIEWS:
        shown = [json.dumps(call(app, k, {**values, "tabs.value": view.key}, "tabs.value")) for k in gated]
        errors = [s for s in shown if "msg-error" in s]
        assert errors, f"{view.key}: no error line"
        assert all("RuntimeError: boom second line" in s for s in errors), (view.key, errors)


def test_poll_job_running_failed_done_and_unknown():
    jobs = Jobs()
    release = threading.Event()

    def work(job):
        job.message = "waiting"
        release.wait(10)
        return 42

    def failing(job):
        raise RuntimeError("broken")

    def finished(job_id):  # the job's thread has ended (or ended already)
        for thread in threading.enumerate():
            if thread.name == job_id:
                thread.join(10)

    running = jobs.start("a", work)
    tick = poll_job(jobs, running.id, lambda s: f"done in {s:.1f} s")
    assert (tick.state, tick.stop) == ("running", False) and "⏳ waiting" in text_of(tick.message.to_plotly_json())
    release.set()
    finished(running.id)
    tick = poll_job(jobs, running.id, lambda s: "all done")
    assert (tick.state, tick.stop, tick.result, tick.message.children) == ("done", True, 42, "all done")
    bad = jobs.start("b", failing)
    finished(bad.id)
    tick = poll_job(jobs, bad.id, lambda s: "all done")
    assert (tick.state, tick.stop, tick.message.children) == ("failed", True, "RuntimeError: broken")
    assert "msg-error" in tick.message.className
    tick = poll_job(jobs, "job-from-an-earlier-server", lambda s: "all done")
    assert (tick.state, tick.stop, tick.message) == ("unknown", True, dash.no_update)


def test_no_function_over_60_lines():
    """The developer guide's rule for dashboard/ (decorators count: they are part of a callback)."""
    root = Path(__file__).resolve().parents[1] / "dashboard"
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > 60:
                    long.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} "
                                f"{node.end_lineno - first + 1} lines")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)

"""The dashboard on a real recorded trace of the tiny model: callbacks over HTTP, security, the
command line, the report cache, and the page driven in a real headless browser (Chromium)."""

import json
import shutil

import h5py
import numpy as np
import pytest

from dashboard.__main__ import build_parser
from dashboard.__main__ import main as dashboard_main
from dashboard.app import create_app
from dashboard.common import make_context
from dashboard.data import REPORT_SUFFIX, Registry, cache_path, find_traces, trace_id
from dashboard.selection import NO_TRACES
from probes.projections import derive
from traces import TraceError

from .conftest import wait_until
from .dashboard_page import ROUTING, call, click_until, console_errors, selection, text_of, wait_for


@pytest.fixture(scope="module")
def env(tiny_ckpt, tiny_trace, tmp_path_factory):
    """The session's tiny checkpoint and a copy of its trace (tests/conftest.py: probabilities,
    16-token latents, early-exit decodes), plus a copy with PCA projections; the folder `served/`
    holds both (the dashboard writes its report cache beside them)."""
    d = tmp_path_factory.mktemp("dashboard")
    served = d / "served"
    served.mkdir()
    trace = served / "run.h5"
    shutil.copy(tiny_trace, trace)
    derived = served / "derived.h5"
    shutil.copy(trace, derived)
    derive(derived)
    return {"dir": d, "ckpt": tiny_ckpt, "trace": trace, "derived": derived, "served": served}


@pytest.fixture(scope="module")
def app_ctx(env):
    ctx = make_context([str(env["served"])], env["ckpt"], permutations=19)
    return create_app(ctx), ctx


# ----------------------------------------------------------------------------- callbacks


def test_url_carries_the_selection(app_ctx, env):
    app, ctx = app_ctx
    tid = trace_id(env["derived"])
    sel = selection(app, f"?trace={tid}&t=2&step=1&expert=3&view=expert")
    assert (sel["sel-trace"], sel["sel-t"], sel["sel-step"], sel["sel-expert"], sel["tabs"]) == (tid, 2, 1, 3, "expert")
    assert "t=2" in sel["search"] and "expert=3" in sel["search"]
    bad = selection(app, "?t=99&expert=-4&view=nonsense")  # out of range: clamped to valid values
    assert (bad["sel-t"], bad["sel-expert"], bad["tabs"]) == (0, 0, "overview")


def test_routing_map_patches_on_slider_moves(app_ctx, env):
    app, ctx = app_ctx
    tid = trace_id(env["trace"])
    base = {"tabs.value": "routing", "sel-trace.value": tid, "sel-sample.value": 0, "sel-branch.value": "cond",
            "sel-t.value": 0, "sel-layer.value": 2, "sel-step.value": 0}
    full = call(app, ROUTING, base, "sel-trace.value")
    fig = full["routing-map"]["figure"]
    assert fig["data"][0]["type"] == "heatmap" and "t=1000" in fig["layout"]["title"]["text"]
    assert full["routing-decoded"]["src"].startswith("data:image/png;base64,")
    key = full["routing-key"]["data"]
    moved = call(app, ROUTING, {**base, "sel-t.value": 3, "routing-key.data": key}, "sel-t.value")
    patch = moved["routing-map"]["figure"]
    assert "__dash_patch_update" in patch  # a partial update, not a new figure
    assert any("t=1" in json.dumps(op) for op in patch["operations"])


def test_views_render_without_errors(app_ctx, env):
    app, ctx = app_ctx
    tid = trace_id(env["derived"])
    sel = {"sel-trace.value": tid, "sel-sample.value": 0, "sel-branch.value": "cond", "sel-t.value": 1,
           "sel-layer.value": 2, "sel-step.value": 1, "sel-expert.value": 1, "flow-bin.value": "all",
           "film-overlay.value": ["on"]}
    for view, output in [("overview", "overview-body.children"), ("expert", "expert-body.children"),
                         ("flow", "flow-body.children"), ("filmstrip", "filmstrip-body.children")]:
        out = call(app, output, {**sel, "tabs.value": view}, "tabs.value")
        body = out[output.split(".")[0]]["children"]
        assert "msg-error" not in json.dumps(body), (view, text_of(body))
    overview = text_of(call(app, "overview-body.children", {**sel,
                                                            "tabs.value": "overview"})["overview-body"]["children"])
    assert "argmax over a flat gate" in overview  # the 2-step model's gate is flat: said so, not shown as structure
    training = call(app, "training-body.children", {**sel, "tabs.value": "training"})["training-body"]["children"]
    assert "needs a training trace" in text_of(training)


def test_latent_selection_fills_the_table(app_ctx, env):
    app, ctx = app_ctx
    tid = trace_id(env["derived"])
    out = call(app, "..lat-scatter.figure...lat-msg.children...lat-derive.style..",
               {"tabs.value": "latent", "sel-trace.value": tid, "sel-layer.value": 2, "lat-method.value": "pca",
                "lat-colour.value": "expert", "lat-max.value": 50000}, "tabs.value")
    assert out["lat-scatter"]["figure"]["data"][0]["type"] == "scattergl"
    sel = {"points": [{"pointIndex": i} for i in range(5)]}
    rows = call(app, "..lat-table.data...lat-table.columns...lat-patches.children..",
                {"lat-scatter.selectedData": sel, "sel-trace.value": tid, "sel-layer.value": 2,
                 "lat-method.value": "pca", "lat-max.value": 50000}, "lat-scatter.selectedData")
    assert len(rows["lat-table"]["data"]) == 5 and {"sample", "t", "step", "token", "expert"} <= set(
        rows["lat-table"]["data"][0])
    # the prompt attributes the task stored are offered as colours, and colour by sample attribute
    options = call(app, "lat-colour.options", {"tabs.value": "latent", "sel-trace.value": tid},
                   "sel-trace.value")["lat-colour"]["options"]
    assert {"attribute: colour", "attribute: shape", "attribute: count", "attribute: relation"} <= set(options)
    coloured = call(app, "..lat-scatter.figure...lat-msg.children...lat-derive.style..",
                    {"tabs.value": "latent", "sel-trace.value": tid, "sel-layer.value": 2, "lat-method.value": "pca",
                     "lat-colour.value": "attribute: colour", "lat-max.value": 50000}, "tabs.value")
    colour = coloured["lat-scatter"]["figure"]["data"][0]["marker"]["color"]  # plotly's typed-array JSON
    import base64
    assert set(np.frombuffer(base64.b64decode(colour["bdata"]), colour["dtype"]).tolist()) == {0.0, 1.0}  # red, green
    # the underived trace offers to compute projections
    plain = call(app, "..lat-scatter.figure...lat-msg.children...lat-derive.style..",
                 {"tabs.value": "latent", "sel-trace.value": trace_id(env["trace"]), "sel-layer.value": 2,
                  "lat-method.value": "pca", "lat-colour.value": "expert", "lat-max.value": 50000}, "tabs.value")
    assert "no projections yet" in text_of(plain["lat-msg"]["children"]) and plain["lat-derive"]["style"] == {}


def test_report_cache_is_keyed_by_checksum(env, monkeypatch):
    reg = Registry([env["trace"]], n_perm=19)
    tid = reg.ids()[0]
    first = reg.report(tid)
    cache = cache_path(env["trace"], REPORT_SUFFIX)
    stored = json.loads(cache.read_text())
    assert len(stored["sha256"]) == 64 and stored["report"]["trace"]["experts"] == first["trace"]["experts"]
    reg.close()
    monkeypatch.setattr(Registry, "_analyse", lambda *a: pytest.fail("re-analysed an unchanged trace"))
    again = Registry([env["trace"]], n_perm=19)
    assert again.report(tid) == first  # from the cache: the patched analysis would fail the test
    again.close()


# ----------------------------------------------------------------------------- security


def test_paths_from_requests_never_reach_the_file_system(app_ctx, env):
    app, ctx = app_ctx
    for bad in ["/etc/passwd", str(env["trace"]), "../served/run.h5", None, 12]:
        with pytest.raises(TraceError, match="unknown trace id"):
            ctx.registry.reader(bad)
        out = call(app, "overview-body.children", {"tabs.value": "overview", "sel-trace.value": bad,
                                                   "sel-layer.value": 2, "sel-step.value": 0}, "sel-trace.value")
        body = json.dumps(out.get("overview-body", {}))
        assert "root:" not in body
        if bad is not None:
            assert "unknown trace id" in body
    sel = selection(app, "?trace=/etc/passwd")
    assert sel["sel-trace"] in ctx.registry.entries and "does not serve" in text_of(sel["status"])
    client = app.server.test_client()
    for url in ["/../../etc/passwd", "/_dash-component-suites/../../../../etc/passwd", "/assets/../../../etc/passwd",
                "/_dash-component-suites/dash/..%2F..%2F..%2F..%2Fetc%2Fpasswd"]:
        assert b"root:" not in client.get(url).data


def test_bad_files_in_the_folder_leave_the_rest_working(env, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(env["trace"], folder / "good.h5")
    (folder / "garbage.h5").write_bytes(b"not an hdf5 file at all" * 100)
    with h5py.File(folder / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    data = (env["trace"]).read_bytes()
    (folder / "half.h5").write_bytes(data[: len(data) // 2])
    shutil.copy(env["trace"], folder / "old.h5")
    with h5py.File(folder / "old.h5", "r+") as f:
        f.attrs["schema_version"] = 0
    ctx = make_context([str(folder)], permutations=19)
    app = create_app(ctx)
    labels = {o["label"] for o in ctx.registry.options()}
    assert labels == {"good.h5", "garbage.h5 (unreadable)", "foreign.h5 (unreadable)", "half.h5 (unreadable)",
                      "old.h5 (unreadable)"}
    errors = {e.path.name: e.error for e in ctx.registry.entries.values()}
    assert "not an HDF5 file" in errors["garbage.h5"] and "foreign" in errors["foreign.h5"]
    assert "older" in errors["old.h5"] and errors["half.h5"]
    sel = selection(app)
    assert sel["sel-trace"] == trace_id(folder / "good.h5")  # the page opens on the usable trace
    bad = selection(app, f"?trace={trace_id(folder / 'half.h5')}")
    assert "half.h5" in text_of(bad["status"])
    out = call(app, "overview-body.children", {"tabs.value": "overview", "sel-trace.value": trace_id(folder / "old.h5"),
                                               "sel-layer.value": 2, "sel-step.value": 0}, "sel-trace.value")
    assert "older than supported" in json.dumps(out)
    good = call(app, "overview-body.children", {"tabs.value": "overview", "sel-trace.value": sel["sel-trace"],
                                                "sel-layer.value": 2, "sel-step.value": 0}, "sel-trace.value")
    assert "msg-error" not in json.dumps(good)


def test_no_traces_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    app = create_app(make_context([]))
    sel = selection(app)
    assert sel["sel-trace"] is None and text_of(sel["status"]) == NO_TRACES
    assert "./scripts/demo.sh" in NO_TRACES


def test_command_line(tmp_path, capsys):
    assert build_parser().parse_args([]).host == "127.0.0.1"  # loopback unless told otherwise
    assert dashboard_main([str(tmp_path / "missing.h5")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert dashboard_main(["--port", "0", str(tmp_path)]) == 2
    assert dashboard_main(["--ckpt", str(tmp_path / "none.pt"), str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "a.h5").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.h5").write_bytes(b"x")
    (tmp_path / "sub" / "b.rank0.h5").write_bytes(b"x")  # rank files are served through their joined file
    assert [p.name for p in find_traces([tmp_path, tmp_path / "a.h5"])] == ["a.h5", "b.h5"]


# ----------------------------------------------------------------------------- browser


def routing_state(driver):
    return driver.execute_script(
        "const gd = document.querySelector('#routing-map .js-plotly-plot');"
        "if (!gd || !gd.calcdata || !gd.calcdata[0]) return null;"
        "return [gd.layout.title.text, JSON.stringify(gd.calcdata[0][0].z)];")


def test_browser_page_slider_expert_page(browser, env):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, url, ctx = browser
    tid = trace_id(env["trace"])
    driver.get(f"{url}/?trace={tid}&view=overview")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#overview-share .main-svg"))
    assert "Expert share by diffusion timestep" in driver.page_source
    # the timestep slider changes the routing map
    driver.find_element(By.XPATH, "//*[@id='tabs']//*[text()='Routing map']").click()
    first = wait_for(driver, routing_state)
    assert "t=1000" in first[0]
    driver.find_element(By.CSS_SELECTOR, "#sel-t [role='slider']").send_keys(Keys.ARROW_RIGHT)
    second = wait_for(driver, lambda d: (s := routing_state(d)) and s[0] != first[0] and s)
    assert "t=667" in second[0] and second[1] != first[1]
    assert "t=1" in driver.current_url and "view=routing" in driver.current_url
    # choosing an expert opens its page
    driver.find_element(By.XPATH, "//*[@id='tabs']//*[text()='Specialization']").click()
    title = click_until(driver, "//button[contains(., 'expert 2')]",
                        lambda d: d.find_elements(By.ID, "expert-title"))[0]
    assert "Expert 2" in title.text
    assert "view=expert" in driver.current_url and "expert=2" in driver.current_url
    assert console_errors(driver) == []


def test_browser_lasso_fills_the_table(browser, env):
    from selenium.webdriver.common.by import By

    from .dashboard_browser import lasso_all

    driver, url, ctx = browser
    driver.get(f"{url}/?trace={trace_id(env['derived'])}&view=latent")
    lasso_all(driver, "#lat-scatter .nsewdrag")
    rows = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#lat-table td"))
    assert rows
    assert "selected" in driver.find_element(By.ID, "lat-patches").text
    assert console_errors(driver) == []


def test_browser_intervention_changes_the_image(browser, env):
    from selenium.webdriver.common.by import By

    driver, url, ctx = browser
    driver.get(f"{url}/?trace={trace_id(env['trace'])}&view=intervene&expert=1")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#iv-grid .main-svg"))
    driver.find_element(By.ID, "iv-run").click()
    summary = wait_for(driver, lambda d: d.find_elements(By.ID, "iv-summary"), timeout=90)[0].text
    diff = float(summary.split("image mean |diff| ")[1].split(" ")[0])
    assert diff > 0
    before = driver.find_element(By.ID, "iv-img-before").get_attribute("src")
    after = driver.find_element(By.ID, "iv-img-after").get_attribute("src")
    assert before != after
    assert console_errors(driver) == []


def test_live_trace_updates_without_reload(tmp_path):
    """A trace whose writer is still running (SWMR): the page's live poll picks up new steps."""
    from traces import SampleTable, SamplingLayout, SamplingWriter
    from traces.synthetic import coherent_routing

    path = tmp_path / "live.h5"
    lo = SamplingLayout(n_experts=4, layers=[1], steps=2, tokens=64, timesteps=[0, 1, 2],
                        timestep_values=[900.0, 500.0, 100.0])
    ids = coherent_routing(np.random.default_rng(0), (2, 3, 1, 1, 2, 64), n_experts=4, cell=4)
    live = "..version.data...live-status.children...live-tick.disabled.."
    with SamplingWriter(path, lo, SampleTable(prompt=["a", "b"], seed=[0, 1])) as w:
        w.begin_batch(2)
        w.write_timestep(0, ids[:, 0])
        ctx = make_context([str(path)], permutations=9)
        app = create_app(ctx)
        tid = ctx.registry.ids()[0]
        first = call(app, live, {"sel-trace.value": tid, "version.data": 0}, "live-tick.n_intervals")
        assert first["version"]["data"] == 1 and "1 steps written" in first["live-status"]["children"]
        w.write_timestep(1, ids[:, 1])
        second = call(app, live, {"sel-trace.value": tid, "version.data": 1}, "live-tick.n_intervals")
        assert second["version"]["data"] == 2
        out = call(app, ROUTING, {"tabs.value": "routing", "sel-trace.value": tid, "sel-sample.value": 1,
                                  "sel-branch.value": "cond", "sel-t.value": 1, "sel-layer.value": 1,
                                  "sel-step.value": 1}, "version.data")
        assert "t=500" in out["routing-map"]["figure"]["layout"]["title"]["text"]  # the step written while open
        assert "msg-error" not in json.dumps(out["routing-msg"])
    ctx.registry.close()


def test_projections_computed_from_the_page(env, tmp_path):
    """A trace with latents but no /derived: the button's job releases the file, runs
    probes.derive, and the explorer then draws the projections."""
    path = tmp_path / "plain.h5"
    shutil.copy(env["trace"], path)
    ctx = make_context([str(path)], permutations=9)
    app = create_app(ctx)
    tid = ctx.registry.ids()[0]
    ctx.registry.reader(tid)  # held open, as the page does
    job = call(app, "..lat-job.data...lat-poll.disabled..", {"lat-derive.n_clicks": 1, "sel-trace.value": tid},
               "lat-derive.n_clicks")["lat-job"]["data"]
    poll = "..lat-msg.children...lat-poll.disabled...lat-done.data.."

    def finished():
        """The page's poll, as its interval fires: progress while the job runs, then done."""
        nonlocal out
        out = call(app, poll, {"lat-job.data": job, "lat-done.data": 0}, "lat-poll.n_intervals")
        if not out["lat-poll"]["disabled"]:
            assert "⏳" in text_of(out["lat-msg"]["children"])  # progress while it runs
        return out["lat-poll"]["disabled"]
    out = None
    wait_until(finished, timeout=60, waiting_for="the projections job to finish", poll_s=0.1)
    assert "projections computed" in text_of(out["lat-msg"]["children"]) and out["lat-done"]["data"] == 1
    fig = call(app, "..lat-scatter.figure...lat-msg.children...lat-derive.style..",
               {"tabs.value": "latent", "sel-trace.value": tid, "sel-layer.value": 2, "lat-method.value": "pca",
                "lat-colour.value": "timestep", "lat-max.value": 10000}, "lat-done.data")
    assert fig["lat-scatter"]["figure"]["data"][0]["type"] == "scattergl"
    ctx.registry.close()


def test_browser_uses_the_dashboard_bundle(browser, env):
    """The page draws with the dashboard's own plotly.js (assets/plotly-dashboard.min.js: only the
    traces the views use), never fetches the 4.8 MB plotly.min.js, and that bundle draws the
    views' Sankey and WebGL scatter (tests/test_plotly_bundle.py checks it lists every trace type)."""
    from plotly.offline import get_plotlyjs_version
    from selenium.webdriver.common.by import By

    from .test_plotly_bundle import trace_types_built

    driver, url, ctx = browser
    driver.get(f"{url}/?trace={trace_id(env['derived'])}&view=flow&layer=2&step=1")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#flow-body .js-plotly-plot g.sankey"))
    scripts = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("/assets/plotly-dashboard.min.js" in s for s in scripts)
    assert not any("plotly.min.js" in s and "plotly-dashboard" not in s for s in scripts), scripts
    assert driver.execute_script("return Plotly.version") == get_plotlyjs_version()
    registered = set(driver.execute_script("return Object.keys(Plotly.PlotSchema.get().traces)"))
    assert trace_types_built() <= registered
    driver.find_element(By.XPATH, "//*[@id='tabs']//*[text()='Latent explorer']").click()
    drawn = ("const gd = document.querySelector('#lat-scatter .js-plotly-plot');"
             "return !!(gd && gd._fullData && gd._fullData.length && gd._fullData[0].type === 'scattergl'"
             " && gd._fullData[0].visible === true && gd.querySelector('canvas.gl-canvas'));")
    wait_for(driver, lambda d: d.execute_script(drawn))
    assert console_errors(driver) == []


def test_browser_click_on_an_overview_cell_selects_it(browser, env):
    """A click on a cell of the overview (one heatmap row per layer, the recursion steps side by side)
    selects that cell's timestep, layer, recursion step and expert."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver, url, ctx = browser
    tid = trace_id(env["trace"])
    report = ctx.registry.report(tid)
    steps = [int(s) for s in report["trace"]["steps"]]
    timesteps = report["trace"]["timestep_values"]
    driver.get(f"{url}/?trace={tid}&view=overview&step=0&t=0&expert=0")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#overview-share .main-svg"))
    # the cell of expert 1 at the second-noisiest timestep of the last recursion step
    n_t = len(timesteps)
    column = (len(steps) - 1) * (n_t + 1) + 1
    name, dx, dy = driver.execute_script(
        "const gd = document.querySelector('#overview-share .js-plotly-plot');"
        "const name = gd.data[0].x[arguments[0]]; const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;"
        "return [name, xa._offset + xa.d2p(name), ya._offset + ya.d2p('e1')];", column)
    assert name.endswith(f"step {steps[-1]}")
    plot = driver.find_element(By.CSS_SELECTOR, "#overview-share .js-plotly-plot")
    w, h = plot.size["width"], plot.size["height"]
    ActionChains(driver).move_to_element(plot).move_by_offset(int(dx - w // 2), int(dy - h // 2)).click().perform()
    second = sorted(range(n_t), key=lambda i: -timesteps[i])[1]  # columns run noisiest first
    wait_for(driver, lambda d: f"step={len(steps) - 1}" in d.current_url and "expert=1" in d.current_url)
    assert f"t={second}&" in driver.current_url + "&" and f"layer={report['trace']['layers'][0]}" in driver.current_url
    assert console_errors(driver) == []

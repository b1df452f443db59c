"""Issue 21, "Wrong today": each item driven in headless Chromium on a real recorded trace of the
tiny model (and, where the page cannot produce the request, the request sent from the page with
fetch, as a crafted one would be)."""

import json
import time

import numpy as np
import pytest

from dashboard.app import create_app
from dashboard.common import make_context
from dashboard.data import trace_id
from tests.dashboard_browser import (
    chromium,
    click,
    drag_box,
    lasso_all,
    payload,
    record_env,
    serving,
    severe_console_errors,
    text,
    text_of,
    wait_for,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """64 stored latent tokens: one layer holds 2 prompts x 4 timesteps x 3 steps x 64 tokens = 1,536 points
    per branch (more than the table lists)."""
    return record_env(tmp_path_factory.mktemp("wrong"), latent_tokens=64)


@pytest.fixture(scope="module")
def page(env):
    """(driver, base url, app, ctx): the dashboard on the served folder with --ckpt, in Chromium."""
    ctx = make_context([str(env["served"])], env["ckpt"], permutations=9)
    app = create_app(ctx)
    with serving(app.server) as url, chromium() as driver:
        yield driver, url, app, ctx
    ctx.registry.close()


def open_view(driver, url, query):
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/?{query}")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#tabs"))


def test_1_recursion_flow_per_timestep_bin(page, env):
    """Choosing a timestep bin drew `KeyError: 'matrix'` (the report keeps no per-bin matrices)."""
    from selenium.webdriver.common.by import By

    driver, url, app, ctx = page
    open_view(driver, url, f"trace={trace_id(env['trace'])}&view=flow")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#flow-body .main-svg"))
    report = ctx.registry.report(trace_id(env["trace"]))
    for b in (1, 3):
        click(driver, "//*[@id='flow-bin']")
        click(driver, f"//*[starts-with(normalize-space(text()), 'bin {b}:')]")  # the list is a popup elsewhere
        # the bin's numbers are that bin's: the report's scalars for the bin head its matrices
        stats = report["layers"]["2"]["transitions"]["0->1"]["by_timestep_bin"][b]
        want = (f"H(next | current) {stats['cond_entropy']:.2f} vs {stats['next_entropy']:.2f} if independent",
                f"persistence {stats['persistence']:.2f} vs chance {stats['chance']:.2f}")
        body = wait_for(driver, lambda d: (t := text(d, "flow-body")) and all(w in t for w in want) and t)
        assert "KeyError" not in body and "error" not in body.lower()
    assert severe_console_errors(driver) == []


def test_2_region_painting_sticks(page, env):
    """A box on the grid became the region and was reset to the whole image by the redraw."""
    driver, url, app, ctx = page
    open_view(driver, url, f"trace={trace_id(env['trace'])}&view=intervene&expert=1")
    drag_box(driver, "#iv-grid .nsewdrag", (0.15, 0.15, 0.55, 0.55))
    wait_for(driver, lambda d: "region rows" in text(d, "iv-region-text"))
    time.sleep(2.0)  # the grid redraws with the region's frame; the region must survive it
    region = text(driver, "iv-region-text")
    assert region.startswith("region rows"), region
    click(driver, "//*[@id='iv-run']")
    wait_for(driver, lambda d: "rows" in text(d, "iv-runs-table"), timeout=120)
    assert "whole image" not in text(driver, "iv-runs-table")
    click(driver, "//*[@id='iv-clear']")
    wait_for(driver, lambda d: text(d, "iv-region-text") == "whole image")


def test_3_interventions_that_select_nothing_are_refused(page, env):
    """A window covering no sampled timestep (reached from the page's slider), and crafted
    windows, regions and kinds, all ran and ended "done" with nothing changed."""
    from selenium.webdriver.common.by import By

    driver, url, app, ctx = page
    tid = trace_id(env["trace"])
    open_view(driver, url, f"trace={tid}&view=intervene&expert=1")
    covered = wait_for(driver, lambda d: (t := text(d, "iv-covered")) and "covers" in t and t)
    assert "covers 4 of 4 sampled timesteps the trace recorded: 1000, 667, 334, 1" in covered
    type_into(driver, "#iv-window .dash-range-slider-max-input", "5")  # the slider's own number boxes
    one = "window 0..5 covers 1 of 4 sampled timesteps the trace recorded: 1"
    wait_for(driver, lambda d: one in text(d, "iv-covered"))
    type_into(driver, "#iv-window .dash-range-slider-min-input", "2")  # 2..5: between the last two samples
    wait_for(driver, lambda d: "covers none of the sampled timesteps" in text(d, "iv-covered"))
    assert driver.find_element(By.ID, "iv-run").get_attribute("disabled")
    # crafted requests, sent from the page as it sends its own
    start = "..iv-job.data...iv-poll.disabled...iv-msg.children.."
    base = {"sel-trace.value": tid, "sel-sample.value": 0, "sel-t.value": 0, "sel-layer.value": 2,
            "sel-step.value": 0, "sel-expert.value": 1, "iv-kind.value": "force", "iv-only-step.value": [],
            "iv-window.value": [0, 1000], "iv-region.data": None, "iv-run.n_clicks": 1}
    cases = {"covers none of the sampled": {"iv-window.value": [1001, 2000]},
             "finite": {"iv-window.value": ["NaN", "NaN"]},
             "rows 3:3": {"iv-region.data": {"rows": [3, 3], "cols": [0, 4]}},
             "cols 5:2": {"iv-region.data": {"rows": [0, 4], "cols": [5, 2]}},
             "'explode'": {"iv-kind.value": "explode"}}
    for expected, change in cases.items():
        body = payload(app, start, {**base, **change}, "iv-run.n_clicks")
        status, reply = post_from_page(driver, url, body)
        assert status == 200, reply
        response = json.loads(reply)["response"]
        assert "iv-job" not in response  # no job started
        assert expected in text_of(response["iv-msg"]["children"]), (expected, reply)


def unused_expert_block(trace, t_index: int, size: int = 3) -> tuple[int, int, int]:
    """(expert, row, col): a size x size block of the token grid where, in the recorded trace, that
    expert routes no token of sample 0 at timestep t_index (any branch, any recursion step, layer 2)."""
    from traces import open_trace

    tr = open_trace(trace)
    ids = tr.routing(layer=2)[0, :, t_index]  # (branch, step, token)
    h, w = (int(v) for v in tr.attrs["token_grid"])
    grid = ids.reshape(ids.shape[0], ids.shape[1], h, w)
    K = len(tr.coords["expert"])
    counts = np.bincount(ids.ravel(), minlength=K)
    for e in np.argsort(counts):  # the rarest expert first
        for r in range(h - size + 1):
            for c in range(w - size + 1):
                if not (grid[:, :, r:r + size, c:c + size] == e).any():
                    return int(e), r, c
    raise AssertionError("every 3x3 block uses every expert")


BOX = ("const gd = document.querySelector('#iv-grid .js-plotly-plot');"
       "const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, b = arguments[0];"
       "return [xa.l2p(b[0]) / xa._length, ya.l2p(b[1]) / ya._length, xa.l2p(b[2]) / xa._length,"
       "        ya.l2p(b[3]) / ya._length];")


def test_3_an_intervention_that_changes_nothing_is_flagged(page, env):
    """A run whose window and region select tokens but whose intervention changes none of them
    (ablating an expert no token there is routed to) ends "done" like any other: it must be
    flagged in the result, the message line and the runs table, while a run that does change
    routing (forcing that expert on the same tokens) is not."""
    from selenium.webdriver.common.by import By

    driver, url, app, ctx = page
    expert, r, c = unused_expert_block(env["trace"], t_index=3)
    open_view(driver, url, f"trace={trace_id(env['trace'])}&view=intervene&expert={expert}&t=3")
    type_into(driver, "#iv-window .dash-range-slider-max-input", "5")  # covers t = 1 only: timestep index 3
    wait_for(driver, lambda d: "covers 1 of 4 sampled timesteps the trace recorded: 1" in text(d, "iv-covered"))
    wait_for(driver, lambda d: d.execute_script("const g = document.querySelector('#iv-grid .js-plotly-plot');"
                                                "return !!(g && g._fullLayout && g._fullLayout.xaxis._length);"))
    # a box whose corners lie 0.35 of a cell inside the block's outer cells: their centres are inside
    frac = driver.execute_script(BOX, [c - 0.35, r - 0.35, c + 2.35, r + 2.35])
    drag_box(driver, "#iv-grid .nsewdrag", tuple(frac))
    region = f"region rows {r}:{r + 3}, cols {c}:{c + 3}"
    wait_for(driver, lambda d: text(d, "iv-region-text") == region)
    flagged = "//*[@id='iv-runs-rows']//td[@class='flag']"
    for run, kind in enumerate(("force", "ablate"), 1):
        click(driver, f"//*[@id='iv-kind']//label[normalize-space()='{kind}']")
        click(driver, "//*[@id='iv-run']")
        wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#iv-runs-rows tr")) == run + 1, timeout=180)
        newest = driver.find_elements(By.CSS_SELECTOR, "#iv-runs-rows tr")[1].text
        assert f"{kind} e{expert}" in newest and f"rows {r}:{r + 3}, cols {c}:{c + 3}" in newest, newest
        changed = wait_for(driver, lambda d: text(d, "iv-changed"))
        if kind == "force":  # every token of the block, in both branches, at each of the 3 steps
            assert changed == "routing decisions the intervention changed over the run: 54", changed
            assert "no effect" not in newest and not driver.find_elements(By.XPATH, flagged)
            assert "changed no routing decision" not in text(driver, "iv-msg")
        else:
            assert changed == "routing decisions the intervention changed over the run: 0 (no effect)", changed
            assert driver.find_element(By.ID, "iv-changed").get_attribute("class") == "flag"
            assert "this intervention changed no routing decision (0 tokens): it never fired" in text(driver, "iv-msg")
            cells = driver.find_elements(By.XPATH, flagged)
            assert [cell.text for cell in cells] == ["0 (no effect)"], newest  # the ablation's row only
    assert severe_console_errors(driver) == []


def type_into(driver, css: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, css))[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value, Keys.TAB)  # the box commits its value when it loses focus


def post_from_page(driver, url: str, body: dict) -> tuple[int, str]:
    """POST a callback body from the open page (the browser's fetch); (status, text)."""
    return tuple(driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0] + '/_dash-update-component', {method: 'POST', headers: {'Content-Type': "
        "'application/json'}, body: arguments[1]}).then(r => r.text().then(t => done([r.status, t])))"
        ".catch(e => done([0, String(e)]));", url, json.dumps(body)))


WRITER = """
import sys
import numpy as np
from traces import SampleTable, SamplingLayout, SamplingWriter
from traces.synthetic import coherent_routing

lo = SamplingLayout(n_experts=4, layers=[1], steps=2, tokens=64, timesteps=[0, 1, 2],
                    timestep_values=[900.0, 500.0, 100.0])
ids = coherent_routing(np.random.default_rng(0), (2, 3, 1, 1, 2, 64), n_experts=4, cell=4)
w = SamplingWriter(sys.argv[1], lo, SampleTable(prompt=["a", "b"], seed=[0, 1]))
w.begin_batch(2)
w.write_timestep(0, ids[:, 0])
print("one step", flush=True)
sys.stdin.readline()  # the test says when to finish
for t in (1, 2):
    w.write_timestep(t, ids[:, t])
w.close()
print("closed", flush=True)
"""


def test_4_finished_live_recording_reads_complete(tmp_path):
    """A recording that finished while the page followed it kept 'writer closed without finishing'
    (the writer is another process, as `probes.record` is: a reader in the writer's own process
    shares its file and would see the flag)."""
    import subprocess
    import sys

    path = tmp_path / "live.h5"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "one step"
        ctx = make_context([str(path)], permutations=9)
        app = create_app(ctx)
        with serving(app.server) as url, chromium() as driver:
            driver.get(f"{url}/?view=routing")
            wait_for(driver, lambda d: "updating while its writer runs" in text(d, "live-status"))
            writer.stdin.write("finish\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "closed"
            wait_for(driver, lambda d: "steps written" not in text(d, "live-status"), timeout=30)
            time.sleep(5)  # more polls: the label must not come back
            assert text(driver, "live-status") == ""
            assert ctx.registry.reader(ctx.registry.ids()[0]).complete
            wait_for(driver, lambda d: "t=100" in d.page_source or "t=900" in d.page_source)
        ctx.registry.close()
    finally:
        writer.kill()


def test_5_bad_values_are_one_line_messages_not_500s(page, env):
    """The latent selection's errors were HTTP 500s; Intervene's start had no guard; negative
    indices wrapped (sample -1 showed the last sample, expert -1 a page 'Expert -1')."""
    driver, url, app, ctx = page
    tid = trace_id(env["derived"])
    open_view(driver, url, f"trace={tid}&view=latent")
    sel = {"sel-trace.value": tid, "sel-sample.value": 0, "sel-branch.value": "cond", "sel-t.value": 0,
           "sel-layer.value": 2, "sel-step.value": 0, "sel-expert.value": 0}
    select = "..lat-table.data...lat-table.columns...lat-patches.children.."
    start = "..iv-job.data...iv-poll.disabled...iv-msg.children.."
    cases = [
        (select, {**sel, "lat-method.value": "pca", "lat-max.value": 50000,
                  "lat-scatter.selectedData": {"points": [{"pointIndex": 10**9}]}}, "lat-scatter.selectedData",
         "lat-patches", "point indices"),
        (select, {**sel, "lat-method.value": "tsne", "lat-max.value": 50000,
                  "lat-scatter.selectedData": {"points": [{"pointIndex": 0}]}}, "lat-scatter.selectedData",
         "lat-patches", "projection 'tsne'"),
        (start, {**sel, "sel-expert.value": "x", "sel-step.value": 99, "iv-window.value": None,
                 "iv-kind.value": "force", "iv-run.n_clicks": 1}, "iv-run.n_clicks", "iv-msg", "expert 'x'"),
        (start, {**sel, "sel-step.value": 99, "iv-window.value": None, "iv-kind.value": "force",
                 "iv-run.n_clicks": 1}, "iv-run.n_clicks", "iv-msg", "recursion step 99"),
        ("filmstrip-body.children", {**sel, "tabs.value": "filmstrip", "sel-sample.value": -1}, "tabs.value",
         "filmstrip-body", "sample -1: this trace has samples 0..1"),
        ("expert-body.children", {**sel, "tabs.value": "expert", "sel-expert.value": -1}, "tabs.value",
         "expert-body", "expert -1: this trace has experts 0..5"),
        ("routing-map.figure" if False else
         "..routing-map.figure...routing-decoded.src...routing-final.src...routing-decoded-note.children"
         "...routing-msg.children...routing-key.data..", {**sel, "tabs.value": "routing", "sel-t.value": -1},
         "tabs.value", "routing-msg", "timestep -1"),
    ]
    for output, values, changed, where, expected in cases:
        status, reply = post_from_page(driver, url, payload(app, output, values, changed))
        assert status == 200, (expected, reply[:300])
        shown = text_of(json.loads(reply)["response"][where]["children"])
        assert expected in shown and "Expert -1" not in shown, (expected, shown)
        assert len(shown.splitlines()) <= 1


def test_6_big_lasso_says_how_many_and_samples_patches(page, env):
    """A lasso over every point listed 1,000 rows without saying so, and its patches were the
    first 24 rows (one sample at t = 1000)."""
    from selenium.webdriver.common.by import By

    driver, url, app, ctx = page
    open_view(driver, url, f"trace={trace_id(env['derived'])}&view=latent")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#lat-scatter .nsewdrag"))
    wait_for(driver, lambda d: " points, coloured by" in d.page_source)
    lasso_all(driver, "#lat-scatter .nsewdrag")
    count = wait_for(driver, lambda d: (t := text(d, "lat-count")) and "selected" in t and t, timeout=60)
    n = int(count.split(" points selected")[0].replace(",", ""))
    assert n > 1000
    assert f"the table lists the first 1,000 of {n:,}" in count
    captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#lat-patches figcaption")]
    assert len(captions) == 24
    assert len({c.split(" t")[1] for c in captions}) > 1  # patches from more than one timestep
    summary = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#lat-summary .main-svg"))
    assert summary and "recursion step" in text(driver, "lat-summary")
    assert severe_console_errors(driver) == []

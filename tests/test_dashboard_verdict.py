"""One verdict everywhere: a demo-like folder (tiny checkpoint, trace, routing_value.json beside it); the
verdict `probes.report --routing-value` writes and the one the dashboard's page shows are the same text."""

import json
import shutil
import threading

import pytest

from dashboard.app import create_app
from dashboard.common import make_context
from dashboard.data import ROUTING_VALUE_SCHEMA, find_routing_value, trace_id
from probes.record import main as record_main
from probes.report import main as report_main
from probes.routing_value import main as value_main
from rsr_model.__main__ import main as rsr_main

from .test_dashboard import _free_port, wait_for


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    ckpt = d / "tiny.pt"
    assert rsr_main(["train", "--out", str(ckpt), "--steps", "2", "--batch-size", "4"]) == 0
    (d / "prompts.txt").write_text("a green triangle\n")
    trace = d / "trace.h5"
    assert record_main(["--ckpt", str(ckpt), "--prompts", str(d / "prompts.txt"), "--num-samples", "1",
                        "--steps", "3", "--out", str(trace), "--probs"]) == 0
    value = d / "routing_value.json"
    assert value_main(["--ckpt", str(ckpt), "--samples", "2", "--bins", "1", "--random-draws", "1",
                       "--held-out-sets", "1", "--json", str(value)]) == 0
    report = d / "report.json"
    assert report_main([str(trace), "--no-probes", "--permutations", "19", "--routing-value", str(value),
                        "--json", str(report)]) == 0
    return {"dir": d, "ckpt": ckpt, "trace": trace, "value": value, "report": json.loads(report.read_text())}


def test_the_routing_value_of_the_traces_checkpoint_is_found(demo, tmp_path):
    from probes.routing_value import ROUTING_VALUE_SCHEMA as schema

    assert ROUTING_VALUE_SCHEMA == schema
    sha = demo["report"]["trace"]["checkpoint_sha256"]
    assert find_routing_value(demo["trace"], sha) == demo["value"]
    assert find_routing_value(demo["trace"], "0" * 64) is None  # another checkpoint's value is not this one's
    # beside the checkpoint only: found through the recording command's --ckpt
    away = tmp_path / "traces"
    away.mkdir()
    shutil.copy(demo["trace"], away / "t.h5")
    assert find_routing_value(away / "t.h5", sha) is None
    assert find_routing_value(away / "t.h5", sha, f"python -m probes.record --ckpt {demo['ckpt']}") == demo["value"]


def test_report_and_dashboard_show_the_same_verdict(demo):
    import shutil as sh

    if not (sh.which("chromedriver") and (sh.which("chromium") or sh.which("google-chrome"))):
        pytest.skip("chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from werkzeug.serving import make_server

    expected = demo["report"]["layers"]
    layer = next(iter(expected))
    verdict = expected[layer]["steps"]["0"]["verdict"]
    assert "value not measured" not in verdict["text"] and "routing value" in verdict["text"]
    ctx = make_context([str(demo["dir"])], demo["ckpt"], permutations=19)
    app = create_app(ctx)
    port = _free_port()
    server = make_server("127.0.0.1", port, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1366,768", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(sh.which("chromedriver")), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/?trace={trace_id(demo['trace'])}&view=overview")
        shown = wait_for(driver, lambda d: d.find_elements(By.ID, "overview-verdict"), timeout=120)[0].text
        assert shown == f"verdict: {verdict['text']}"
        assert "value not measured" not in driver.page_source
        assert "routing value of checkpoint tiny.pt" in driver.page_source
    finally:
        driver.quit()
        server.shutdown()

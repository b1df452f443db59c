"""One verdict everywhere: a demo-like folder (tiny checkpoint, trace, routing_value.json beside it); the
verdict `probes.report --routing-value` writes and the one the dashboard's page shows are the same text."""

import json
import shutil

import pytest

from dashboard.app import create_app
from dashboard.common import make_context
from dashboard.data import ROUTING_VALUE_SCHEMA, find_routing_value, trace_id
from probes.record import main as record_main
from probes.report import main as report_main
from probes.routing_value import main as value_main
from rsr_model.__main__ import main as rsr_main

from .dashboard_browser import chromium, serving, wait_for


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
    from selenium.webdriver.common.by import By

    expected = demo["report"]["layers"]
    layer = next(iter(expected))
    verdict = expected[layer]["steps"]["0"]["verdict"]
    assert "value not measured" not in verdict["text"] and "routing value" in verdict["text"]
    app = create_app(make_context([str(demo["dir"])], demo["ckpt"], permutations=19))
    with chromium() as driver, serving(app.server) as url:
        driver.get(f"{url}/?trace={trace_id(demo['trace'])}&view=overview")
        shown = wait_for(driver, lambda d: d.find_elements(By.ID, "overview-verdict"), timeout=120)[0].text
        assert shown == f"verdict: {verdict['text']}"
        assert "value not measured" not in driver.page_source
        assert "routing value of checkpoint tiny.pt" in driver.page_source

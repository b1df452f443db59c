"""The Results tab shows the served folder's own report.json and routing_value.json (as the
demo writes them), and no file a symlink points to outside the folder."""

import json

import numpy as np

from dashboard.app import create_app
from dashboard.common import make_context
from tests.dashboard_browser import call, text_of
from traces import SampleTable, SamplingLayout, SamplingWriter


def test_results_tab_shows_the_folders_own_results(tmp_path):
    served = tmp_path / "demo"
    served.mkdir()
    lo = SamplingLayout(n_experts=2, layers=[1], steps=1, tokens=4, timesteps=[0], timestep_values=[500.0])
    with SamplingWriter(served / "trace.h5", lo, SampleTable(prompt=["a"], seed=[0])) as w:
        w.begin_batch(1)
        w.write_timestep(0, np.zeros((1, 1, 1, 1, 4), np.uint8))
    (served / "report.json").write_text(json.dumps({"schema": "report", "trace": {"experts": 2, "kind": "sampling"},
                                                    "verdict": {"1": {"0": "specialised"}}}))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "routing_value.json").write_text(json.dumps({"SECRET": 1}))
    (served / "routing_value.json").symlink_to(outside / "routing_value.json")
    ctx = make_context([str(served)], permutations=0)
    app = create_app(ctx)
    body = call(app, "results-body.children", {"tabs.value": "results"}, "tabs.value")["results-body"]["children"]
    text = text_of(body)
    assert "demo/report.json" in text and "trace.experts" in text and "verdict.1.0" in text and "specialised" in text
    assert "SECRET" not in json.dumps(body) and "routing_value.json" not in text
    (served / "routing_value.json").unlink()
    (served / "routing_value.json").write_text(json.dumps({"routing_value": 0.12, "ci95": [0.1, 0.14]}))
    text = text_of(call(app, "results-body.children", {"tabs.value": "results"}, "tabs.value")["results-body"]
                   ["children"])
    assert "demo/routing_value.json" in text and "routing_value" in text and "0.12" in text
    ctx.registry.close()

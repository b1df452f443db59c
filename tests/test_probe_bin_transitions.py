"""Known-answer test of `probes.views.bin_transitions`, the per-timestep-bin transition matrices
the Recursion flow view draws (the report keeps only their scalars)."""

import numpy as np
import pytest

from probes.analysis import Options, analyze
from probes.views import bin_transitions, transition_flows
from traces import SampleTable, SamplingLayout, SamplingWriter, open_trace

K = 3


@pytest.fixture
def trace(tmp_path):
    """2 samples x 2 timesteps x 1 layer x 2 steps x 4 tokens. Timestep 0: step 0 -> 1 maps
    0 -> 1, 1 -> 1, 2 -> 2 (token 3 starts at 0); timestep 1: every token keeps its expert."""
    path = tmp_path / "t.h5"
    lo = SamplingLayout(n_experts=K, layers=[5], steps=2, tokens=4, timesteps=[3, 7], timestep_values=[900.0, 100.0])
    ids = np.zeros((2, 2, 1, 1, 2, 4), np.uint8)  # sample, timestep, branch, layer, step, token
    ids[:, 0, ..., 0, :] = [0, 1, 2, 0]
    ids[:, 0, ..., 1, :] = [1, 1, 2, 1]
    ids[:, 1, ..., 0, :] = [0, 1, 2, 2]
    ids[:, 1, ..., 1, :] = [0, 1, 2, 2]
    ids[1, 1, 0, 0, 1, 3] = 255  # one unwritten id: left out of the counts
    with SamplingWriter(path, lo, SampleTable(prompt=["a", "b"], seed=[0, 1])) as w:
        w.begin_batch(2)
        for t in range(2):
            w.write_timestep(t, ids[:, t])
    return path


def test_bin_transitions_known_answer(trace):
    with open_trace(trace) as tr:
        first = bin_transitions(tr, 5, [3])  # sampler timestep 3 (the first recorded)
        second = bin_transitions(tr, 5, [7])
    m = first["transitions"]["0->1"]
    assert np.allclose(m["matrix"], [[0, 1, 0], [0, 1, 0], [0, 0, 1]])
    assert m["n"] == 8 and m["persistence"] == pytest.approx(4 / 8)
    assert m["cond_entropy"] == pytest.approx(0.0)  # the next expert is determined, persistence or not
    assert first["steps"]["0"]["load"]["share"] == pytest.approx([0.5, 0.25, 0.25])
    s = second["transitions"]["0->1"]
    assert s["n"] == 7 and s["persistence"] == pytest.approx(1.0)  # the unwritten id is not counted
    assert np.allclose(s["matrix"], np.eye(3))
    flows = transition_flows({"layers": {"5": first}}, "5")
    assert np.isclose(np.sum(flows["links"][0]["flow"]), 1.0)


def test_bin_transitions_agree_with_the_report(trace):
    report = analyze(trace, Options(n_perm=0, linear_probes=False))
    with open_trace(trace) as tr:
        for b in report["timestep_bins"]:
            got = bin_transitions(tr, 5, b["timesteps"])["transitions"]["0->1"]
            want = report["layers"]["5"]["transitions"]["0->1"]["by_timestep_bin"][b["bin"]]
            for key in ("persistence", "chance", "cond_entropy", "next_entropy", "n"):
                assert got[key] == pytest.approx(want[key], nan_ok=True), (b, key)

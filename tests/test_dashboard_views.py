"""Known-answer tests of `probes.views`, the statistics the dashboard shows beyond the report."""

import numpy as np
import pytest

from probes.analysis import Options, analyze
from probes.views import (
    expert_position_counts,
    flat_gate,
    position_lift,
    share_difference,
    top_tokens,
    transition_flows,
)
from traces import SampleTable, SamplingLayout, SamplingWriter, TrainingLayout, TrainingWriter, open_trace

K = 3


@pytest.fixture
def sampling_trace(tmp_path):
    """2 samples x 2 timesteps x 1 layer x 2 steps x 4 tokens with known ids and probabilities."""
    path = tmp_path / "s.h5"
    lo = SamplingLayout(n_experts=K, layers=[5], steps=2, tokens=4, timesteps=[3, 7], timestep_values=[900.0, 100.0],
                        store_prob=True)
    ids = np.zeros((2, 2, 1, 1, 2, 4), np.uint8)  # sample, timestep, branch, layer, step, token
    ids[..., 0, :] = [0, 1, 2, 0]  # step 0
    ids[..., 1, :] = [1, 1, 2, 2]  # step 1
    ids[1, 1, 0, 0, 1, 3] = 0  # one exception: sample 1, timestep 1, step 1, token 3
    prob = np.full(ids.shape + (K,), 0.1, np.float32)
    np.put_along_axis(prob, ids[..., None].astype(np.int64), 0.8, axis=-1)
    prob[0, 1, 0, 0, 0, 3] = [0.95, 0.025, 0.025]  # the most confident expert-0 token
    with SamplingWriter(path, lo, SampleTable(prompt=["a", "b"], seed=[0, 1])) as w:
        w.begin_batch(2)
        for t in range(2):
            w.write_timestep(t, ids[:, t], prob=prob[:, t])
    return path


def test_expert_position_counts(sampling_trace):
    with open_trace(sampling_trace) as tr:
        c0 = expert_position_counts(tr, layer=5, step=0)
        c1 = expert_position_counts(tr, layer=5, step=1)
        c1_t1 = expert_position_counts(tr, layer=5, step=1, timestep=1)
    # 4 cells (2 samples x 2 timesteps) per token
    assert c0.tolist() == [[4, 0, 0, 4], [0, 4, 0, 0], [0, 0, 4, 0]]
    assert c1.tolist() == [[0, 0, 0, 1], [4, 4, 0, 0], [0, 0, 4, 3]]
    assert c1_t1.tolist() == [[0, 0, 0, 1], [2, 2, 0, 0], [0, 0, 2, 1]]


def test_position_lift_and_share_difference():
    counts = np.array([[3, 1, 0], [1, 3, 0]])  # expert x token; token 2 never recorded
    lift = position_lift(counts)
    assert np.allclose(lift[:, :2], [[1.5, 0.5], [0.5, 1.5]]) and np.isnan(lift[:, 2]).all()
    a = {"layers": {"2": {"steps": {"0": {"load": {"share": [0.5, 0.5]}}, "1": {"load": {"share": [1.0, 0.0]}}}}}}
    b = {"layers": {"2": {"steps": {"0": {"load": {"share": [0.25, 0.75]}}}}}}
    assert share_difference(a, b) == {"2 0": [-0.25, 0.25]}  # cells only one report holds are left out


def test_top_tokens_ranks_by_gate_probability(sampling_trace):
    with open_trace(sampling_trace) as tr:
        best = top_tokens(tr, expert=0, layer=5, step=0, n=3)
        none = top_tokens(tr, expert=1, layer=5, step=0, n=50)
    assert best[0] == {"sample": 0, "branch": "cond", "timestep": 1, "timestep_value": 100.0, "token": 3,
                       "prob": pytest.approx(0.95, abs=1e-3)}
    assert all(b["prob"] == pytest.approx(0.8, abs=1e-3) for b in best[1:])
    assert len(none) == 4 and all(b["token"] == 1 for b in none)  # expert 1 only ever at token 1 in step 0


def test_transition_flows_from_report():
    report = {"layers": {"2": {
        "steps": {"0": {"load": {"share": [0.5, 0.5]}, "load_by_timestep_bin": [{"share": [1.0, 0.0]}]},
                  "1": {"load": {"share": [0.25, 0.75]}, "load_by_timestep_bin": [{"share": [0.5, 0.5]}]}},
        "transitions": {"0->1": {"matrix": [[0.5, 0.5], [0.0, 1.0]],
                                 "by_timestep_bin": [{"matrix": [[0.5, 0.5], [None, None]]}]}}}}}
    f = transition_flows(report, "2")
    assert f["steps"] == ["0", "1"]
    assert np.allclose(f["links"][0]["flow"], [[0.25, 0.25], [0.0, 0.5]])
    assert np.allclose(f["links"][0]["chance"], [[0.125, 0.375], [0.125, 0.375]])
    assert np.isclose(np.sum(f["links"][0]["flow"]), 1.0)
    fb = transition_flows(report, "2", time_bin=0)
    assert np.allclose(fb["links"][0]["flow"], [[0.5, 0.5], [0.0, 0.0]])


def test_flat_gate():
    assert flat_gate({"mean_margin": 0.006}) and not flat_gate({"mean_margin": 0.4})
    assert not flat_gate({"mean_margin": None}) and not flat_gate(None)


def test_training_curves_known_shares_and_mi(tmp_path):
    """The report's pooled training curves (what the Training-health tab draws): expert =
    timestep bin in the first windows (MI = log 2), constant later (MI = 0)."""
    path = tmp_path / "t.h5"
    with TrainingWriter(path, TrainingLayout(n_experts=2, layers=[1], steps=1, tokens=4)) as w:
        for step in (0, 1, 2, 3, 6, 7):  # steps 4-5 not recorded: windows hold recorded steps only
            t = np.array([100.0, 900.0, 100.0, 900.0])
            if step < 2:
                e = np.repeat((t > 500).astype(np.uint8)[:, None, None, None], 4, axis=-1)
            else:
                e = np.zeros((4, 1, 1, 4), np.uint8)
            w.write_events(step, np.arange(4), t, e)
            w.log(step, loss=1.0 / (step + 1), balance=1.0)
    cur = analyze(str(path), Options(n_bins=2, n_perm=19, linear_probes=False))["training_curves"]
    assert cur["window_start_step"] == [0, 1, 2, 3, 6, 7]  # one recorded step per window here
    pooled = cur["pooled"]
    assert np.allclose(pooled["load_share"], [[0.5, 0.5]] * 2 + [[1.0, 0.0]] * 4)
    mi = pooled["mi_timestep_bin"]
    assert mi["mi"][0] == pytest.approx(np.log(2)) and mi["mi"][2] == pytest.approx(0.0)
    assert mi["p_value"][0] < 0.1 and mi["null_mean"][0] < mi["mi"][0] and mi["null_std"][0] >= 0
    assert pooled["gate_norm_entropy"] is None  # no probabilities stored


def test_timestep_axis_and_lift_of_both_trace_kinds():
    from probes.views import timestep_axis, timestep_lift

    sampling = {"trace": {"kind": "sampling", "experts": 2, "timestep_values": [900.0, 100.0]}}
    cell = {"share_by_timestep": {"share": [[0.75, 0.25], [0.5, 0.5]]}}
    assert timestep_axis(sampling).tolist() == [900.0, 100.0]
    assert timestep_lift(sampling, cell).tolist() == [[1.5, 0.5], [1.0, 1.0]]
    training = {"trace": {"kind": "training", "experts": 4}, "timestep_bins": [{"t_min": 0, "t_max": 500},
                                                                             {"t_min": 500, "t_max": 1000}]}
    cell = {"load_by_timestep_bin": [{"share": [1.0, 0, 0, 0]}, {"share": [0.25, 0.25, 0.25, 0.25]}]}
    assert timestep_axis(training).tolist() == [250.0, 750.0]
    assert timestep_lift(training, cell).tolist() == [[4.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]]

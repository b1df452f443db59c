"""The verdict rules: a flat gate is flat whatever the MI; specialized needs a routing value."""

from probes.verdict import step_verdict


def step(margin, ami, p):
    return {"gate": {"mean_margin": margin}, "mi": {"timestep_bin": {"ami": ami, "p_value": p},
                                                    "position": {"ami": ami / 2, "p_value": p}}}


def value(v, lo, hi):
    return {"value": v, "value_ci95": [lo, hi], "gate_below_every_forced": True}


def test_flat_gate_wins_over_everything():
    v = step_verdict(step(0.006, 0.5, 0.005), value(0.3, 0.2, 0.4))
    assert v["label"] == "flat_gate" and "0.006" in v["text"]


def test_specialized_needs_a_value_whose_interval_clears_the_bar():
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.1, 0.05, 0.15))["label"] == "specialized"
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.03, -0.01, 0.07))["label"] == "chance"


def test_routing_that_matters_only_to_co_adapted_steps_is_not_specialized():
    """A step's routing can matter to the steps trained on its output while the adapters together
    change nothing against the frozen base (measured on a warm-started tiny model)."""
    v = step_verdict(step(0.4, 0.2, 0.005), value(0.29, 0.25, 0.33), adapter_gain=-0.0001)
    assert v["label"] == "co_adapted" and "-0.0%" in v["text"]
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.29, 0.25, 0.33), adapter_gain=0.05)["label"] == "specialized"


def test_structure_without_a_value_is_not_called_specialized():
    v = step_verdict(step(0.4, 0.2, 0.005))
    assert v["label"] == "structured_unmeasured" and "timestep_bin" in v["text"]
    assert step_verdict(step(0.4, 0.01, 0.005))["label"] == "chance"  # significant but tiny
    assert step_verdict(step(0.4, 0.2, 0.3))["label"] == "chance"  # large but not significant


def test_no_gate_probabilities():
    v = step_verdict({"mi": {}})
    assert v["label"] == "chance" and v["evidence"]["margin"] is None


def test_small_positive_value_and_missing_p():
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.015, 0.005, 0.025))["label"] == "small"
    v = step_verdict({"gate": {"mean_margin": 0.4}, "mi": {"timestep_bin": {"ami": 0.3, "p_value": None}}})
    assert v["label"] == "chance"  # an MI without its null is not evidence


def test_each_layer_gets_the_value_measured_on_its_own_routing():
    from probes.verdict import add_verdicts

    report = {"layers": {"1": {"steps": {"0": step(0.4, 0.2, 0.005)}}, "3": {"steps": {"0": step(0.4, 0.2, 0.005)}}}}
    routing_value = {"layers": [1, 3], "scopes": {"0": value(0.3, 0.2, 0.4), "1.0": value(0.3, 0.2, 0.4),
                                                  "3.0": value(0.0, -0.01, 0.01)}}
    add_verdicts(report, routing_value)
    assert report["layers"]["1"]["steps"]["0"]["verdict"]["label"] == "specialized"
    assert report["layers"]["3"]["steps"]["0"]["verdict"]["label"] == "chance"  # not layer 1's value
    del routing_value["scopes"]["3.0"]  # no per-layer scope: no value, rather than the pooled one
    add_verdicts(report, routing_value)
    assert report["layers"]["3"]["steps"]["0"]["verdict"]["label"] == "structured_unmeasured"

"""The verdict rules: a measured value decides; specialized needs a measured adapter gain; flatness is judged
whenever the margin is known; planted structure is said to be planted."""

from probes.verdict import add_verdicts, step_verdict


def step(margin, ami, p):
    return {"gate": {"mean_margin": margin}, "mi": {"timestep_bin": {"ami": ami, "p_value": p},
                                                    "position": {"ami": ami / 2, "p_value": p}}}


def value(v, lo, hi, token=None):
    out = {"value": v, "value_ci95": [lo, hi], "gate_below_every_forced": True}
    if token is not None:
        out["value_token"], out["value_token_ci95"] = sum(token) / 2, token
    return out


def gain(g, lo, hi):
    return {"adapter_gain": g, "adapter_gain_ci95": [lo, hi], "routing_share": 0.5}


def test_a_measured_value_decides_and_flatness_explains_a_null():
    v = step_verdict(step(0.006, 0.5, 0.005), value(0.3, 0.2, 0.4), gain(0.05, 0.03, 0.07))
    assert v["label"] == "specialized"  # a flat gate's routing can still be measured to matter
    v = step_verdict(step(0.006, 0.5, 0.005), value(0.0, -0.01, 0.01), gain(0.05, 0.03, 0.07))
    assert v["label"] == "flat_gate" and "flat" in v["text"]
    assert step_verdict(step(0.4, 0.5, 0.005), value(0.0, -0.01, 0.01))["label"] == "chance"


def test_specialized_needs_a_value_above_the_bar_against_both_nulls_and_a_measured_gain():
    good = gain(0.05, 0.03, 0.07)
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.1, 0.05, 0.15), good)["label"] == "specialized"
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.03, -0.01, 0.07), good)["label"] == "chance"
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.1, 0.05, 0.15, token=[0.01, 0.2]), good)["label"] == "small"
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.1, 0.05, 0.15))["label"] == "gain_unmeasured"
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.1, 0.05, 0.15), 0.05)["label"] == "gain_unmeasured"  # schema 1


def test_routing_that_matters_only_to_co_adapted_steps_is_judged_with_the_gain_interval():
    v = step_verdict(step(0.4, 0.2, 0.005), value(0.29, 0.25, 0.33), gain(-0.0001, -0.002, 0.003))
    assert v["label"] == "co_adapted" and "-0.01%" in v["text"]
    # a gain whose interval reaches above the bar but not clearly above 0: not decided either way
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.29, 0.25, 0.33),
                        gain(0.01, -0.01, 0.03))["label"] == "gain_unmeasured"


def test_an_interval_below_zero_is_harmful():
    v = step_verdict(step(0.4, 0.2, 0.005), value(-0.03, -0.05, -0.01), gain(0.05, 0.03, 0.07))
    assert v["label"] == "harmful" and "worse than random" in v["text"]


def test_structure_without_a_value_is_not_called_specialized():
    v = step_verdict(step(0.4, 0.2, 0.005))
    assert v["label"] == "structured_unmeasured" and "timestep_bin" in v["text"]
    assert step_verdict(step(0.4, 0.01, 0.005))["label"] == "chance"  # significant but tiny
    assert step_verdict(step(0.4, 0.2, 0.3))["label"] == "chance"  # large but not significant
    assert step_verdict(step(0.01, 0.2, 0.005))["label"] == "flat_gate"


def test_without_gate_probabilities_the_margin_is_unknown_never_structured():
    v = step_verdict({"mi": {"timestep_bin": {"ami": 0.3, "p_value": 0.001}}})
    assert v["label"] == "margin_unknown" and "unknown" in v["text"] and v["evidence"]["margin"] is None
    v = step_verdict({"mi": {}}, value(0.0, -0.01, 0.01))
    assert v["label"] == "chance" and "margin unknown" in v["text"]


def test_small_positive_value_and_missing_p():
    assert step_verdict(step(0.4, 0.2, 0.005), value(0.015, 0.005, 0.025))["label"] == "small"
    v = step_verdict({"gate": {"mean_margin": 0.4}, "mi": {"timestep_bin": {"ami": 0.3, "p_value": None}}})
    assert v["label"] == "chance"  # an MI without its null is not evidence


def test_planted_structure_is_said_to_be_planted():
    planted = {"layout": "step-band", "steps": 100, "agreement": 0.93, "chance": 1 / 6}
    report = {"layers": {"2": {"steps": {"0": step(0.4, 0.6, 0.001)}}}}
    add_verdicts(report, {"layers": [2], "planted": planted,
                          "scopes": {"0": value(0.0, -0.01, 0.01), "all": gain(0.01, 0.0, 0.02)}})
    text = report["layers"]["2"]["steps"]["0"]["verdict"]["text"]
    assert "planted" in text and "93.0%" in text and "step-band" in text


def test_each_layer_gets_the_value_measured_on_its_own_routing():
    report = {"layers": {"1": {"steps": {"0": step(0.4, 0.2, 0.005)}}, "3": {"steps": {"0": step(0.4, 0.2, 0.005)}}}}
    routing_value = {"layers": [1, 3], "scopes": {"0": value(0.3, 0.2, 0.4), "1.0": value(0.3, 0.2, 0.4),
                                                  "3.0": value(0.0, -0.01, 0.01), "all": gain(0.05, 0.03, 0.07)}}
    add_verdicts(report, routing_value)
    assert report["layers"]["1"]["steps"]["0"]["verdict"]["label"] == "specialized"
    assert report["layers"]["3"]["steps"]["0"]["verdict"]["label"] == "chance"  # not layer 1's value
    del routing_value["scopes"]["3.0"]  # no per-layer scope: no value, rather than the pooled one
    add_verdicts(report, routing_value)
    assert report["layers"]["3"]["steps"]["0"]["verdict"]["label"] == "structured_unmeasured"


def test_harmful_and_small_must_hold_against_both_nulls():
    assert step_verdict(step(0.4, 0.2, 0.005), value(-0.03, -0.05, -0.01, token=[-0.02, 0.01]))["label"] == "chance"
    v = step_verdict(step(0.4, 0.2, 0.005), value(0.012, 0.007, 0.019, token=[-0.005, 0.002]))
    assert v["label"] == "chance" and "per token" in v["text"]  # the tiny checkpoint's step 2 (docs/specialization.md)

"""Calibration on models of known truth: the verdict must be the one stated in advance (probes.calibrate)."""

import json
import math

import pytest

from probes.calibrate import CHEAP, EXPECTED, confusion, main, run_case

from .conftest import assert_refused


def test_every_case_states_its_expected_verdict_in_advance():
    assert set(EXPECTED) == {"band_experts", "identical_experts", "planted_random", "planted_wrong", "flat_gate",
                             "random_trained"}
    assert set(CHEAP) < set(EXPECTED) and "random_trained" not in CHEAP
    with pytest.raises(ValueError):
        run_case("no_such_case")


@pytest.mark.parametrize("case", ["band_experts", "identical_experts", "flat_gate"])
def test_known_truth_gets_its_expected_verdict(case):
    row = run_case(case, n=12, sets=1, draws=2, n_boot=200)  # n=6 leaves the adapter gain undecided
    assert set(row["verdicts"]) == {"0", "1", "2"}
    assert all(v == EXPECTED[case] for v in row["verdicts"].values()), row["texts"]
    table = confusion([row])
    assert f"| {case} | {EXPECTED[case]} |" in table and "| yes |" in table


def test_routing_to_the_wrong_kind_is_worse_than_random_routing_of_the_same_load():
    """planted_wrong (one recursion step, so a step's routing is the whole routing): the routing is below both
    same-load nulls, for the whole routing and at its step, and the verdict is "harmful"."""
    row = run_case("planted_wrong", n=12, sets=1, draws=2, n_boot=200)
    whole, step = row["figures"], row["by_step"]["0"]
    for scope in (whole, step):
        assert scope["value_ci95"][1] < 0 and scope["value_token_ci95"][1] < 0, scope
    assert row["rule"]["name"] == "shifted" and row["rule"]["agreement"] > 0.7, row["rule"]
    assert row["verdicts"] == {"0": "harmful"}, row["texts"]
    assert "| planted_wrong | harmful |" in confusion([row])


def test_planted_structure_without_value_is_exactly_chance_and_named(capsys, tmp_path):
    """Step rule over random experts: every same-load random routing is the gate's own, so both values are 0
    with the degenerate interval [0, 0] at every step, which reads "chance" (not harmful, not small), while
    MI(expert; step) is at its ceiling and the text says the structure was planted by the step rule."""
    out = tmp_path / "rows.json"
    assert main(["--cases", "planted_random", "--samples", "4", "--sets", "1", "--draws", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| planted_random | chance | chance, chance, chance |" in text and "wall time" in text
    row = json.loads(out.read_text())[0]
    for scope in [*row["by_step"].values(), row["figures"]]:
        assert scope["value"] == 0.0 and scope["value_ci95"] == [0.0, 0.0], scope
        assert scope["value_token"] == 0.0 and scope["value_token_ci95"] == [0.0, 0.0], scope
    assert row["rule"] == {"name": "step", "agreement": 1.0, "chance": 1.0}
    assert math.isclose(row["mi_step"]["mi"], math.log(3), rel_tol=1e-9) and row["mi_step"]["ceiling"] == math.log(3)
    assert all("planted" in t and "'step'" in t and "100.0%" in t for t in row["texts"].values()), row["texts"]


def test_an_unknown_case_is_refused_before_any_work(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    assert_refused(main, ["--cases", "band_experts,nope", "--json", str(tmp_path / "out" / "rows.json")],
                   tmp_path / "out", tmp_path / "out", capsys, "'nope'")

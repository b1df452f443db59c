"""Calibration on models of known truth: the verdict must be the one stated in advance (probes.calibrate)."""

import pytest

from probes.calibrate import CHEAP, EXPECTED, confusion, main, run_case


def test_every_case_states_its_expected_verdict_in_advance():
    assert set(EXPECTED) == {"band_experts", "identical_experts", "planted_random", "flat_gate", "random_trained"}
    assert set(CHEAP) < set(EXPECTED)
    with pytest.raises(ValueError):
        run_case("no_such_case")


@pytest.mark.parametrize("case", ["band_experts", "identical_experts", "flat_gate"])
def test_known_truth_gets_its_expected_verdict(case):
    row = run_case(case, n=12, sets=1, draws=2, n_boot=200)  # n=6 leaves the adapter gain undecided
    assert set(row["verdicts"]) == {"0", "1", "2"}
    assert all(v == EXPECTED[case] for v in row["verdicts"].values()), row["texts"]
    table = confusion([row])
    assert f"| {case} | {EXPECTED[case]} |" in table and "| yes |" in table


def test_planted_structure_is_named_in_the_verdict(capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert main(["--cases", "planted_random", "--samples", "4", "--sets", "1", "--draws", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| planted_random | chance |" in text and "wall time" in text
    import json

    row = json.loads(out.read_text())[0]
    assert all("planted" in t for t in row["texts"].values())

"""`evaluate --table --quick`: the ablation table end to end on the tiny preset."""
import json

import numpy as np
import pytest

from evaluation import table
from evaluation.prompts import plan
from rsr_model.__main__ import main

from .conftest import one_error_line


def test_quick_table_end_to_end(quick_table, capsys):
    out, printed = quick_table.out, quick_table.stdout  # run once per session (tests/conftest.py)
    result = json.loads((out / "table.json").read_text())
    md = (out / "table.md").read_text()
    assert md.splitlines()[0] in printed and "RSR − SFT (middle)" in md and "Budget: base trained here" in md
    # one row per mode, the paper's columns, mean and std over the two training seeds
    assert [(r["target"], r["mode"]) for r in result["rows"]] == \
        [("—", "base")] + [("middle", m) for m in table.MODES]
    for row in result["rows"][1:]:
        assert row["seeds"] == [0, 1] and set(row["scores"]) == {*table.COLUMNS}
        scores = [run for run in result["runs"] if run["mode"] == row["mode"]]
        overall = [table.category_scores(run["correct"], [table.PlannedImage(**p) for p in result["plan"]])["overall"]
                   for run in scores]
        assert row["scores"]["overall"]["mean"] == pytest.approx(100 * np.mean(overall))
        assert row["scores"]["overall"]["std"] == pytest.approx(100 * np.std(overall, ddof=1))
    # routing figures only where a gate routes (K > 1)
    routing = {row["mode"]: row["routing"] for row in result["rows"]}
    assert {"gate_entropy", "ami_timestep", "routing_value"} <= set(routing["no_recursion"])
    assert "ami_step" in routing["rsr"] and "ami_step" not in routing["no_recursion"]
    assert routing["sft"] == {} and routing["no_modulation"] == {}
    assert 0 <= routing["rsr"]["gate_entropy"] <= 1
    # the verdict is probes.verdict's, the function the report and the dashboard use (one per training seed)
    from probes.verdict import LABELS, step_verdict

    verdicts = {row["mode"]: row.get("verdicts") for row in result["rows"]}
    assert verdicts["sft"] is None and len(verdicts["rsr"]) == 2 and set(verdicts["rsr"]) <= set(LABELS)
    run = next(r for r in result["runs"] if r["mode"] == "rsr" and r["seed"] == 0)
    fig = run["routing"]
    whole = {"value": fig["routing_value"], "value_ci95": fig["routing_value_ci95"],
             "adapter_gain": fig["adapter_gain"], "adapter_gain_ci95": fig["adapter_gain_ci95"],
             "value_token": fig["value_token"], "value_token_ci95": fig["value_token_ci95"],
             "routing_share": fig["routing_share"]}
    step = {"gate": {"mean_margin": fig["gate_margin"]},
            "mi": {"timestep_bin": {"ami": fig["ami_timestep"], "p_value": fig["p_timestep"]}}}
    assert step_verdict(step, whole, whole)["text"] == fig["verdict_text"]
    assert "| verdict |" in md.splitlines()[0]
    test = result["rsr_vs_sft"]["middle"]
    assert test["pairs"] == 2 * len(plan(table.QUICK.images_per_category)) and 0 <= test["p_value"] <= 1
    # each seed's own difference, from that seed's images under both rows
    correct = {(r["mode"], r["seed"]): np.array(r["correct"]) for r in result["runs"] if r["target"] == "middle"}
    assert test["seeds"] == [0, 1] and test["difference_per_seed"] == [
        pytest.approx(correct["rsr", s].mean() - correct["sft", s].mean()) for s in (0, 1)]
    assert table.per_seed_words(test) in md
    # a finished row is reused, not retrained
    base = out / "checkpoints" / "base.pt"
    _, seconds = table.train_row(out, base, "middle", "rsr", 0, table.QUICK)
    assert seconds == 0.0
    # the results are not replaced by accident
    assert main(["evaluate", "--table", "--quick", "--out", str(out)]) == 2
    assert "exists" in one_error_line(capsys.readouterr().err)


def test_mcnemar_counts_discordant_pairs():
    t = table.mcnemar([True] * 9 + [False, True], [False] * 9 + [True, True])
    assert (t["only_first"], t["only_second"], t["pairs"]) == (9, 1, 11)
    assert t["p_value"] == pytest.approx(0.021484375)  # two-sided binomial, 10 discordant pairs


def test_paired_over_seeds_keeps_each_seeds_difference():
    # seed 0: RSR right on 3 of 4 images SFT missed; seed 1: SFT right on 2 RSR missed
    pairs = [(0, [1, 1, 1, 0], [0, 0, 0, 0]), (1, [0, 0, 1, 1], [1, 1, 1, 1])]
    t = table.paired_over_seeds([(s, np.array(a, bool), np.array(b, bool)) for s, a, b in pairs])
    assert t["seeds"] == [0, 1] and t["difference_per_seed"] == [0.75, -0.5]
    assert (t["pairs"], t["only_first"], t["only_second"]) == (8, 3, 2) and t["difference"] == pytest.approx(0.125)
    assert table.per_seed_words(t) == "; per seed +75.0, -50.0 points"
    assert table.per_seed_words({"pairs": 8}) == ""  # results written before per-seed differences

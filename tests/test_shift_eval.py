"""`evaluate --shift --quick`: the tiny-shift table with its controls, end to end (issue 20)."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from evaluation import shift
from evaluation.table import _complete
from rsr_model.__main__ import main

from .conftest import _captured, _kept_unchanged, assert_refused, one_error_line


@pytest.fixture(scope="module")
def quick_shift(tmp_path_factory):
    """One `evaluate --shift --quick` run: a 4-step tiny-shift base, then the four rows at 6 RSR steps, seed 0."""
    out = tmp_path_factory.mktemp("shift") / "shift"
    rc, stdout, stderr = _captured("rsr_model", "evaluate", "--shift", "--quick", "--out", out)
    assert rc == 0, stderr[-2000:]
    with _kept_unchanged(out):
        yield out, stdout


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_shift_rows_and_figures(quick_shift):
    out, printed = quick_shift
    result = json.loads((out / "shift.json").read_text())
    md = (out / "shift.md").read_text()
    assert md.splitlines()[0] in printed and "| target (issue 20) |" in md
    runs = {r["row"]: r for r in result["runs"]}
    assert list(runs) == list(shift.ROWS) and all(r["seed"] == 0 for r in result["runs"])
    assert [r["row"] for r in result["rows"]] == list(shift.ROWS)
    # r and K from the preset: LoRA r has one expert's parameters, LoRA K*r all K experts' (the gate aside)
    cfg = shift.preset_task().default_rsr()
    assert (runs["lora_r"]["rank"], runs["lora_Kr"]["rank"]) == (cfg.rank, cfg.experts * cfg.rank)
    assert runs["lora_Kr"]["adapter_parameters"] == cfg.experts * runs["lora_r"]["adapter_parameters"]
    assert runs["lora_Kr"]["adapter_parameters"] < runs["rsr"]["adapter_parameters"]
    for r in result["runs"]:  # every row on the same held-out data, against the same frozen base
        assert finite(r["loss"]) and finite(r["adapter_gain"]) and all(map(finite, r["adapter_gain_ci95"]))
        assert r["adapter_gain"] == pytest.approx(
            1 - np.mean(np.asarray(r["loss_by_bin"]) / np.asarray(result["base_loss_by_bin"])))
        assert r["seconds"]["train"] > 0 and r["seconds"]["measure"] > 0 and not r["reused"]
        assert len(r["loss_by_bin"]) == len(result["base_loss_by_bin"]) == shift.QUICK.value_bins
    # each row was trained with its own flags, from the one base
    from rsr_model.checkpoint import load_checkpoint

    trained = {r["row"]: load_checkpoint(out / "checkpoints" / r["checkpoint"]) for r in result["runs"]}
    assert {row: (ck["args"]["mode"], ck["args"]["rank"], ck["args"]["train_routing"], ck["args"]["upcycle_steps"])
            for row, ck in trained.items()} == {"rsr": (None, None, None, 1), "lora_r": ("sft", cfg.rank, None, None),
                                                 "lora_Kr": ("sft", cfg.experts * cfg.rank, None, None),
                                                 "rsr_random": (None, None, "random", None)}
    assert {ck["args"]["base"] for ck in trained.values()} == {str(out / "checkpoints" / "shift_base.pt")}
    # the LoRA rows have no routing value; both gated rows, the learned one and the control, have one
    for row in ("lora_r", "lora_Kr"):
        assert "routing_value" not in runs[row] and "verdict" not in runs[row] and "ami_style" not in runs[row]
    from probes.verdict import LABELS

    for row in shift.GATED:
        r = runs[row]
        whole = r["routing_value"]["scopes"]["all"]
        assert r["routing_value"]["schema"] == "rsr-routing-value" and set(r["routing_value"]["scopes"]) == \
            {"0", "1", "2", "all"}
        for key in ("value", "value_token", "routing_share", "oracle_gap", "argmax_vs_sampled", "gate_vs_best_forced",
                    "ami_style_max", "oracle_value", "gate_margin"):
            assert finite(r[key]), (row, key)
        assert r["value_over_oracle"] is None if r["oracle_value"] <= 0 else finite(r["value_over_oracle"])
        assert r["verdict"] in LABELS and set(r["verdicts"]) == {"2.0", "2.1", "2.2"}
        assert set(r["verdicts"].values()) <= set(LABELS)
        # the row's own loss is the routing value's gate loss, and the frozen base its "no adapter" loss:
        # the same held-out samples everywhere
        assert r["loss"] == pytest.approx(whole["overall"]["gate"], rel=1e-9)
        assert result["base_loss"] == pytest.approx(whole["overall"]["none"], rel=1e-9)
        best = min(whole["overall"]["forced"])
        assert r["gate_vs_best_forced"] == pytest.approx((best - r["loss"]) / best)
        # AMI(expert; style): one expert x style table per recursion step, every styled token counted once
        n_tokens = shift.QUICK.style_samples * shift.QUICK.style_batches * (24 // 2) ** 2
        for step in r["ami_style"]["by_step"].values():
            assert np.asarray(step["table"]).shape == (cfg.experts, 4) and np.sum(step["table"]) == n_tokens
        assert r["ami_style_max"] == max(s["ami"] for s in r["ami_style"]["by_step"].values())
    # every row sampled the same held-out-combination prompts, scored by the style scorer
    prompts, _ = shift.score_prompts(shift.preset_task(), shift.QUICK.score_images)
    from rsr_model.data import styles

    assert all(styles.held_out(*_scene_and_style(p)) for p in prompts)
    for r in result["runs"]:
        assert len(r["correct"]) == shift.QUICK.score_images and r["accuracy"] == pytest.approx(np.mean(r["correct"]))
        assert r["seconds"]["score"] > 0
    acc = result["accuracy_rsr_vs_lora_r"]
    assert acc["seeds"] == [0] and acc["pairs"] == shift.QUICK.score_images
    assert acc["difference"] == pytest.approx(runs["rsr"]["accuracy"] - runs["lora_r"]["accuracy"])
    # the paired comparison: the relative difference of the two rows' losses, per seed
    paired = result["rsr_vs_lora_r"]
    assert paired["seeds"] == [0] and paired["difference_per_seed"][0] == pytest.approx(
        1 - np.mean(np.asarray(runs["rsr"]["loss_by_bin"]) / np.asarray(runs["lora_r"]["loss_by_bin"])))


def _scene_and_style(caption: str):
    """(Scene-like object with the caption's shapes, style) for styles.held_out."""
    from types import SimpleNamespace

    from rsr_model.data import shapes, styles

    head, style = styles.split_caption(caption)
    return SimpleNamespace(objects=[SimpleNamespace(shape=g.shape) for g in shapes.parse_caption(head).groups]), style


def test_quick_shift_targets_follow_the_figures(quick_shift):
    out, _ = quick_shift
    result = json.loads((out / "shift.json").read_text())
    md = (out / "shift.md").read_text()
    assert shift.targets(result) == result["targets"] and len(result["targets"]) == 9
    for t in result["targets"]:
        word = "not measured" if t["met"] is None else "met" if t["met"] else "not met"
        assert f"| {t['figure']} | {t['target']} | {'; '.join(t['per_seed'])} | {word} |" in md
    # computed, not written in: move the learned row's adapter gain across the threshold and the target follows
    rsr = next(r for r in result["runs"] if r["row"] == "rsr")
    for gain, met in ((0.12, True), (0.08, False)):
        rsr["adapter_gain"] = gain
        assert shift.targets(result)[0]["met"] is met
    paired = result["rsr_vs_lora_r"]  # a paired difference counts only when its interval is above 0
    for diff, ci, met in ((0.05, [0.01, 0.08], True), (0.05, [-0.01, 0.08], False), (0.02, [0.01, 0.03], False)):
        paired["difference_per_seed"], paired["ci95_per_seed"] = [diff], [ci]
        assert shift.targets(result)[5]["met"] is met
    control = next(r for r in result["runs"] if r["row"] == "rsr_random")
    control["verdict"], control["value_ci95"] = "chance", [-0.01, 0.01]
    control["verdicts"] = {k: "chance" for k in control["verdicts"]}
    assert shift.targets(result)[6]["met"] is True
    control["verdicts"]["2.1"] = "specialized"  # one step called specialized is enough to fail the control
    assert shift.targets(result)[6]["met"] is False
    acc = result["accuracy_rsr_vs_lora_r"]  # accuracy: >= 600 pairs and the pooled interval above 0
    for pairs, ci, met in ((648, [0.01, 0.05], True), (648, [-0.01, 0.05], False), (300, [0.01, 0.05], False)):
        acc["pairs"], acc["ci95"] = pairs, ci
        assert shift.targets(result)[8]["met"] is met
    del result["accuracy_rsr_vs_lora_r"]  # a result written before the scorer was part of the table
    assert shift.targets(result)[8]["met"] is None


def test_quick_shift_reuses_checkpoints(quick_shift, tmp_path):
    out, _ = quick_shift
    work = tmp_path / "again"
    shutil.copytree(out / "checkpoints", work / "checkpoints")
    base, seconds = shift.train_base(work, shift.QUICK)
    assert seconds == 0.0
    for row in shift.ROWS:  # a rerun trains nothing: every finished row is reused
        path, seconds = shift.train_row(work, base, row, 0, shift.QUICK)
        assert seconds == 0.0 and path.is_file()
    # but not a checkpoint trained with other flags or steps
    other = dataclasses.replace(shift.QUICK, rsr_flags=("--upcycle-steps", "2", "--soft-steps", "1"))
    path = work / "checkpoints" / f"shift_rsr_s0_{shift.base_tag(base)}.pt"
    assert not _complete(path, shift._expect(shift.row_argv(base, "rsr", 0, other), "rsr", other.rsr_steps))
    assert not _complete(path, shift._expect(shift.row_argv(base, "rsr", 0, shift.QUICK), "rsr", 7))


def test_shift_refuses_bad_flags(quick_shift, tmp_path, capsys):
    out, _ = quick_shift
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rsr_ckpt = next((out / "checkpoints").glob("shift_rsr_s0_*.pt"))
    shutil.copy(rsr_ckpt, inputs / "rsr.pt")
    shutil.copy(out / "checkpoints" / "shift_base.pt", inputs / "base.pt")
    target = tmp_path / "out"
    target.mkdir()
    cases = [
        (["--images-per-category", "2"], "--images-per-category does not apply to --shift"),
        (["--guidance", "2"], "--guidance does not apply to --shift"),
        (["--steps", "2"], "--steps 2"),  # upcycling 1 + soft 1 leave no hard-routing step
        (["--seeds", "0", "0"], "more than once"),
        (["--base", str(inputs / "missing.pt")], "not found"),
        (["--base", str(inputs / "rsr.pt")], "not a base-stage checkpoint"),
        (["--base", str(inputs / "base.pt"), "--base-steps", "3"], "--base-steps does not apply with --base"),
    ]
    for extra, fragment in cases:
        assert_refused(main, ["evaluate", "--shift", "--quick", "--out", str(target), *extra], inputs, target,
                       capsys, fragment)
    # results are not replaced by accident
    assert main(["evaluate", "--shift", "--quick", "--out", str(out)]) == 2
    assert "exists" in one_error_line(capsys.readouterr().err)


def test_dashboard_results_tab_shows_shift_json(quick_shift):
    """The Results tab renders shift.json: its title, the held-out loss figure with one point per (row, seed),
    and the targets as evidence lines, without an error."""
    from dashboard.views import results as res
    from dashboard.views.results import results_page

    out, _ = quick_shift
    shown = res.KINDS["shift"].markdown(json.loads((out / "shift.json").read_text()))
    assert shown.strip() == (out / "shift.md").read_text().strip()  # the tab rebuilds the written table exactly
    page = str(results_page(out))
    assert "msg-error" not in page
    assert "Shifted task and its controls" in page and "held-out loss" in page
    assert "same-active" in page or "RSR vs" in page or "routing value" in page

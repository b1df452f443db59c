"""`evaluate --class-conditioned --quick` and the figures it is built from, on known answers."""
import json

import numpy as np
import pytest

from evaluation import digits_quality as dq
from rsr_model.__main__ import main


def test_figures_on_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert dq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # two Gaussians with identity covariance: FD = squared distance of the means (up to sampling)
    assert dq.frechet_distance(a, a + np.array([2.0, 0, 0])) == pytest.approx(4.0, abs=1e-6)
    precision, recall = dq.precision_recall(a, a[:200])
    assert precision == 1.0 and recall < 1.0  # samples from the data are inside its manifold
    far_precision, _ = dq.precision_recall(a, a + 100)
    assert far_precision == 0.0
    assert dq.inception_score(np.eye(10)) == pytest.approx(10.0)  # confident and all classes
    assert dq.inception_score(np.full((5, 10), 0.1)) == pytest.approx(1.0)


def test_quick_class_conditioned_end_to_end(quick_class_conditioned):
    out = quick_class_conditioned.out  # run once per session (tests/conftest.py)
    result = json.loads((out / "class_conditioned.json").read_text())
    assert 0.0 < result["classifier_test_accuracy"] <= 1.0 and result["samples"] == 40
    assert list(result["rows"]) == ["real test split", "DiT (2 steps)", "DiT (4 steps)", "DiT + RSR (2 + 2)"]
    for row in result["rows"].values():
        assert set(dq.FIGURES) <= set(row) and 0 <= row["precision"] <= 1
    md = (out / "class_conditioned.md").read_text()
    assert md.startswith("| Model | FD ↓") and "test accuracy" in md
    assert md.splitlines()[0] in quick_class_conditioned.stdout


def test_planning_hook_refuses_presets_without_planning_figures(dit_base_ckpt, tmp_path, capsys):
    from .conftest import one_error_line

    assert main(["evaluate", "--planning", str(dit_base_ckpt), "--out", str(tmp_path)]) == 2
    assert "no held-out maps to plan on" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("given", [["0", "1", "2"], ["0,1,2"], ["0,1", "2"]])
def test_seeds_take_spaces_or_commas(given):
    from evaluation.cli import _budget
    from rsr_model.__main__ import build_parser

    args = build_parser().parse_args(["evaluate", "--class-conditioned", "--quick", "--seeds", *given, "--out", "x"])
    assert _budget(args, dq.DEFAULT, dq.QUICK).seeds == (0, 1, 2)

"""`python -m rsr_model train --report-to tensorboard`: the event file, read back with
TensorBoard's own reader, holds the loss of every step (as the loss log) and the gate
statistics of every --report-every-th RSR step."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the [track] extra

from rsr_model.__main__ import main as rsr_main

from .conftest import one_error_line

STEPS, EVERY, K = 4, 2, 6  # the tiny preset has K = 6 experts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tracked")
    argv = ["train", "--preset", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--out", str(d / "c.pt"),
            "--report-to", "tensorboard", "--report-every", str(EVERY)]
    assert rsr_main(argv) == 0
    events = EventAccumulator(str(d / "c.pt.logs" / "rsr_model"))
    events.Reload()
    return d, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_event_file_holds_every_quantity(run):
    _, scalars = run
    gate = ["rsr/gate_entropy", "rsr/gate_margin", "rsr/mi_expert_timestep_bin"] + \
           [f"rsr/load/expert_{k}" for k in range(K)]
    assert sorted(scalars) == sorted(["base/loss", "rsr/loss", "rsr/balance"] + gate)
    every_step, reported = list(range(1, STEPS + 1)), list(range(EVERY, STEPS + 1, EVERY))
    for tag in ("base/loss", "rsr/loss", "rsr/balance"):
        assert [s for s, _ in scalars[tag]] == every_step, tag
    for tag in gate:
        assert [s for s, _ in scalars[tag]] == reported, tag


def test_values_are_the_runs_own(run):
    d, scalars = run
    with open(d / "c.pt.log.csv") as f:
        rows = list(csv.DictReader(f))
    for stage in ("base", "rsr"):
        logged = [float(r["loss"]) for r in rows if r["stage"] == stage]
        np.testing.assert_allclose([v for _, v in scalars[f"{stage}/loss"]], logged, atol=1e-5)
    loads = np.array([[v for _, v in scalars[f"rsr/load/expert_{k}"]] for k in range(K)])
    np.testing.assert_allclose(loads.sum(0), 1.0, atol=1e-5)  # shares of all routing decisions
    for tag, lo, hi in (("rsr/gate_entropy", 0, 1), ("rsr/gate_margin", 0, 1), ("rsr/mi_expert_timestep_bin", 0, 2)):
        v = np.array([x for _, x in scalars[tag]])
        assert ((v >= lo) & (v <= hi)).all(), (tag, v)
    # a barely trained gate is close to uniform: entropy near 1, margin near 0
    assert np.array([x for _, x in scalars["rsr/gate_entropy"]]).min() > 0.5


def test_a_tracker_not_installed_is_one_line(tmp_path, capsys):
    from accelerate.tracking import _available_trackers

    have = {getattr(t, "value", str(t)) for t in _available_trackers}
    missing = next((t for t in ("wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive") if t not in have), None)
    if missing is None:
        pytest.skip("every tracker is installed")
    assert rsr_main(["train", "--steps", "1", "--out", str(tmp_path / "c.pt"), "--report-to", missing]) == 2
    assert "not installed" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c.pt").exists()

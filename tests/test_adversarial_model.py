"""`python -m rsr_model train|sample` tried as an adversary would (issue 22, the model commands).

The table: each bad input ends with exit code 2, exactly one `error:` line and no traceback, every
made file byte-identical and nothing written to the output folder (not even a lock file). Then the
results themselves for the classes that wrote wrong results: a training trace during a warm start
stores the ids the model used; a resumed run is the saved run (its seed, learning rate and batch
size, whatever the command line says); two runs to one --out: the second is refused while the
first runs, and the first ends with its checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from .conftest import assert_refused, one_error_line

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "4", "--save-every", "1"]
MAP = "SFFF/FHFH/FFFH/HFFG"
BIG_MAP = "/".join(["S" + "F" * 99] + ["F" * 100] * 98 + ["F" * 99 + "G"])  # 100 x 100, 10 KB


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Checkpoints made once: a two-stage tiny run, a base-stage one, a FrozenLake one."""
    from rsr_model.__main__ import main as rsr

    d = tmp_path_factory.mktemp("made")
    assert rsr(["train", "--out", str(d / "tiny.pt"), "--steps", "2", *FAST]) == 0
    assert rsr(["train", "--stage", "base", "--out", str(d / "base.pt"), "--steps", "1", *FAST]) == 0
    assert rsr(["train", "--preset", "frozenlake", "--out", str(d / "fl.pt"), "--steps", "1", *FAST]) == 0
    (d / "keep.png").write_bytes(b"keep")
    (d / "prompts.txt").write_text("a red circle\n")
    for log in d.glob("*.log.csv"):
        log.unlink()  # (training logs are not inputs of any case)
    return d


@dataclass
class Case:
    """argv may use {m} (the made files, which must stay unchanged) and {t} (the output folder,
    which must stay empty)."""

    klass: str  # the class
    argv: list[str]
    fragment: str  # part of the one error line


TRAIN = ["train", "--steps", "1", "--batch-size", "4", "--out", "{t}/n.pt"]
FL = TRAIN + ["--preset", "frozenlake"]
RESUME = ["train", "--resume", "--out", "{m}/tiny.pt"]
SAMPLE = ["sample", "--ckpt", "{m}/tiny.pt", "--prompt", "a red circle", "--steps", "2", "--out", "{t}/x.png"]
PLAN = ["sample", "--ckpt", "{m}/fl.pt", "--map", MAP, "--out", "{t}/p.png"]

CASES = [
    # 1: an output that is one of the command's inputs is refused, --overwrite or not
    Case("1", ["train", "--stage", "rsr", "--base", "{m}/base.pt", "--steps", "1", "--out", "{t}/n.pt",
               "--trace", "{m}/base.pt", "--overwrite"], "--trace {m}/base.pt is the command's input --base"),
    Case("1", ["train", "--stage", "rsr", "--base", "{m}/base.pt", "--steps", "1", "--out", "{m}/base.pt",
               "--overwrite"], "--out {m}/base.pt is the command's input --base"),
    Case("1", ["train", "--steps", "1", "--out", "{t}/n.pt", "--trace", "{t}/n.pt"], "is also --out"),
    Case("1", ["train", "--steps", "1", "--out", "{t}/n.pt", "--trace", "{t}/n.pt", "--overwrite"], "is also --out"),
    Case("1", ["train", "--steps", "1", "--out", "{t}/n.pt", "--trace", "{t}/n.pt.log.csv"], "is also the loss log"),
    Case("1", ["sample", "--ckpt", "{m}/tiny.pt", "--prompt", "a", "--out", "{m}/tiny.pt", "--overwrite"],
         "is the command's input --ckpt"),
    Case("1", ["sample", "--ckpt", "{m}/tiny.pt", "--prompts-file", "{m}/prompts.txt", "--out", "{m}/prompts.txt",
               "--overwrite"], "is the command's input --prompts-file"),
    Case("1", ["sample", "--ckpt", "{m}/fl.pt", "--map", MAP, "--out", "{m}/fl.pt", "--overwrite"],
         "is the command's input --ckpt"),
    # 7: a resumed run is the saved run: a run-defining flag that differs is refused; no trace of half a run
    Case("7", RESUME + ["--seed", "3"], "--seed 3 differs from the run being resumed (0)"),
    Case("7", RESUME + ["--lr", "0.5"], "--lr 0.5 differs"),
    Case("7", RESUME + ["--batch-size", "8"], "--batch-size 8 differs from the run being resumed (4)"),
    Case("7", RESUME + ["--experts", "4"], "--experts 4 differs"),
    Case("7", RESUME + ["--latent-steps", "2"], "--latent-steps 2 differs"),
    Case("7", RESUME + ["--steps", "5"], "--steps 5 differs"),
    Case("7", RESUME + ["--warm-start", "none"], "--warm-start none differs"),
    Case("7", RESUME + ["--mode", "sft"], "--mode sft differs"),
    Case("7", RESUME + ["--preset", "dit-digits"], "preset"),
    Case("7", RESUME + ["--trace", "{t}/r.h5"], "a resumed run cannot write one"),
    Case("7", RESUME + ["--trace", "{t}/r.h5", "--overwrite"], "a resumed run cannot write one"),
    # 8: a flag that does not apply to the task and stage is refused, not ignored
    Case("8", TRAIN + ["--experts", "1", "--warm-start", "band"], "needs a gate"),
    Case("8", TRAIN + ["--mode", "sft", "--warm-start", "band"], "needs a gate"),
    Case("8", TRAIN + ["--mode", "sft", "--experts", "4"], "does not apply to --mode sft"),
    Case("8", TRAIN + ["--mode", "no_recursion", "--latent-steps", "3"], "does not apply to --mode no_recursion"),
    Case("8", TRAIN + ["--warm-start-steps", "5"], "would never be freed"),
    Case("8", TRAIN + ["--warm-start-steps", "1"], "would never be freed"),
    Case("8", TRAIN + ["--warm-start", "none", "--warm-start-steps", "1"], "this run has none"),
    Case("8", TRAIN + ["--experts", "3", "--balance-weight", "0.1"], "more than 3 experts"),
    Case("8", TRAIN + ["--experts", "2", "--balance-over", "recursion"], "more than 3 experts"),
    Case("8", TRAIN + ["--experts", "1", "--tau", "2"], "tunes the gate"),
    Case("8", ["train", "--steps", "1", "--out", "{t}/new/folder/n.pt", "--experts", "1", "--tau", "2"],
         "tunes the gate"),
    Case("8", TRAIN + ["--experts", "1", "--gate-lr-scale", "2"], "tunes the gate"),
    Case("8", TRAIN + ["--stage", "rsr", "--base", "{m}/tiny.pt"], "is an RSR-stage checkpoint"),
    Case("8", TRAIN + ["--stage", "base", "--experts", "4"], "--stage base trains only the base"),
    Case("8", TRAIN + ["--stage", "base", "--rank", "4"], "--stage base trains only the base"),
    Case("8", TRAIN + ["--stage", "base", "--warm-start", "band"], "--stage base trains only the base"),
    Case("8", TRAIN + ["--stage", "base", "--rsr-ema-decay", "0.9"], "--stage base trains only the base"),
    Case("8", TRAIN + ["--stage", "base", "--trace", "{t}/t.h5"], "--stage base trains only the base"),
    Case("8", TRAIN + ["--stage", "rsr", "--base", "{m}/base.pt", "--ema-decay", "0.5"], "no base stage"),
    Case("8", TRAIN + ["--base", "{m}/base.pt"], "applies only with --stage rsr"),
    Case("8", TRAIN + ["--mixed-precision", "fp16"], "fp16 needs a CUDA GPU"),
    Case("8", TRAIN + ["--trace-every", "2"], "applies only with --trace"),
    Case("8", TRAIN + ["--trace-probs"], "applies only with --trace"),
    Case("8", TRAIN + ["--pretrained", "{m}"], "sd3"),
    Case("8", FL + ["--base", "{m}/base.pt"], "from scratch"),
    Case("8", FL + ["--warm-start", "band"], "true action forces"),
    Case("8", FL + ["--warm-start-steps", "1"], "true action forces"),
    Case("8", FL + ["--balance-weight", "0.1"], "true action forces"),
    Case("8", FL + ["--experts", "8"], "--experts must be 4"),
    Case("8", FL + ["--mode", "sft"], "trains --mode rsr"),
    Case("8", FL + ["--ema-decay", "0.5"], "no base stage"),
    Case("8", PLAN + ["--seed", "3"], "--seed does not apply to preset 'frozenlake'"),
    Case("8", PLAN + ["--seed", "0"], "--seed does not apply to preset 'frozenlake'"),
    Case("8", PLAN + ["--steps", "4"], "--steps does not apply"),
    Case("8", PLAN + ["--guidance", "1"], "--guidance does not apply"),
    Case("8", PLAN + ["--num-samples", "2"], "--num-samples does not apply"),
    Case("8", PLAN + ["--prompt", "a red circle"], "takes --map, not --prompt"),
    # 10: what used to end in a traceback is one line
    Case("10", TRAIN + ["--rank", "1000000000"], "exceeds the width"),
    Case("10", TRAIN + ["--stage", "base", "--steps", "1", "--rank", "1000000000"], "--stage base trains only"),
    Case("10", FL + ["--latent-steps", "3"], "--latent-steps must be 9"),
    Case("10", FL + ["--target-layers", "0"], "--target-layers must be 2"),
    # 11: the output path of `sample --map` is judged before the plan is made
    Case("11", PLAN[:-1] + ["{m}/keep.png"], "exists"),
    Case("11", PLAN[:-1] + ["{t}"], "is a folder"),
    Case("11", PLAN[:-1] + ["{m}/keep.png/p.png"], "is a file, not a folder"),
    Case("11", PLAN[:-1] + ["/proc/p.png"], "cannot write in /proc"),
    # 14: messages say what is true, and cut what they echo
    Case("14", FL + ["--stage", "base"], "from scratch in one stage"),
    Case("14", ["sample", "--ckpt", "{m}/fl.pt", "--map", BIG_MAP, "--out", "{t}/p.png"], "(10099 characters)"),
    Case("14", ["sample", "--ckpt", "{m}/fl.pt", "--map", "a red circle left of a square", "--out", "{t}/p.png"],
         "plans from maps"),
    Case("14", ["evaluate", "--export", "geneval", "--ckpt", "{m}/fl.pt", "--out", "{t}/e"], "plans from maps"),
]


def _main(argv):
    from rsr_model.__main__ import main

    return main(argv)


@pytest.mark.parametrize("case", CASES, ids=[f"class{c.klass}-{c.argv[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(case: Case, made, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(m=made, t=out) for a in case.argv]
    line = assert_refused(_main, argv, made, out, capsys, case.fragment.format(m=made))
    assert len(line) < 400  # one line a person reads, never an echo of a whole input


# --------------------------------------------------------------------------- class 3: the trace itself


def test_training_trace_during_warm_start_stores_the_forced_ids(tmp_path, capsys):
    """Every recorded token of a warm-start step holds the cell the warm start forced (the id the
    model used), not the gate's own draw; the trace says how long the warm start was."""
    from rsr_model.sample import load_model
    from rsr_model.warm_start import WarmStart

    ck, trace = tmp_path / "w.pt", tmp_path / "w.h5"
    assert _main(["train", "--out", str(ck), *FAST, "--steps", "3", "--experts", "6", "--warm-start", "step-band",
                  "--warm-start-steps", "2", "--trace", str(trace), "--trace-every", "1"]) == 0
    task, _, rsr, _ = load_model(ck)
    warm = WarmStart(rsr, "step-band", task.weighting, task.shift)
    with h5py.File(trace, "r") as f:
        steps, t = f["/events/step"][:], f["/events/timestep"][:]
        expert = f["/routing/expert"][:]  # (event, layer, step, token)
        assert f.attrs["complete"]
        assert "2" in str(f.attrs["warm_start"])
    warming = steps <= 2
    assert warming.sum() == 8  # 2 steps x batch 4
    for s in range(expert.shape[2]):
        cells = warm.cell(torch.as_tensor(t[warming]), s).numpy()
        assert (expert[warming, :, s, :] == cells[:, None, None]).all()
    # after the warm start the gate routes by itself: not every token of a sample on one cell
    free = expert[~warming]
    assert any(len(np.unique(free[i, 0, s])) > 1 for i in range(len(free)) for s in range(free.shape[2]))


# --------------------------------------------------------------------------- class 7: the resumed run


def _crash_after(stage: str, step: int):
    def cb(info):
        if info.stage == stage and info.step == step:
            raise KeyboardInterrupt
    return cb


def test_resume_continues_the_saved_run_whatever_the_defaults(tmp_path):
    """A run with a non-default seed, learning rate and batch size, stopped and resumed with `--resume`
    alone, reaches the weights of the run never stopped (the resume used the run's own values and
    recorded them, not the command line's defaults)."""
    from rsr_model.__main__ import build_parser
    from rsr_model.checkpoint import load_checkpoint
    from rsr_model.train import Trainer

    run = ["--stage", "base", "--steps", "3", "--seed", "5", "--lr", "0.003", "--batch-size", "3", "--save-every", "1"]
    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    assert _main(["train", "--out", str(whole), *run]) == 0
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_parser().parse_args(["train", "--out", str(part), *run]),
                callbacks=[_crash_after("base", 1)]).run()
    assert not Path(f"{part}.lock").exists()  # the stopped run let go of --out
    assert _main(["train", "--resume", "--out", str(part)]) == 0
    a, b = load_checkpoint(whole), load_checkpoint(part)
    assert {k: b["args"][k] for k in ("seed", "lr", "batch_size")} == {"seed": 5, "lr": 0.003, "batch_size": 3}
    for k, v in a["base_state"].items():
        assert torch.equal(v, b["base_state"][k]), k


# --------------------------------------------------------------------------- class 6: two runs, one --out


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_second_run_to_one_out_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "one.pt"
    cmd = [sys.executable, "-m", "rsr_model", "train", "--stage", "base", "--batch-size", "4", "--out", str(out)]
    first = subprocess.Popen([*cmd, "--steps", "40"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = Path(f"{out}.lock")
    end = time.monotonic() + 120
    while not lock.exists() and first.poll() is None:
        assert time.monotonic() < end
        time.sleep(0.05)
    second = subprocess.run([*cmd, "--steps", "1", "--overwrite"], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second was tried"
    assert second.returncode == 2
    assert "another training run" in one_error_line(second.stderr)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert "checkpoint:" in stdout
    from rsr_model.checkpoint import load_checkpoint

    assert load_checkpoint(out)["progress"] == {"base": 40}  # the first run's, whole
    assert not lock.exists()
    # and once it has ended, --out is free again
    assert _main(cmd[3:] + ["--steps", "1", "--overwrite"]) == 0


def test_table_covers_every_class_of_the_model_commands():
    assert {c.klass for c in CASES} == {"1", "7", "8", "10", "11", "14"}

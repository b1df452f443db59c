"""Two real processes (gloo on CPU) under `accelerate launch` / `torchrun`: training keeps the
ranks' weights identical on different batches, writes one checkpoint, one loss log and one
training trace (the main process's), resumes under one or two processes; interrupting one rank
ends the run; `probes.record` under a launcher joins its rank files into the one trace asked for.

`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (multi-CPU needs
an MPI hostfile); `--multi_gpu --num_processes 2` on a machine without CUDA starts two, on gloo.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from probes.record import main as record_main
from probes.report import main as report_main
from rsr_model.__main__ import main as rsr_main
from rsr_model.checkpoint import load_checkpoint
from rsr_model.ranks import weights_digest
from rsr_model.tasks import get_task
from rsr_model.train import build_from_checkpoint
from traces import open_trace

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 8  # per stage; checkpoints every 2 steps
TRAIN = ["--preset", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--save-every", "2"]
PROMPT = "two red circles left of a blue square"


def _port() -> int:
    with socket.socket() as s:  # a free port: other runs on this machine may hold 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(marker: str = "") -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RSR_TEST_RUN": marker}


def accelerate(*argv: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port()),
            "-m", "rsr_model", "train", *argv]


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the worker of `rank` in the run tagged `marker` (its environment says both)."""
    for d in Path("/proc").iterdir():
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"RSR_TEST_RUN={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def _log_steps(log: Path) -> list[tuple[str, int]]:
    with open(log) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["stage", "step", "loss", "balance", "load_share"]
    assert all(r[0] != "stage" for r in rows[1:])  # one header: one writer
    return [(r[0], int(r[1])) for r in rows[1:]]


WHOLE_LOG = [(s, i) for s in ("base", "rsr") for i in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A two-process run interrupted (SIGINT to rank 1) after its first checkpoint: (dir, result, seconds)."""
    d = tmp_path_factory.mktemp("interrupted")
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(accelerate(*TRAIN, "--out", "c.pt"), cwd=d, env=_env(marker),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (d / "c.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(marker, 1)
    assert pid is not None and proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=60)  # a hang (a rank waiting forever on its peer) fails here
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("interrupting one rank left the run hanging") from None
    return d, proc.returncode, out, err, time.monotonic() - t0


def test_interrupting_one_rank_ends_the_run_with_one_line(interrupted):
    d, rc, out, err, seconds = interrupted
    assert rc != 0 and seconds < 60
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    # The interrupted rank says so; when its peer notices first (a collective fails before the
    # launcher stops it), the peer says that instead. One line per process at most, never a traceback.
    said = {"error: interrupted; the last checkpoint written is intact": 0, "another process": 0}
    for line in ours:
        said["another process" if line.startswith("error: another process of this run stopped") else line] += 1
    assert 1 <= len(ours) <= 2 and sum(said.values()) == len(ours) and max(said.values()) == 1, ours
    # no traceback from the toolkit; the launcher's own failure summary (torch elastic) is its own
    assert not re.search(r'File ".*/(rsr_model|probes|traces|cli_common)/', err)
    ckpt = load_checkpoint(d / "c.pt")  # the checkpoint written before the interrupt is whole
    assert 2 <= ckpt["progress"]["base"] < STEPS or ckpt["progress"].get("rsr", 0) < STEPS


@pytest.fixture(scope="module")
def resumed2(interrupted, tmp_path_factory):
    """The interrupted run resumed under two processes, with the replica check (a resumed run takes no
    --trace: a training trace covers a run from its first step)."""
    d = tmp_path_factory.mktemp("resumed2")
    shutil.copy(interrupted[0] / "c.pt", d / "c.pt")
    saved = load_checkpoint(d / "c.pt")["progress"]
    r = _run(accelerate(*TRAIN, "--out", "c.pt", "--resume", "--check-replicas"), d)
    assert r.returncode == 0, r.stderr[-2000:]
    return d, r, saved


def test_two_ranks_keep_identical_weights_on_different_batches(resumed2):
    d, r, saved = resumed2
    lines = [line for line in r.stdout.splitlines() if line.startswith("replicas:")]
    stages = [s for s in ("base", "rsr") if saved.get(s, 0) < STEPS]
    assert [line.split(":")[1].split()[-1] for line in lines] == stages  # one line per stage run, once
    digests = {}
    for line in lines:
        ranks = {k: (w, b) for k, w, b in re.findall(r"rank(\d)=weights:(\w+),batches:(\w+)", line)}
        assert sorted(ranks) == ["0", "1"] and "identical weights" in line
        assert ranks["0"][0] == ranks["1"][0]  # the same weights ...
        assert ranks["0"][1] != ranks["1"][1]  # ... from different batches
        digests = ranks
    # the checkpoint holds those weights
    transformer, _ = build_from_checkpoint(get_task("tiny"), load_checkpoint(d / "c.pt"))
    assert weights_digest(transformer) == digests["0"][0]


def test_two_processes_write_one_checkpoint_one_log(resumed2):
    d, r, _ = resumed2
    assert sorted(p.name for p in d.iterdir()) == ["c.pt", "c.pt.log.csv"]
    assert r.stdout.count("checkpoint: ") == 1  # the main process speaks
    assert _log_steps(d / "c.pt.log.csv") == WHOLE_LOG
    ckpt = load_checkpoint(d / "c.pt")
    assert ckpt["progress"] == {"base": STEPS, "rsr": STEPS}


def test_two_processes_write_one_training_trace(tmp_path):
    steps = 4
    r = _run(accelerate("--preset", "tiny", "--steps", str(steps), "--batch-size", "4", "--out", "c.pt",
                        "--trace", "t.h5", "--trace-every", "2"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.log.csv", "t.h5"]  # one of each, no lock left
    with open_trace(tmp_path / "t.h5") as tr:  # the main process's batches' routing
        assert tr.kind == "training" and tr.complete
        ev, logs = tr.events(), tr.train()
        assert sorted(set(ev["step"])) == list(range(2, steps + 1, 2)) and len(ev["step"]) == 4 * (steps // 2)
        assert list(logs["step"]) == list(range(1, steps + 1))
        assert np.isfinite(logs["loss"]).all() and (tr.routing() < tr.coords["expert"].size).all()


def test_a_two_process_checkpoint_resumes_in_one_process(interrupted, tmp_path):
    shutil.copy(interrupted[0] / "c.pt", tmp_path / "c.pt")
    assert rsr_main(["train", *TRAIN, "--out", str(tmp_path / "c.pt"), "--resume"]) == 0
    assert load_checkpoint(tmp_path / "c.pt")["progress"] == {"base": STEPS, "rsr": STEPS}
    assert _log_steps(tmp_path / "c.pt.log.csv") == WHOLE_LOG


def test_recording_under_a_launcher_joins_into_one_trace(resumed2, tmp_path):
    ckpt = resumed2[0] / "c.pt"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()), "-m", "probes.record",
           "--ckpt", str(ckpt), "--prompts", PROMPT, "--num-samples", "3", "--steps", "2", "--out", "run.h5"]
    r = _run(cmd, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("joined 2 rank files into run.h5") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5", "run.rank0.h5", "run.rank1.h5"]
    single = tmp_path / "single" / "run.h5"
    assert record_main(["--ckpt", str(ckpt), "--prompts", PROMPT, "--num-samples", "3", "--steps", "2",
                        "--out", str(single)]) == 0
    with open_trace(tmp_path / "run.h5") as j, open_trace(single) as s:
        assert j.complete and sorted(j.coords["sample"]) == list(s.coords["sample"]) == [0, 1, 2]
        order = np.argsort(j.coords["sample"])
        np.testing.assert_array_equal(j.routing()[order], s.routing())
        np.testing.assert_array_equal(j.final()[order], s.final())
    assert report_main([str(tmp_path / "run.h5"), "--no-probes", "--permutations", "0",
                        "--json", str(tmp_path / "report.json")]) == 0

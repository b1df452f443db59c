"""Crash safety (SIGKILL mid-write) and live following of a trace written by another process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from traces import open_trace
from traces.synthetic import cell_routing

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(n_samples=8, batch=2)
CELL = (2, 2, 2, 3, 256)  # batch, branch, layer, step, token

WRITER = textwrap.dedent("""
    import sys
    from traces import SamplingLayout
    from traces.synthetic import write_synthetic
    lo = SamplingLayout(n_experts=8, layers=[1, 2], steps=3, tokens=256, timesteps=list(range(6)),
                        branches=("cond", "uncond"), store_prob=True, latent_tokens=[0, 9], latent_dim=16)
    paced = sys.argv[2] == "paced"
    def on_step(b0, t):
        print(b0, t, flush=True)
        if paced:  # write the next step only when the test says so
            sys.stdin.readline()
    write_synthetic(sys.argv[1], lo, n_samples=8, batch=2, seed=7, on_step=on_step)
    print("done", flush=True)
""")


def _spawn(path: Path, paced: bool = False) -> subprocess.Popen:
    """The writer in its own process; it prints `b0 t` after each flushed step. Paced, it then
    waits for a line on its stdin (`_next_step`) before it writes the next step."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), "paced" if paced else "free"],
                            stdin=subprocess.PIPE if paced else None, stdout=subprocess.PIPE, text=True, env=env)


def _next_step(proc: subprocess.Popen) -> None:
    proc.stdin.write("next\n")
    proc.stdin.flush()


def _check_cells(r, reported: list[tuple[int, int]]) -> None:
    """Every reported step is marked written and holds exactly the generated ids; every
    cell marked written holds correct data too."""
    w = r.written
    for b0, t in reported:
        assert w[b0:b0 + 2, t].all(), f"flushed step ({b0}, {t}) lost"
    for b0 in range(0, r.n_samples, 2):
        for t in range(6):
            if w[b0:b0 + 2, t].all():
                got = r.routing(sample=slice(b0, b0 + 2), timestep=t)
                np.testing.assert_array_equal(got, cell_routing(7, b0, t, CELL))


@pytest.mark.parametrize("kill_after", [1, 9, 17])
def test_sigkill_leaves_every_flushed_step_readable(tmp_path, kill_after):
    path = tmp_path / "killed.h5"
    proc = _spawn(path)
    reported = []
    try:
        for line in proc.stdout:
            b0, t = map(int, line.split())
            reported.append((b0, t))
            if len(reported) >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)  # mid-way through the next step's write
                break
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with open_trace(path) as r:
        assert not r.complete and not r.closed
        assert r.steps >= len(reported)
        _check_cells(r, reported)


def test_live_reader_sees_steps_appear(tmp_path):
    path = tmp_path / "live.h5"
    proc = _spawn(path, paced=True)
    try:
        first = proc.stdout.readline()  # the file exists and SWMR is on once a step is flushed
        assert first.strip() == "0 0"
        seen = []
        with open_trace(path) as r:
            assert not r.complete
            # the writer is one step ahead of the follower at most: each step it writes is one
            # the follower has to notice, however slowly either process runs
            for prog in r.follow(poll_s=0.02, idle_timeout_s=20):
                seen.append(prog.steps)
                _check_cells(r, [])
                if not prog.closed:
                    _next_step(proc)
            assert prog.closed, f"the follower gave up after {seen}: no new step for 20 s"
            assert r.steps == 8 // 2 * 6
            assert r.written.all()
        assert len(set(seen)) >= 3, f"follower saw too few updates: {seen}"
        assert seen == sorted(seen)
        assert sorted(set(seen)) == list(range(1, 8 // 2 * 6 + 1))  # every step, as it came
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    with open_trace(path) as r:
        assert r.complete

"""The prepared GPU benchmark (benchmarks/gpu_scale.py) runs: every step of it (the SD3-size layer built
as base, K = 1 and K = 8, a bf16 training step, a sampling step with the recorder's hooks) at a tiny
size on the CPU, in a real process, so the first GPU session does not find a broken script."""

import subprocess
import sys

import torch


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_scale", *args], capture_output=True, text=True,
                          timeout=300)


def test_smoke_runs_every_step_on_the_cpu():
    done = run("--smoke")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("SMOKE TEST on the CPU, not a measurement")
    for case in ("train base", "train K1", "train K8", "sample K8 none", "sample K8 routing ",
                 "sample K8 routing+probs"):
        assert any(line.strip().startswith(case.strip()) and "ms" in line for line in lines), case


def test_refusals_are_one_line():
    for args, line in [(("--smoke", "--reps", "3"), "error: --reps does not apply with --smoke (its size is fixed)"),
                       (("--smoke", "--reps", "20"), "error: --reps does not apply with --smoke (its size is fixed)"),
                       (("--reps", "0"), "error: --reps must be at least 1, got 0"),
                       (("--tokens", "-4"), "error: --tokens must be at least 1, got -4")]:
        done = run(*args)
        assert done.returncode == 2 and done.stderr.splitlines() == [line], (args, done.stderr)
    if not torch.cuda.is_available():
        done = run()
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
        assert done.stderr.startswith("error: no CUDA device")

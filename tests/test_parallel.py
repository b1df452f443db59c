"""The report folded in several processes equals the one-process report (issue 23).

`analyze(..., workers=N)` / `probes.report --workers N` split a sampling trace into ranges of
samples, fold each in a forked worker and merge the families' states. Checked on real traces:
a benchmark-layout trace whose same-prompt runs cross the workers' boundaries (the seed
comparison must reach back to a reference sample in another worker's range), the same trace
killed half-way, and the tiny model's recorded trace with latents (projections, convergence,
linear probes). The command refuses what does not apply, and Ctrl-C stops the workers.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from probes.analysis import Options, analyze, jsonable
from probes.analysis.parallel import sample_ranges
from probes.report import main as report_main
from traces import SampleTable, SamplingLayout, SamplingWriter, open_trace
from traces.synthetic import cell_routing, gate_probs

from .test_stream_fast import assert_same_report

# same-prompt runs: "a" x3, "d" x4 cross the boundaries of 2, 3 and 5 workers; "a" comes back
# later (the one-process pass skips it: not consecutive)
PROMPTS = ["a", "a", "a", "b", "b", "c", "a", "d", "d", "d", "d", "e"]


def write_layout(path: Path, samples: int, timesteps: int = 4, tokens: int = 1024, stop_after: int | None = None):
    """The benchmark layout, small: 2 layers x 3 steps, K = 8, two branches, probabilities;
    `stop_after` batches of 2 samples written, the rest of the file left unwritten (a killed run)."""
    lo = SamplingLayout(n_experts=8, layers=[3, 9], steps=3, tokens=tokens, timesteps=list(range(timesteps)),
                        timestep_values=list(np.linspace(1.0, 0.0, timesteps, endpoint=False)), store_prob=True,
                        branches=("cond", "uncond"))
    table = SampleTable(prompt=[PROMPTS[i % len(PROMPTS)] for i in range(samples)], seed=list(range(samples)))
    rng = np.random.default_rng(5)
    with SamplingWriter(path, lo, table) as w:
        for n, b0 in enumerate(range(0, samples, 2)):
            if stop_after is not None and n == stop_after:
                break
            w.begin_batch(2)
            for t in range(timesteps):
                e = cell_routing(7, b0, t, (2, 2, 2, 3, tokens), 8)
                w.write_timestep(t, e, prob=gate_probs(rng, e, 8))
    return path


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel")
    return {"whole": write_layout(d / "whole.h5", 12), "killed": write_layout(d / "killed.h5", 12, stop_after=4)}


def test_sample_ranges_split_the_written_cells_evenly_and_drop_empty_ranges():
    written = np.ones((12, 4), bool)
    assert sample_ranges(written, 3) == [range(0, 4), range(4, 8), range(8, 12)]
    assert sample_ranges(written, 1) == [range(0, 12)]
    written[8:] = False  # a killed run: the last samples hold nothing
    assert sample_ranges(written, 2) == [range(0, 4), range(4, 12)]
    assert sample_ranges(np.ones((2, 4), bool), 8) == [range(0, 1), range(1, 2)]  # no more ranges than samples
    assert sample_ranges(np.zeros((3, 4), bool), 2) == []


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_parallel_report_equals_the_one_process_report(layout, workers):
    one = jsonable(analyze(str(layout["whole"]), Options(n_perm=19)))
    timings = {}
    got = jsonable(analyze(str(layout["whole"]), Options(n_perm=19), timings=timings, workers=workers))
    assert timings["processes"] == workers
    assert_same_report(got, one)
    seeds = one["layers"]["3"]["steps"]["0"]["stability"]["seeds"]
    assert seeds["n"] > 0  # the seed comparison ran, across the workers' boundaries
    assert any("1 samples skipped" in note for note in one["notes"])  # "a" again, later: skipped in both


def test_parallel_report_of_a_killed_run(layout):
    trace = open_trace(layout["killed"])
    assert not trace.written[8:].any() and trace.written[:8].all()
    one = jsonable(analyze(trace, Options(n_perm=19)))
    assert_same_report(jsonable(analyze(trace, Options(n_perm=19), workers=2)), one)
    trace.close()


def test_parallel_report_with_latents_and_linear_probes(tiny_trace):
    """Projections draw their latent subsample per cell (here 3 of the 16 stored tokens), so the
    linear probes see the same points."""
    options = Options(n_perm=19, max_latent_points=3 * 48 * 4)  # 3 tokens per cell: 48 cells x 4 (layer, step)
    one = jsonable(analyze(str(tiny_trace), options))
    got = jsonable(analyze(str(tiny_trace), options, workers=2))
    assert_same_report(got, one)
    assert one["trace"]["has_latents"] and "convergence" in one["layers"][next(iter(one["layers"]))]


def test_report_command_with_workers_writes_the_same_json(layout, tmp_path, capsys):
    for workers in (1, 2):
        assert report_main([str(layout["whole"]), "--json", str(tmp_path / f"w{workers}.json"), "--no-probes",
                            "--permutations", "19", "--workers", str(workers)]) == 0
    one, two = (json.loads((tmp_path / f"w{w}.json").read_text()) for w in (1, 2))
    one.pop("elapsed_s"), two.pop("elapsed_s")
    assert_same_report(two, one)


@pytest.mark.parametrize("argv, fragment", [
    (["--workers", "0"], "expected an integer >= 1"),
    (["--workers", "4096"], "CPUs"),
])
def test_report_command_refuses_bad_workers(layout, tmp_path, capsys, argv, fragment):
    out = tmp_path / "r.json"
    assert report_main([str(layout["whole"]), "--json", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0]
    assert not out.exists()


def test_report_command_refuses_workers_on_a_training_trace(training_trace, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert report_main([str(training_trace), "--json", str(out), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training trace is folded in one process" in err[0]
    assert not out.exists()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to see the workers")
def test_ctrl_c_stops_the_workers_with_one_line(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while the workers fold: one line, exit 130,
    no worker left running, no output written."""
    trace = write_layout(tmp_path / "big.h5", 16, timesteps=8, tokens=4096)
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "probes.report", str(trace), "--json", str(out), "--no-probes",
                          "--workers", "2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                         start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_children(p.pid)) < 2 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    workers = _children(p.pid)
    assert len(workers) >= 2, "the workers never started"
    os.killpg(p.pid, signal.SIGINT)
    err = p.communicate(timeout=60)[1].strip().splitlines()
    assert p.returncode == 130 and len(err) == 1 and err[0].startswith("error:"), err
    time.sleep(0.2)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in
                Path(f"/proc/{w}/stat").read_text().split()[2]], "a worker outlived the command"
    assert not out.exists()


def test_scale_benchmark_measures_the_workers_pass_and_floor(tmp_path):
    """`benchmarks.scale --workers 2` (two samples, one run): the floor read by two processes
    too, the pass folded by two, and its ratios to both floors."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--samples", "2", "--repeat", "1", "--workers",
                           "2", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "scale.json").read_text())[0]
    assert row["floor"]["workers"] == 2 and row["floor"]["parallel_floor_s"] > 0
    assert row["report"]["processes"] == 2 and row["report"]["records"] == row["floor"]["records"]
    assert row["report"]["stream_over_parallel_floor"] > 0 and row["report"]["stream_over_floor"] > 0
    assert not list(tmp_path.glob("*.h5"))  # the trace is deleted unless --keep

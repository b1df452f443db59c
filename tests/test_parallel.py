"""The report folded in several processes equals the one-process report (issue 23).

`analyze(..., workers=N)` / `probes.report --workers N` split a sampling trace into ranges of
samples, fold each in a forked worker and merge the families' states. Checked on real traces:
a benchmark-layout trace whose same-prompt runs cross the workers' boundaries (the seed
comparison must reach back to a reference sample in another worker's range), the same trace
stopped half-way, and the tiny model's recorded trace with latents (projections, convergence,
linear probes). The command refuses what does not apply, and Ctrl-C stops the workers.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dashboard.__main__ import main as dashboard_main
from dashboard.data import Registry
from probes.analysis import Options, analyze, jsonable
from probes.analysis.parallel import sample_ranges
from probes.report import main as report_main
from traces import SampleTable, SamplingLayout, SamplingWriter, join_ranks, open_trace
from traces.reader import pid_namespace
from traces.synthetic import cell_routing, gate_probs

from .test_stream_fast import assert_same_report

# same-prompt runs: "a" x3, "d" x4 cross the boundaries of 2, 3 and 5 workers; "a" comes back
# later (the one-process pass skips it: not consecutive)
PROMPTS = ["a", "a", "a", "b", "b", "c", "a", "d", "d", "d", "d", "e"]


def write_layout(path: Path, samples: int, timesteps: int = 4, tokens: int = 1024, stop_after: int | None = None):
    """The benchmark layout, small: 2 layers x 3 steps, K = 8, two branches, probabilities;
    `stop_after` batches of 2 samples written, the rest of the file left unwritten (a run stopped early)."""
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
    short = write_layout(d / "short.h5", 12, stop_after=4)  # closed cleanly after 8 of 12 samples
    killed = shutil.copy(short, d / "killed.h5")
    with h5py.File(killed, "r+") as f:  # as a writer killed before its clean close leaves it
        f.attrs["complete"] = False
    return {"whole": write_layout(d / "whole.h5", 12), "short": short, "killed": killed}


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


def test_spawned_workers_give_the_same_report(layout, monkeypatch):
    """Where fork is not used (macOS, Windows) workers are spawned: fresh interpreters that
    import the probes again and get their job by pickle. Forced here on Linux."""
    from probes.analysis import parallel

    monkeypatch.setattr(parallel, "START_METHOD", "spawn")
    asked, get_context = [], parallel.multiprocessing.get_context
    monkeypatch.setattr(parallel.multiprocessing, "get_context",
                        lambda method: asked.append(method) or get_context(method))
    one = jsonable(analyze(str(layout["whole"]), Options(n_perm=19)))
    timings = {}
    assert_same_report(jsonable(analyze(str(layout["whole"]), Options(n_perm=19), timings=timings, workers=2)), one)
    assert timings["processes"] == 2 and asked == ["spawn"]


def test_parallel_report_of_a_run_stopped_early(layout):
    """Samples never written (a run closed after 8 of its 12 samples): the ranges split the written cells."""
    trace = open_trace(layout["short"])
    assert trace.complete and not trace.written[8:].any() and trace.written[:8].all()
    timings = {}
    one = jsonable(analyze(trace, Options(n_perm=19)))
    assert_same_report(jsonable(analyze(trace, Options(n_perm=19), timings=timings, workers=2)), one)
    assert timings["processes"] == 2
    trace.close()


def test_an_incomplete_trace_is_folded_in_one_process(layout, capsys):
    """An incomplete trace (a killed run's, or one still written) is folded in one process: workers
    opening a file still being written could each see another snapshot. The command says so."""
    trace = open_trace(layout["killed"])
    assert not trace.complete
    timings = {}
    one = jsonable(analyze(trace, Options(n_perm=19)))
    assert_same_report(jsonable(analyze(trace, Options(n_perm=19), timings=timings, workers=2)), one)
    assert timings["processes"] == 1
    trace.close()
    assert report_main([str(layout["killed"]), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the trace is incomplete and its writer may still be running" in err[0]


def _written_by(src: Path, dst: Path, pid: int, host: str, namespace: str | None = "same") -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        assert f.attrs["writer_pid_namespace"] == pid_namespace()  # recorded by the writer
        f.attrs["writer_pid"], f.attrs["writer_host"] = pid, host
        if namespace is None:  # a trace written before the namespace was recorded
            del f.attrs["writer_pid_namespace"]
        elif namespace != "same":
            f.attrs["writer_pid_namespace"] = namespace
    return dst


def test_a_killed_runs_trace_is_split_when_its_writer_is_known_gone(layout, tmp_path, capsys):
    """A killed run's trace recorded on this host, whose writer process no longer exists, will not
    grow: workers may split it. Its writer still running, or on another host (it cannot be
    checked), the trace is folded in one process and the command refuses --workers."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: a pid that no longer exists
    host = socket.gethostname()
    cases = {"gone": (gone.pid, host, "same", 2), "running": (os.getppid(), host, "same", 1),
             "elsewhere": (gone.pid, host + "-x", "same", 1),
             "another_namespace": (gone.pid, host, "pid:[1]", 1),  # a container with the host's name
             "namespace_unrecorded": (gone.pid, host, None, 1), "bad_pid": ("abc", host, "same", 1),
             "huge_pid": (1 << 40, host, "same", 1)}
    one = jsonable(analyze(str(layout["killed"]), Options(n_perm=19)))
    for name, (pid, where, namespace, processes) in cases.items():
        path = _written_by(layout["killed"], tmp_path / f"{name}.h5", pid, where, namespace)
        timings = {}
        with open_trace(path) as trace:
            assert not trace.complete and trace.live == (name == "running"), name
            assert trace.writer_gone == (name == "gone"), name
            got = jsonable(analyze(trace, Options(n_perm=19), timings=timings, workers=2))
        got["trace"]["path"] = one["trace"]["path"]  # a copy, elsewhere
        assert_same_report(got, one)
        assert timings["processes"] == processes, name
        code = report_main([str(path), "--workers", "2", "--no-probes", "--json", str(tmp_path / f"{name}.json")])
        err = capsys.readouterr().err
        assert (code, bool(err)) == ((0, False) if name == "gone" else (2, True)), (name, err)


def test_parallel_report_with_latents_and_linear_probes(tiny_trace):
    """Projections draw their latent subsample per cell (here 3 of the 16 stored tokens), so the
    linear probes see the same points."""
    options = Options(n_perm=19, max_latent_points=3 * 48 * 4)  # 3 tokens per cell: 48 cells x 4 (layer, step)
    one = jsonable(analyze(str(tiny_trace), options))
    got = jsonable(analyze(str(tiny_trace), options, workers=2))
    assert_same_report(got, one)
    assert one["trace"]["has_latents"] and "convergence" in one["layers"][next(iter(one["layers"]))]


def test_parallel_report_of_a_joined_multi_rank_trace(tmp_path):
    """The trace `probes.record` leaves under a launcher: rank files joined through virtual datasets
    (traces.join_ranks), sample ids not in row order (rank 0 holds 0, 2, 4, 6; rank 1 holds 1, 3).
    The workers read the joined file; a same-prompt run crosses from one rank's samples into the
    other's; the linear probes' prompt labels are looked up by the latents' sample ids."""
    lo = SamplingLayout(n_experts=8, layers=[2, 4], steps=2, tokens=64, timesteps=[0, 5, 9],
                        branches=("cond", "uncond"), latent_tokens=list(range(0, 64, 4)), latent_dim=8)
    prompts = {0: "a", 2: "a", 4: "b", 6: "c", 1: "c", 3: "c"}
    rng = np.random.default_rng(3)
    ranks = []
    for rank, ids in enumerate(([0, 2, 4, 6], [1, 3])):
        table = SampleTable(prompt=[prompts[i] for i in ids], seed=ids, sample_id=ids)
        path = tmp_path / f"run.rank{rank}.h5"
        with SamplingWriter(path, lo, table, rank=rank, world_size=2, run_id="run-a") as w:
            for b0 in range(0, len(ids), 2):
                w.begin_batch(2)
                for t in range(3):
                    latents = rng.standard_normal((2, 2, 2, 2, 16, 8)).astype(np.float16)
                    w.write_timestep(t, cell_routing(rank, b0, t, (2, 2, 2, 2, 64), 8), latents=latents)
        ranks.append(path)
    joined = join_ranks(ranks, tmp_path / "run.h5")
    options = Options(n_perm=19, probe_splits=2)
    one = jsonable(analyze(str(joined), options))
    timings = {}
    got = jsonable(analyze(str(joined), options, timings=timings, workers=3))
    assert timings["processes"] == 3
    assert_same_report(got, one)
    assert one["layers"]["2"]["steps"]["0"]["stability"]["seeds"]["n"] > 0
    assert "accuracy" in one["linear_probes"]["2"]["prompt"]
    # killed ranks: rank 0 here (its process gone), rank 1 on another node, which cannot be checked:
    # the joined file (rank 0's writer in its attributes) is not split
    gone = subprocess.Popen(["true"])
    gone.wait()
    for rank, path in enumerate(ranks):
        with h5py.File(path, "r+") as f:
            f.attrs["complete"] = False
            here = (gone.pid, socket.gethostname())
            f.attrs["writer_pid"], f.attrs["writer_host"] = here if rank == 0 else (4242, "nodeB")
    killed = join_ranks(ranks, tmp_path / "killed.h5")
    with open_trace(ranks[0]) as first, open_trace(killed) as trace:
        assert first.writer_gone and not trace.complete and not trace.writer_gone
        analyze(trace, options, timings=timings, workers=3)
    assert timings["processes"] == 1


def test_report_command_with_workers_writes_the_same_json(layout, tmp_path, capsys, monkeypatch):
    """`probes.report --workers 2` runs two workers (not the one-process pass) and writes the same JSON."""
    import probes.analysis.parallel as parallel

    started = []
    run_workers = parallel.run_workers
    monkeypatch.setattr(parallel, "run_workers", lambda jobs: started.append(len(jobs)) or run_workers(jobs))
    for workers in (1, 2):
        assert report_main([str(layout["whole"]), "--json", str(tmp_path / f"w{workers}.json"), "--no-probes",
                            "--permutations", "19", "--workers", str(workers)]) == 0
    assert started == [2]
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


@pytest.mark.parametrize("value", ["0", "4096"])
def test_dashboard_refuses_bad_report_workers(layout, capsys, value):
    assert dashboard_main([str(layout["whole"]), "--report-workers", value, "--port", "8765"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--report-workers" in err[0]


def test_dashboard_report_folded_by_workers_is_the_same(layout, training_trace, tmp_path, monkeypatch):
    """`python -m dashboard --report-workers 2`: a complete sampling trace's report child gets
    --workers 2 and gives the same report; a training trace's report is computed by one process."""
    import dashboard.data

    served = tmp_path / "served"  # copies: the dashboard writes its report cache beside the trace
    served.mkdir()
    sampling, training = shutil.copy(layout["whole"], served / "s.h5"), shutil.copy(training_trace, served / "t.h5")
    commands = []
    run = dashboard.data.subprocess.run
    monkeypatch.setattr(dashboard.data.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or run(cmd, **kw))
    registry = Registry([sampling, training], n_perm=19, workers=2)
    ids = {Path(registry.entry(tid).path).name: tid for tid in registry.ids()}
    two = registry.report(ids["s.h5"])
    assert registry.report(ids["t.h5"])["trace"]["kind"] == "training"
    assert [cmd[cmd.index("--workers") + 1] if "--workers" in cmd else None for cmd in commands] == ["2", None]
    one = Registry([sampling], n_perm=19)._analyse(sampling)
    one.pop("elapsed_s"), two.pop("elapsed_s")
    assert_same_report(two, one)


def test_a_fresh_familys_state_is_zero(layout, training_trace):
    """What merges is state (counts, sums), all zero before the first chunk: an index grid or other
    constant kept as a plain array attribute would be added up by `Stat.merge` (`constants`)."""
    from probes.analysis.families import FAMILIES
    from probes.analysis.setup import context_of

    for path in (layout["whole"], training_trace):
        with open_trace(path) as trace:
            context, _ = context_of(trace, Options())
            for family in (cls(context) for cls in FAMILIES):
                if family.skipped is None:
                    nonzero = [k for k, v in family.state_dict().items() if np.any(v)]
                    assert not nonzero, f"{family.name}: {nonzero} are not zero before any chunk"


def test_report_command_refuses_workers_on_a_training_trace(training_trace, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert report_main([str(training_trace), "--json", str(out), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training trace is folded in one process" in err[0]
    assert not out.exists()


def _damage(trace: Path, dataset: str, coord: tuple) -> None:
    with h5py.File(trace) as f:
        chunk = f[dataset].id.get_chunk_info_by_coord(coord)
    with open(trace, "r+b") as fh:
        fh.seek(chunk.byte_offset + 16)
        fh.write(b"\xff" * 64)


def test_a_damaged_chunk_in_a_workers_range_is_the_same_one_line(tmp_path, capsys):
    """A worker's error reaches the command as the one-process pass's would: one line, exit 2,
    naming the chunk that cannot be read. With damage in both workers' ranges, the first
    range's error is the one printed, as the one-process pass meets it first."""
    trace = write_layout(tmp_path / "damaged.h5", 12)
    _damage(trace, "/routing/expert", (10, 0, 2, 0, 0, 0))  # sample 10: the second worker's range
    errors = []
    for workers in ("1", "2"):
        assert report_main([str(trace), "--no-probes", "--workers", workers]) == 2
        errors.append(capsys.readouterr().err.strip().splitlines())
    assert len(errors[1]) == 1 and errors[1][0].startswith("error:") and errors[1] == errors[0]
    assert "/routing/expert at sample 10, branch cond, timestep 2 cannot be read" in errors[0][0]
    _damage(trace, "/routing/prob", (2, 0, 1, 0, 0, 0, 0))  # and sample 2: the first worker's range
    for workers in ("1", "2"):
        assert report_main([str(trace), "--no-probes", "--workers", workers]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "/routing/prob at sample 2, branch cond, timestep 1 cannot be read" in err[0]
        assert err[0].endswith("the file may be damaged there")
    # the same failure while the writer still runs (a read racing a write, say): not called damage
    running = _written_by(trace, tmp_path / "running.h5", os.getppid(), socket.gethostname())
    with h5py.File(running, "r+") as f:
        f.attrs["complete"] = False
    assert report_main([str(running), "--no-probes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/routing/prob at sample 2, branch cond, timestep 1 cannot be read (" in err[0]
    assert err[0].endswith("its writer is still running: try again")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def big_trace(tmp_path_factory):
    """Long enough to fold that a signal lands while the workers run."""
    return write_layout(tmp_path_factory.mktemp("parallel_big") / "big.h5", 16, timesteps=8, tokens=4096)


def _ignores_sigint(pid: int) -> bool:
    """The worker has set itself up (parallel._worker: the parent-death signal, then SIGINT ignored)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
    return bool(mask & 1 << (signal.SIGINT - 1))


def _report_with_workers(trace: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """`probes.report --workers 2` in its own session, once both workers are running and set up.
    SIGINT at its default in the command, as at a terminal: a suite run as a background job (CI,
    nohup) has SIGINT ignored, and children would inherit that."""
    p = subprocess.Popen([sys.executable, "-m", "probes.report", str(trace), "--json", str(out), "--no-probes",
                          "--workers", "2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (len(_children(p.pid)) >= 2 and all(map(_ignores_sigint, _children(p.pid)))) \
            and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    workers = _children(p.pid)
    assert len(workers) >= 2, "the workers never started"
    return p, workers


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to see the workers")
def test_ctrl_c_stops_the_workers_with_one_line(big_trace, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while the workers fold: one line, exit 130,
    no worker left running, no output written."""
    out = tmp_path / "r.json"
    p, workers = _report_with_workers(big_trace, out)
    os.killpg(p.pid, signal.SIGINT)
    err = p.communicate(timeout=60)[1].strip().splitlines()
    assert p.returncode == 130 and len(err) == 1 and err[0].startswith("error:"), err
    assert not [w for w in workers if _alive(w)], "a worker outlived the command"
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to see the workers")
def test_a_killed_worker_ends_the_report_with_one_line(big_trace, tmp_path):
    """A worker killed mid-fold (the out-of-memory killer, say): one error line naming it, exit 2,
    not a wait for a result that never comes; the other worker stopped."""
    out = tmp_path / "r.json"
    p, workers = _report_with_workers(big_trace, out)
    os.kill(workers[0], signal.SIGKILL)
    err = p.communicate(timeout=60)[1].strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "killed by signal 9" in err[0], err
    assert not [w for w in workers if _alive(w)]
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to see the workers")
def test_workers_end_when_the_command_is_killed(big_trace, tmp_path):
    """SIGKILL to the command itself (no chance to clean up): its workers are sent SIGTERM when
    their parent dies, instead of folding on as orphans. The workers are stopped first, so the
    signal waits, pending, where this test can see it, whatever their speed."""
    p, workers = _report_with_workers(big_trace, tmp_path / "r.json")
    try:
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        p.kill()
        p.wait(timeout=60)  # not communicate(): the stopped workers still hold its stderr open
        p.stderr.close()
        deadline = time.monotonic() + 10
        while not all(map(_told_to_end, workers)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(map(_told_to_end, workers)), "a worker was not told that the command died"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def _told_to_end(pid: int) -> bool:
    """Gone, or SIGTERM pending (a stopped process keeps it until continued)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return True
    pending = sum(int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:")))
    return not _alive(pid) or bool(pending & 1 << (signal.SIGTERM - 1))


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

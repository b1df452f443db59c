"""`python -m traces join|convert` and the dashboard's command line, tried as an adversary would
(issue 22, classes 1, 5, 12, 13, 14), in the style of tests/test_adversarial.py.

Table rows: exit code 2, exactly one `error:` line and no traceback, every file the case was
given byte-identical afterwards, and no output (nor temporary file) left behind. The wrong-result
class (5: a joined trace whose rank files cannot be reached) is also checked on the result
itself: a join read from another working directory, through a symlink, after its folder moved,
and refused once a rank file is deleted or replaced.

The traces are small synthetic rank files (no model), made once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from traces import SampleTable, SamplingLayout, SamplingWriter, TraceError, join_ranks, open_trace
from traces.synthetic import cell_routing

from .conftest import one_error_line, snapshot

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = SamplingLayout(n_experts=8, layers=[2, 4], steps=2, tokens=64, timesteps=[0, 5, 9],
                        branches=("cond", "uncond"), store_prob=False, image_shape=(4, 4, 3))
CELL = (2, 2, 2, 2, 64)


def write_rank(path: Path, rank: int, ids: list[int], run_id: str = "run-a", finish: bool = True) -> None:
    table = SampleTable(prompt=[f"p{i}" for i in ids], seed=ids, sample_id=ids)
    w = SamplingWriter(path, LAYOUT, table, rank=rank, world_size=2, run_id=run_id)
    for b0 in range(0, len(ids), 2):
        w.begin_batch(2)
        for t in range(3):
            w.write_timestep(t, cell_routing(rank, b0, t, CELL))
        w.write_final(np.full((2, 4, 4, 3), rank + 1, np.uint8))
    if finish:
        w.close()


def make_run(folder: Path, run_id: str = "run-a") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    r0, r1 = folder / "r0.h5", folder / "r1.h5"
    write_rank(r0, 0, [0, 1, 2, 3], run_id)
    write_rank(r1, 1, [4, 5], run_id)
    return r0, r1


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Rank files of one run, their join, a single trace, and links that name them under other names."""
    d = tmp_path_factory.mktemp("made")
    r0, r1 = make_run(d)
    join_ranks([r0, r1], d / "joined.h5")
    shutil.copy(r0, d / "single.h5")
    (d / "sub").mkdir()
    for name, target in (("link_r0.h5", r0), ("link_r1.h5", r1), ("link_single.h5", d / "single.h5")):
        (d / name).symlink_to(target)
    os.link(r1, d / "hard_r1.h5")
    os.link(d / "single.h5", d / "hard_single.h5")
    # a joined file whose rank files are gone: its own folder holds no r0.h5/r1.h5
    (d / "lonely").mkdir()
    shutil.copy(d / "joined.h5", d / "lonely" / "joined.h5")
    (d / "notes.txt").write_text("not a trace\n")
    return d


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@dataclass
class Case:
    cls: int  # the class
    command: str  # "traces", "dashboard" or "probes.report" (a reader of joined traces)
    argv: list[str]  # {m}: the made folder, {t}: a fresh folder for outputs
    expect: str  # a piece of the error line


CASES = [
    # 1: an output that is one of the inputs, however it is spelled, is refused even with --overwrite
    Case(1, "traces", ["convert", "{m}/single.h5", "{m}/link_single.h5", "--overwrite"], "is the command's input IN"),
    Case(1, "traces", ["convert", "{m}/link_single.h5", "{m}/single.h5", "--overwrite"], "is the command's input IN"),
    Case(1, "traces", ["convert", "{m}/single.h5", "{m}/hard_single.h5", "--overwrite"], "is the command's input IN"),
    Case(1, "traces", ["convert", "{m}/single.h5", "{m}/sub/../single.h5", "--overwrite"], "is the command's input"),
    Case(1, "traces", ["join", "{m}/r1.h5", "{m}/r0.h5", "{m}/r1.h5", "--overwrite"], "input rank file #1"),
    Case(1, "traces", ["join", "{m}/link_r0.h5", "{m}/r0.h5", "{m}/r1.h5", "--overwrite"], "input rank file #0"),
    Case(1, "traces", ["join", "{m}/hard_r1.h5", "{m}/r0.h5", "{m}/r1.h5", "--overwrite"], "input rank file #1"),
    Case(1, "traces", ["join", "{m}/sub/../r0.h5", "{m}/r0.h5", "{m}/r1.h5", "--overwrite"], "input rank file #0"),
    Case(1, "traces", ["join", "{m}/r0.h5", "{m}/link_r0.h5", "{m}/r1.h5", "--overwrite"], "input rank file #0"),
    Case(1, "traces", ["join", "{m}/link_r1.h5", "{m}/r0.h5", "{m}/r1.h5"], "input rank file #1"),
    # 5: a joined trace whose rank files are not beside it is refused, never read as fill values
    Case(5, "traces", ["convert", "{m}/lonely/joined.h5", "{t}/c.h5"], "rank file r0.h5 is missing"),
    Case(5, "probes.report", ["{m}/lonely/joined.h5", "--json", "{t}/r.json", "--permutations", "0"],
         "rank file r0.h5 is missing"),
    Case(5, "probes.report", ["{m}/lonely/joined.h5", "--figures", "{t}/figs", "--permutations", "0"],
         "rank file r0.h5 is missing"),
    # 13: the dashboard's address is judged before any work
    Case(13, "dashboard", ["--host", "no-such-host.invalid", "--results", "{m}"], "--host no-such-host.invalid"),
    Case(13, "dashboard", ["--host", "192.0.2.1", "--results", "{m}"], "not an address of this machine"),
    Case(13, "dashboard", ["--host", "999.1.1.1", "--results", "{m}"], "not an address of this machine"),
    Case(13, "dashboard", ["--host", "::1::", "--results", "{m}"], "not an address of this machine"),
    Case(13, "dashboard", ["--port", "{busy}", "--results", "{m}"], "is in use"),
    # 14: messages that say what to do
    Case(14, "traces", [], "--help lists them"),
    Case(14, "traces", ["jion", "{t}/j.h5", "{m}/r0.h5"], "got 'jion'"),
]


@pytest.fixture(scope="module")
def busy_port():
    """A port some other server listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _main(command: str):
    if command == "traces":
        from traces.__main__ import main
    elif command == "probes.report":
        from probes.report import main
    else:
        from dashboard.__main__ import main
    return main


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c.cls}-{c.command}-{'_'.join(c.argv)[:60]}")
def test_refused(case: Case, made, tmp_path, busy_port, capsys):
    argv = [a.format(m=made, t=tmp_path, busy=busy_port) for a in case.argv]
    before, files = snapshot(made), listing(made)
    code = _main(case.command)(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert case.expect in one_error_line(err), err
    assert snapshot(made) == before  # every input byte-identical
    assert listing(made) == files and listing(tmp_path) == set()  # no output, no temporary file


# --------------------------------------------------------------------------- class 5, on the result


def _read_all(path: Path) -> np.ndarray:
    with open_trace(path) as r:
        return r.routing()


@pytest.fixture
def run(tmp_path) -> tuple[Path, np.ndarray]:
    """A run folder holding two rank files and their join, and the routing the ranks hold."""
    r0, r1 = make_run(tmp_path / "run")
    with open_trace(r0) as a, open_trace(r1) as b:
        expected = np.concatenate([a.routing(), b.routing()])
    assert not (expected == 255).any()
    return join_ranks([r0, r1], tmp_path / "run" / "joined.h5"), expected


def test_joined_trace_reads_its_ranks_from_any_working_directory(run, tmp_path, monkeypatch):
    joined, expected = run
    # a working directory where the stored relative names find another run's rank files
    decoy = tmp_path / "decoy"
    make_run(decoy, run_id="run-b")
    monkeypatch.chdir(decoy)
    np.testing.assert_array_equal(_read_all(joined), expected)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(_read_all(Path("run/joined.h5")), expected)


def test_joined_trace_in_another_folder_than_its_ranks(tmp_path, monkeypatch):
    r0, r1 = make_run(tmp_path / "ranks")
    with open_trace(r0) as a, open_trace(r1) as b:
        expected = np.concatenate([a.routing(), b.routing()])
    monkeypatch.chdir(tmp_path / "ranks")
    assert _main("traces")(["join", "../out/joined.h5", "r0.h5", "r1.h5"]) == 0  # relative paths given
    monkeypatch.chdir(tmp_path)
    with open_trace(tmp_path / "out" / "joined.h5") as r:
        assert r.attrs["joined_from"] == ["../ranks/r0.h5", "../ranks/r1.h5"]
        np.testing.assert_array_equal(r.routing(), expected)
    shutil.move(tmp_path / "out", tmp_path / "ranks" / "out")  # the joined file moved alone: refused
    monkeypatch.chdir(tmp_path / "ranks" / "out")  # where ../ranks/r0.h5 would not, but ../r0.h5 would resolve
    with pytest.raises(TraceError, match="rank file ../ranks/r0.h5 is missing"):
        open_trace(tmp_path / "ranks" / "out" / "joined.h5")


def test_joined_trace_through_a_symlink_and_after_its_folder_moved(run, tmp_path):
    joined, expected = run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "link.h5").symlink_to(joined)
    np.testing.assert_array_equal(_read_all(elsewhere / "link.h5"), expected)
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    np.testing.assert_array_equal(_read_all(moved / "joined.h5"), expected)


def test_joined_trace_copied_away_from_its_ranks_is_refused(run, tmp_path, monkeypatch):
    joined, _ = run
    away = tmp_path / "away" / "deeper"
    away.mkdir(parents=True)
    shutil.copy(joined, away / "joined.h5")
    monkeypatch.chdir(tmp_path / "run")  # the stored names resolve here: HDF5 alone would read these
    with pytest.raises(TraceError, match="rank file r0.h5 is missing"):
        open_trace(away / "joined.h5")


def test_joined_trace_with_a_rank_deleted_or_replaced_is_refused(run, tmp_path, capsys):
    joined, _ = run
    folder = joined.parent
    (folder / "r1.h5").unlink()
    with pytest.raises(TraceError, match=r"rank file r1.h5 is missing \(looked for .*run/r1.h5\)"):
        open_trace(joined)
    shutil.copy(folder / "r0.h5", folder / "r1.h5")  # rank 0 in rank 1's place
    with pytest.raises(TraceError, match="is not rank 1 of this recording"):
        open_trace(joined)
    (folder / "r1.h5").unlink()
    write_rank(folder / "r1.h5", 1, [4, 5], run_id="run-b")  # another run's rank 1
    with pytest.raises(TraceError, match="is not rank 1 of this recording"):
        open_trace(joined)
    (folder / "r1.h5").unlink()
    table = SampleTable(prompt=["p4"], seed=[4], sample_id=[4])  # the right run, but fewer samples
    w = SamplingWriter(folder / "r1.h5", LAYOUT, table, rank=1, world_size=2, run_id="run-a")
    w.begin_batch(1)
    w.close()
    with pytest.raises(TraceError, match="holds less than was joined"):
        open_trace(joined)
    # the commands say it in one line
    assert _main("traces")(["convert", str(joined), str(tmp_path / "c.h5")]) == 2
    assert "holds less than was joined" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- class 12: a live trace

WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_adversarial_traces import write_rank
write_rank(__import__("pathlib").Path({path!r}), 0, [0, 1], finish=False)
print("ready", flush=True)
time.sleep(120)
"""


def test_live_trace_is_refused_and_converts_once_its_writer_is_gone(tmp_path, capsys):
    live, r1 = tmp_path / "r0.h5", tmp_path / "r1.h5"
    write_rank(r1, 1, [2, 3])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(live))],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert writer.stdout.readline().strip() == "ready"
        before = hashlib.sha256(live.read_bytes()).hexdigest()
        for argv in (["convert", str(live), str(tmp_path / "copy.h5")],
                     ["join", str(tmp_path / "joined.h5"), str(live), str(r1)]):
            assert _main("traces")(argv) == 2
            line = one_error_line(capsys.readouterr().err)
            assert f"is still being written (its writer, process {writer.pid}, runs)" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r0.h5", "r1.h5"]  # no copy, no temporary
        assert hashlib.sha256(live.read_bytes()).hexdigest() == before
    finally:
        writer.kill()
        writer.wait()
    # killed: what was flushed converts, and the copy says it is incomplete, not live
    assert _main("traces")(["convert", str(live), str(tmp_path / "copy.h5")]) == 0
    with open_trace(tmp_path / "copy.h5") as c, open_trace(live) as src:
        assert not c.complete and not c.live and c.written.all()
        np.testing.assert_array_equal(c.routing(), src.routing())


# --------------------------------------------------------------------------- class 13: the dashboard


@pytest.mark.parametrize("served", ["results only", "a trace"])
def test_dashboard_ctrl_c_exits_130_with_one_line(tmp_path, served, request):
    """Ctrl-C as soon as the server answers, while (with a trace) the warm-up thread is still importing
    plotly and reading the report: one line, exit 130, never a hang at shutdown."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    traces = []
    if served == "a trace":  # a copy: the dashboard writes its report cache beside the trace it serves
        (tmp_path / "served").mkdir()
        traces = [str(shutil.copy(request.getfixturevalue("tiny_trace"), tmp_path / "served" / "run.h5"))]
    # SIGINT at its default in the child, as at a terminal: a suite run as a background job (CI, nohup) has
    # SIGINT ignored, children inherit that, and a Python started so never installs its Ctrl-C handler
    p = subprocess.Popen([sys.executable, "-m", "dashboard", *traces, "--port", str(port), "--results", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until it serves
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "stopped (Ctrl-C)" in one_error_line(err)


def test_results_tab_lists_only_regular_files(tmp_path):
    from dashboard.views import results as res

    folder = tmp_path / "results"
    (folder / "a").mkdir(parents=True)
    os.mkfifo(folder / "a" / "table.json")  # nothing ever writes to it: reading it would block forever
    (folder / "planning.json").mkdir()  # a folder of a result's name
    (folder / "b").mkdir()
    (folder / "b" / "scorer_check.json").write_text(json.dumps({"broken": True}))
    assert res.find_results(folder) == [folder / "b" / "scorer_check.json"]
    page: list = []
    t = threading.Thread(target=lambda: page.extend(res.results_page(folder)), daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the Results tab hangs on a FIFO"
    text = json.dumps(page, default=lambda c: c.to_plotly_json())
    assert "1 result file(s)" in text and "b/scorer_check.json" in text


# --------------------------------------------------------------------------- class 14: help


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["join", "--help"], ["convert", "-h"]])
def test_help_exits_0(argv, capsys):
    try:
        code = _main("traces")(argv)
    except SystemExit as e:  # argparse's own --help of a command
        code = e.code
    out = capsys.readouterr().out
    assert code == 0 and "usage: python -m traces" in out
    assert ("join" in out and "convert" in out) if argv[0].startswith("-") else "--overwrite" in out


def test_help_from_the_command_line():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "traces", "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "join" in p.stdout and "convert" in p.stdout and p.stderr == ""

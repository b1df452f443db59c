"""Every command tried as an adversarial user would: bad numbers, paths that cannot be written,
sizes that must be refused before the work, interventions that select nothing, unrelated
joins, flags that do not apply, a full disk, signals at start-up and mid-run, racing writers.

The contract each case checks (README, "Errors, outputs and interrupts"): exit code 2 (130 for an
interrupt), exactly one `error:` line and no traceback, no existing file changed, and no
half-written output where a complete one was promised.

Most cases fail before any work and run in-process through the command's `main(argv)`;
signals, start-up imports and resource limits need a real process and run as subprocesses.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import assert_refused, one_error_line, snapshot

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "two red circles left of a blue square"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def made(tiny_ckpt, dit_base_ckpt, tmp_path_factory) -> Path:
    """The files the cases refer to, made once: checkpoints (copies of the session's,
    tests/conftest.py), traces, rank files, plain files."""
    from probes.record import main as record

    d = tmp_path_factory.mktemp("made")
    shutil.copyfile(tiny_ckpt, d / "tiny.pt")
    shutil.copyfile(dit_base_ckpt, d / "dit.pt")
    rec = ["--ckpt", str(d / "tiny.pt"), "--steps", "2"]
    assert record([*rec, "--prompts", PROMPT, "--out", str(d / "good.h5")]) == 0
    assert record([*rec, "--prompts", "a green triangle", "--seed", "5", "--out", str(d / "other.h5")]) == 0
    for r in (0, 1):
        assert record([*rec, "--prompts", PROMPT, "--num-samples", "2", "--rank", str(r), "--world-size", "2",
                       "--out", str(d / f"run.rank{r}.h5")]) == 0
    assert record([*rec, "--prompts", "a green triangle", "--num-samples", "2", "--rank", "1", "--world-size", "2",
                   "--out", str(d / "stranger.rank1.h5")]) == 0
    (d / "notes.txt").write_text("not a trace, and not a folder\n")
    (d / "empty.txt").write_text("\n")
    (d / "keep.json").write_text('{"keep": true}\n')
    (d / "keep.png").write_bytes(b"keep")
    (d / "corrupt.pt").write_bytes((d / "tiny.pt").read_bytes()[:5000])
    return d


def _mains():
    from dashboard.__main__ import main as dashboard
    from probes.causal import main as causal
    from probes.projections import main as derive
    from probes.record import main as record
    from probes.report import main as report
    from probes.routing_value import main as routing_value
    from rsr_model.__main__ import main as rsr
    from traces.__main__ import main as traces

    return {"rsr_model": rsr, "probes.record": record, "probes.report": report, "probes.causal": causal,
            "probes.routing_value": routing_value, "probes.derive": derive, "traces": traces, "dashboard": dashboard}


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One bad input. argv may use {m} (the made files, all of which must stay unchanged) and {t}
    (the folder for outputs, which must stay empty: no output, not even part of one)."""

    klass: str  # what it probes: finite numbers, early checks, empty selections, joins, flags, inputs
    command: str  # module run as `python -m COMMAND`
    argv: list[str]
    fragment: str  # part of the one error line
    code: int = 2


CK = ["--ckpt", "{m}/tiny.pt"]
REC = ["--ckpt", "{m}/tiny.pt", "--prompts", PROMPT, "--steps", "2", "--out", "{t}/r.h5"]
CAUSAL = ["--ckpt", "{m}/tiny.pt", "--prompts", PROMPT, "--steps", "2"]
SAMPLE = ["sample", "--ckpt", "{m}/tiny.pt", "--steps", "2", "--out", "{t}/x.png"]
TRAIN = ["train", "--steps", "1", "--batch-size", "4", "--out", "{t}/n.pt"]

CASES = [
    # 5: every float flag is finite and in range
    Case("finite", "rsr_model", SAMPLE + ["--prompt", "a", "--guidance", "nan"], "finite"),
    Case("finite", "rsr_model", SAMPLE + ["--prompt", "a", "--guidance", "inf"], "finite"),
    Case("finite", "rsr_model", SAMPLE + ["--prompt", "a", "--guidance", "-1"], ">= 0"),
    Case("finite", "rsr_model", SAMPLE + ["--prompt", "a", "--guidance", "1e9"], "<= 100"),
    Case("finite", "rsr_model", SAMPLE + ["--prompt", "a", "--guidance", "three"], "expected a number"),
    Case("finite", "probes.record", REC + ["--guidance", "nan"], "finite"),
    Case("finite", "probes.record", REC + ["--guidance=-inf"], "finite"),
    Case("finite", "probes.record", REC + ["--max-gb", "nan"], "finite"),
    Case("finite", "probes.record", REC + ["--max-gb", "0"], "> 0"),
    Case("finite", "probes.causal", CAUSAL + ["--force-expert", "1", "--guidance", "nan"], "finite"),
    Case("finite", "rsr_model", TRAIN + ["--lr", "nan"], "finite"),
    Case("finite", "rsr_model", TRAIN + ["--lr", "inf"], "finite"),
    Case("finite", "rsr_model", TRAIN + ["--lr", "-0.1"], "> 0"),
    Case("finite", "rsr_model", TRAIN + ["--ema-decay", "1.5"], "< 1"),
    Case("finite", "rsr_model", TRAIN + ["--ema-decay", "nan"], "finite"),
    Case("finite", "rsr_model", TRAIN + ["--tau", "0"], "> 0"),
    Case("finite", "rsr_model", TRAIN + ["--tau", "nan"], "finite"),
    Case("finite", "rsr_model", TRAIN + ["--balance-weight", "-1"], ">= 0"),
    Case("finite", "rsr_model", TRAIN + ["--balance-weight", "inf"], "finite"),
    Case("finite", "rsr_model", TRAIN + ["--gate-lr-scale", "nan"], "finite"),
    # 2: outputs, sizes and budgets are judged before any model loads or step runs
    Case("early", "probes.record", REC + ["--num-samples", "1000000000"], "exceeds --max-gb"),
    Case("early", "rsr_model", ["train", "--out", "{m}/notes.txt/x.pt", "--steps", "1"], "is a file, not a folder"),
    Case("early", "rsr_model", TRAIN + ["--trace", "{m}/notes.txt/x.h5"], "is a file, not a folder"),
    Case("early", "rsr_model", ["train", "--out", "/proc/adversarial.pt", "--steps", "1"], "cannot write in /proc"),
    Case("early", "rsr_model", ["train", "--out", "{t}", "--steps", "1"], "is a folder"),
    Case("early", "rsr_model", ["train", "--out", "{m}/tiny.pt", "--steps", "1"], "exists"),
    Case("early", "rsr_model", ["train", "--resume", "--out", "{t}/none.pt"], "not found"),
    Case("early", "rsr_model", SAMPLE[:-1] + ["{m}/notes.txt/x.png", "--prompt", "a"], "is a file, not a folder"),
    Case("early", "rsr_model", SAMPLE[:-1] + ["{t}", "--prompt", "a"], "is a folder"),
    Case("early", "rsr_model", SAMPLE[:-1] + ["{m}/keep.png", "--prompt", "a"], "exists"),
    Case("early", "rsr_model", SAMPLE + ["--prompt", "a", "--num-samples", "100000"], "images"),
    Case("early", "probes.record", REC[:-1] + ["{m}/notes.txt/r.h5"], "is a file, not a folder"),
    Case("early", "probes.record", REC[:-1] + ["{t}"], "is a folder"),
    Case("early", "probes.record", REC[:-1] + ["{m}/good.h5"], "exists"),
    Case("early", "probes.record", REC[:-1] + ["/proc/adversarial.h5"], "cannot write in /proc"),
    Case("early", "probes.record", REC + ["--timesteps", "5:2"], "selects nothing"),
    Case("early", "probes.record", REC + ["--layers", ""], "selects nothing"),
    Case("early", "probes.record", REC + ["--latent-dim", "4"], "--latent-tokens"),
    Case("early", "probes.record", REC + ["--rank", "2", "--world-size", "2"], "rank"),
    Case("early", "probes.record", REC + ["--world-size", "0"], "rank"),
    Case("early", "probes.record", REC + ["--num-samples", "0"], ">= 1"),
    Case("early", "probes.record", REC + ["--steps", "-1"], ">= 1"),
    Case("early", "probes.record", REC + ["--batch-size", "0"], ">= 1"),
    Case("early", "probes.record", REC + ["--token-stride", "0"], ">= 1"),
    Case("early", "probes.record", REC + ["--seed", "-1"], ">= 0"),
    Case("early", "probes.record", REC + ["--layers", "7"], "no RSR"),
    Case("early", "probes.causal", CAUSAL + ["--force-expert", "1", "--json", "{m}/notes.txt/x.json"],
         "is a file, not a folder"),
    Case("early", "probes.causal", CAUSAL + ["--force-expert", "1", "--json", "{m}/keep.json"], "exists"),
    Case("early", "probes.causal", CAUSAL + ["--force-expert", "1", "--num-samples", "0"], ">= 1"),
    Case("early", "probes.routing_value", CK + ["--json", "{m}/notes.txt/v.json"], "is a file, not a folder"),
    Case("early", "probes.routing_value", CK + ["--json", "{m}/keep.json"], "exists"),
    Case("early", "probes.routing_value", CK + ["--samples", "1"], ">= 2"),
    Case("early", "probes.routing_value", CK + ["--bins", "0"], ">= 1"),
    Case("early", "probes.report", ["{m}/good.h5", "--json", "{m}/notes.txt/r.json"], "is a file, not a folder"),
    Case("early", "probes.report", ["{m}/good.h5", "--json", "{m}/keep.json"], "exists"),
    Case("early", "probes.report", ["{m}/good.h5", "--figures", "{m}/notes.txt"], "not a folder"),
    Case("early", "probes.report", ["{m}/good.h5", "--timestep-bins", "0"], ">= 1"),
    Case("early", "probes.report", ["{m}/good.h5", "--permutations", "-1"], ">= 0"),
    Case("early", "traces", ["convert", "{m}/good.h5", "{m}/notes.txt/c.h5"], "is a file, not a folder"),
    Case("early", "traces", ["convert", "{m}/good.h5", "{m}/other.h5"], "exists"),
    Case("early", "traces", ["convert", "{m}/good.h5", "{m}/good.h5", "--overwrite"], "is the command's input"),
    Case("early", "traces", ["join", "{m}/notes.txt/j.h5", "{m}/run.rank0.h5", "{m}/run.rank1.h5"],
         "is a file, not a folder"),
    Case("early", "traces", ["join", "{m}/good.h5", "{m}/run.rank0.h5", "{m}/run.rank1.h5"], "exists"),
    # 3: interventions that would select nothing are errors
    Case("select", "probes.record", REC + ["--force-expert", "1", "--t-window", "1000:500"], "reversed"),
    Case("select", "probes.record", REC + ["--force-expert", "1", "--t-window", "5000:6000"], "none of the sampled"),
    Case("select", "probes.record", REC + ["--force-expert", "1", "--t-window", "abc"], "A:B"),
    Case("select", "probes.record", REC + ["--force-expert", "1", "--region", "4:0,0:4"], "select nothing"),
    Case("select", "probes.record", REC + ["--force-expert", "1", "--region", "0:0,0:4"], "select nothing"),
    Case("select", "probes.record", REC + ["--force-expert", "1", "--region", "100:200,0:4"], "outside"),
    Case("select", "probes.record", REC + ["--force-expert", "1", "--region", ""], "ROWS,COLS"),
    Case("select", "probes.record", REC + ["--force-expert", "1", "--at-layers", ""], "selects nothing"),
    Case("select", "probes.record", REC + ["--force-expert", "1", "--at-step", "9"], "recursion steps"),
    Case("select", "probes.record", REC + ["--ablate-expert", "0", "--at-layers", "5"], "RSR layers"),
    Case("select", "probes.record", REC + ["--force-expert", "99"], "experts 0.."),
    Case("select", "probes.record", REC + ["--force-expert", "-1"], ">= 0"),
    Case("select", "probes.record", REC + ["--t-window", "0:500"], "give --force-expert"),
    Case("select", "probes.causal", CAUSAL + ["--ablate-expert", "1", "--region", "4:0,0:4"], "select nothing"),
    Case("select", "probes.causal", CAUSAL + ["--force-expert", "1", "--t-window", "1000:500"], "reversed"),
    Case("select", "probes.causal", CAUSAL + ["--force-expert", "1", "--t-window", "5000:6000"], "none of the sampled"),
    Case("select", "probes.causal", CAUSAL + ["--force-expert", "1", "--region", "0:4"], "ROWS,COLS"),
    Case("select", "probes.causal", CAUSAL, "give --force-expert"),
    # 4: only the ranks 0..W-1 of one recording join
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/good.h5", "{m}/other.h5"], "same recording"),
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/run.rank0.h5"], "ranks 0..W-1"),
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/run.rank0.h5", "{m}/run.rank0.h5", "{m}/run.rank1.h5"],
         "ranks 0..W-1"),
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/run.rank0.h5", "{m}/stranger.rank1.h5"], "same recording"),
    Case("join", "traces", ["join", "{m}/run.rank0.h5", "{m}/run.rank0.h5", "--overwrite"], "is the command's input"),
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/run.rank0.h5", "{t}/missing.h5"], "no such file"),
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/notes.txt"], "not an HDF5 file"),
    Case("join", "traces", ["join", "{t}/j.h5"], "required"),
    # 8: flags that do not apply are refused
    Case("applies", "rsr_model", SAMPLE + ["--label", "3"], "takes --prompt, not --label"),
    Case("applies", "rsr_model", ["sample", "--ckpt", "{m}/dit.pt", "--steps", "2", "--out", "{t}/x.png",
                                  "--prompt", "a cat"], "takes --label, not --prompt"),
    Case("applies", "rsr_model", SAMPLE, "give at least one"),
    Case("applies", "probes.record", ["--ckpt", "{m}/dit.pt", "--prompts", "3", "--out", "{t}/r.h5"], "no RSR layers"),
    # 10: unusable inputs, said plainly
    Case("input", "probes.report", ["{m}"], "is a folder"),
    Case("input", "probes.report", ["{t}/missing.h5"], "no such file"),
    Case("input", "probes.report", ["{m}/notes.txt"], "not an HDF5 file"),
    Case("input", "probes.report", ["{m}/good.h5", "--routing-value", "{t}/missing.json"], "no such file"),
    Case("input", "traces", ["convert", "{m}", "{t}/c.h5"], "is a folder"),
    Case("input", "traces", [], "expected a command"),
    Case("input", "traces", ["bogus"], "expected a command"),
    Case("input", "probes.derive", ["{m}"], "is a folder"),
    Case("input", "probes.derive", ["{m}/good.h5", "--components", "0"], "components"),
    Case("input", "rsr_model", SAMPLE[:1] + ["--ckpt", "{m}/corrupt.pt", "--prompt", "a", "--out", "{t}/x.png"],
         "not a readable checkpoint"),
    Case("input", "rsr_model", SAMPLE + ["--prompts-file", "{m}/empty.txt"], "is empty"),
    Case("input", "rsr_model", SAMPLE + ["--prompt", "a", "--steps", "0"], ">= 1"),
    Case("input", "rsr_model", TRAIN + ["--steps", "0"], ">= 1"),
    Case("input", "rsr_model", ["train", "--stage", "rsr", "--out", "{t}/n.pt"], "needs --base"),
    Case("input", "probes.record", REC[:2] + ["--prompts", "{m}/empty.txt", "--out", "{t}/r.h5"], "is empty"),
    Case("input", "probes.causal", ["--ckpt", "{t}/none.pt", "--prompts", "a", "--force-expert", "0"], "not found"),
    Case("input", "probes.routing_value", ["--ckpt", "{t}/none.pt"], "not found"),
    Case("input", "dashboard", ["--port", "0"], "1..65535"),
    Case("input", "dashboard", ["--port", "70000"], "1..65535"),
    Case("input", "dashboard", ["--permutations", "-1"], ">= 0"),
    Case("input", "dashboard", ["--ckpt", "{t}/none.pt"], "no such file"),
    Case("input", "dashboard", ["{t}/missing.h5"], "no such file"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.klass}-{c.command}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(case: Case, made, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(m=made, t=out) for a in case.argv]
    assert_refused(_mains()[case.command], argv, made, out, capsys, case.fragment, case.code)


def test_table_is_large_and_covers_every_command():
    assert len(CASES) >= 80
    assert {c.command for c in CASES} == set(_mains())


# --------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class Child:
    """A command in its own process; its stderr is collected as it comes."""

    def __init__(self, module: str, *argv: str, cwd: Path, preexec_fn=None) -> None:
        def start() -> None:
            # A shell starts background jobs (CI, nohup) with SIGINT ignored, and children inherit
            # that; Ctrl-C at a terminal meets a process whose SIGINT is at its default.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if preexec_fn is not None:
                preexec_fn()

        self.proc = subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], cwd=cwd, env=_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=start)
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_for(self, ready, timeout: float = 60.0) -> None:
        """Poll until `ready()` (or the child exited: then the test sees why)."""
        end = time.monotonic() + timeout
        while not ready() and self.proc.poll() is None:
            assert time.monotonic() < end, f"gave up after {timeout:g} s waiting for the child: {''.join(self.err)}"
            time.sleep(0.01)

    def loaded(self, library: str) -> bool:
        """Whether the child has started loading `library` (a shared object mapped in)."""
        try:
            return library in Path(f"/proc/{self.proc.pid}/maps").read_text()
        except OSError:
            return False

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.err))

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # a child that ignored its signal must not hang the suite
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the child did not end within {timeout} s: {''.join(self.err)[-500:]}") from None
        self._reader.join(10)
        return rc, "".join(self.err)


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to time signals")

# Ctrl-C while the start-up imports load: (module, argv, a shared library those imports map in)
STARTUP = {
    "train": ("rsr_model", ["train", "--out", "{t}/k.pt"], "libtorch"),
    "record": ("probes.record", ["--ckpt", "{m}/tiny.pt", "--prompts", PROMPT, "--out", "{t}/k.h5"], "libtorch"),
    "causal": ("probes.causal", CAUSAL + ["--force-expert", "1", "--json", "{t}/k.json"], "libtorch"),
    "report": ("probes.report", ["{m}/good.h5", "--json", "{t}/k.json"], "numpy"),
    "traces": ("traces", ["convert", "{m}/good.h5", "{t}/k.h5"], "h5py"),
}


@needs_proc
@pytest.mark.parametrize("name", list(STARTUP))
def test_ctrl_c_while_imports_load_is_one_line_and_130(name, made, tmp_path):
    module, argv, library = STARTUP[name]
    before = snapshot(made)
    child = Child(module, *[a.format(m=made, t=tmp_path) for a in argv], cwd=tmp_path)
    child.wait_for(lambda: child.loaded(library))
    child.proc.send_signal(signal.SIGINT)
    rc, err = child.finish()
    assert rc == 130 and "interrupted" in one_error_line(err)
    assert snapshot(made) == before and list(tmp_path.iterdir()) == []


@pytest.fixture
def ctrl_c_after(monkeypatch):
    """ctrl_c_after(module, name, n): a real SIGINT to this process right after the n-th call of
    module.name returns (the handler raises KeyboardInterrupt in the main thread, as Ctrl-C does)."""
    previous = signal.getsignal(signal.SIGINT)
    if previous not in (signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL):
        pytest.skip("SIGINT is handled by something else in this test process")
    # as at a terminal, even when the suite runs as a background job (which starts with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def arm(module, name: str, n: int) -> None:
        original, calls = getattr(module, name), [0]

        def wrapped(*args, **kw):
            result = original(*args, **kw)
            calls[0] += 1
            if calls[0] == n:
                signal.raise_signal(signal.SIGINT)
            return result
        monkeypatch.setattr(module, name, wrapped)
    yield arm
    signal.signal(signal.SIGINT, previous)


def _interrupted(capsys, rc: int) -> None:
    assert rc == 130 and "interrupted" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("point, n", [("write_timestep", 1), ("write_timestep", 5), ("write_final", 1)])
def test_ctrl_c_while_recording_keeps_every_flushed_step(point, n, made, tmp_path, capsys, ctrl_c_after):
    from probes.record import main as record
    from traces import SamplingWriter, open_trace

    ctrl_c_after(SamplingWriter, point, n)
    capsys.readouterr()
    _interrupted(capsys, record(["--ckpt", str(made / "tiny.pt"), "--prompts", PROMPT, "--num-samples", "6",
                                 "--steps", "4", "--batch-size", "2", "--out", str(tmp_path / "t.h5")]))
    with open_trace(tmp_path / "t.h5") as tr:
        # The writes run on a background thread, so the next batch may or may not have begun
        # when the interrupt lands: what is certain is the flushed work and the missing rest.
        assert not tr.complete and tr.written.sum() >= n
        assert tr.n_samples < 6 or not tr.written.all()
        if point == "write_final":
            assert tr.final_written.sum() >= 2


# a training step (the task draws its noise through flow.training_pair) and a checkpoint save
@pytest.mark.parametrize("module, point, n", [("rsr_model.flow", "training_pair", 2),
                                              ("rsr_model.train", "save_checkpoint", 2)])
def test_ctrl_c_while_training_keeps_the_last_checkpoint(module, point, n, tmp_path, capsys, ctrl_c_after):
    import importlib

    from rsr_model.__main__ import main as rsr
    from rsr_model.checkpoint import load_checkpoint

    ctrl_c_after(importlib.import_module(module), point, n)
    out = tmp_path / "c.pt"
    capsys.readouterr()
    _interrupted(capsys, rsr(["train", "--stage", "base", "--steps", "6", "--batch-size", "4", "--save-every", "1",
                              "--out", str(out)]))
    step = load_checkpoint(out)["progress"]["base"]
    rows = (tmp_path / "c.pt.log.csv").read_text().splitlines()
    assert step in (1, 2) and rows[0].startswith("stage,step") and len(rows) - 1 >= step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.log.csv"]  # no temporary file


@pytest.mark.parametrize("n", [1, 2])  # while sampling the baseline, then the intervened run
def test_ctrl_c_in_causal_writes_no_json(n, made, tmp_path, capsys, ctrl_c_after):
    import rsr_model.sample
    from probes.causal import main as causal

    ctrl_c_after(rsr_model.sample, "generate", n)
    capsys.readouterr()
    _interrupted(capsys, causal(causal_args(made) + ["--force-expert", "1", "--json", str(tmp_path / "c.json")]))
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_routing_value_writes_no_json(made, tmp_path, capsys, ctrl_c_after):
    import probes.routing_value as rv

    ctrl_c_after(rv, "held_out_batches", 1)
    capsys.readouterr()
    _interrupted(capsys, rv.main(["--ckpt", str(made / "tiny.pt"), "--samples", "4", "--json",
                                  str(tmp_path / "v.json")]))
    assert list(tmp_path.iterdir()) == []


def causal_args(made: Path) -> list[str]:
    return [a.format(m=made) for a in CAUSAL]


def _steps(path: Path) -> int:
    import h5py

    try:
        with h5py.File(path, "r", swmr=True) as f:
            return int(f["/progress/steps"][0])
    except (OSError, KeyError):
        return 0


@needs_proc
def test_sigint_to_a_recording_process(made, tmp_path):
    """A real Ctrl-C to a recorder process mid-run (its writes run on a background thread)."""
    from traces import open_trace

    child = Child("probes.record", "--ckpt", made / "tiny.pt", "--prompts", PROMPT, "--num-samples", "64",
                  "--steps", "8", "--batch-size", "2", "--out", tmp_path / "t.h5", cwd=tmp_path)
    child.wait_for(lambda: _steps(tmp_path / "t.h5") > 0)
    child.proc.send_signal(signal.SIGINT)
    rc, err = child.finish()
    assert rc == 130 and "interrupted" in one_error_line(err)
    with open_trace(tmp_path / "t.h5") as tr:
        assert not tr.complete and tr.written.any()


def test_live_trace_racing_writers_and_sigkill(made, tmp_path, capsys):
    """While a recorder writes: the report says "live", a second writer to the same path fails with
    one line (with or without --overwrite) and changes nothing; after SIGKILL the report says
    "incomplete" and every flushed step reads back."""
    from probes.record import main as record
    from probes.report import main as report
    from traces import open_trace

    trace = tmp_path / "t.h5"
    child = Child("probes.record", "--ckpt", made / "tiny.pt", "--prompts", PROMPT, "--num-samples", "64",
                  "--steps", "8", "--batch-size", "2", "--out", trace, cwd=tmp_path)
    child.wait_for(lambda: _steps(trace) > 0)
    capsys.readouterr()
    assert report([str(trace), "--no-probes", "--permutations", "0"]) == 0
    assert capsys.readouterr().out.startswith("live: still being written")
    for extra, fragment in (([], "exists"), (["--overwrite"], "open in another process")):
        assert record(["--ckpt", str(made / "tiny.pt"), "--prompts", "x", "--steps", "2", "--out", str(trace),
                       *extra]) == 2
        assert fragment in one_error_line(capsys.readouterr().err)
    child.proc.kill()
    assert child.finish()[0] == -signal.SIGKILL
    assert report([str(trace), "--no-probes", "--permutations", "0"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("incomplete: ") and "of 64 planned samples written" in first
    with open_trace(trace) as tr:
        assert tr.written.sum() >= 1 and tr.samples()["prompt"][0] == PROMPT  # the racers changed nothing


@needs_proc
def test_sigkill_during_training_then_resume_rebuilds_the_loss_log(tmp_path):
    """After a kill the checkpoint loads and the log covers it; a resume rewrites the log from the
    checkpoint's own history: steps 1..N, one header, whatever the crash left on disk."""
    from rsr_model.__main__ import main as rsr
    from rsr_model.checkpoint import load_checkpoint

    out = tmp_path / "r.pt"
    log = tmp_path / "r.pt.log.csv"
    child = Child("rsr_model", "train", "--stage", "base", "--steps", "9", "--batch-size", "4", "--save-every", "3",
                  "--out", out, cwd=tmp_path)
    child.wait_for(lambda: out.exists())
    child.proc.kill()
    assert child.finish()[0] == -signal.SIGKILL
    step = load_checkpoint(out)["progress"]["base"]
    rows = log.read_text().splitlines()
    assert 3 <= step < 9 and rows[0].startswith("stage,step") and len(rows) - 1 >= step
    log.write_text("stage,step\nbase,999,bogus\n")
    assert rsr(["train", "--out", str(out), "--resume"]) == 0
    rows = log.read_text().splitlines()
    assert rows[0] == "stage,step,loss,balance,load_share" and rows.count(rows[0]) == 1
    assert [int(r.split(",")[1]) for r in rows[1:]] == list(range(1, 10))


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB file system (a tmpfs; mounting one needs root or a user namespace)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the file-size-limit cases below cover failing writes")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_record_refuses_a_trace_the_disk_cannot_hold(made, small_disk, capsys):
    from probes.record import main as record

    assert record(["--ckpt", str(made / "tiny.pt"), "--prompts", PROMPT, "--num-samples", "40", "--steps", "8",
                   "--probs", "--latent-tokens", "64", "--out", str(small_disk / "t.h5")]) == 2
    assert "has only" in one_error_line(capsys.readouterr().err)
    assert list(small_disk.iterdir()) == []


def test_train_refuses_a_checkpoint_the_disk_cannot_hold(small_disk, capsys):
    from rsr_model.__main__ import main as rsr

    assert rsr(["train", "--steps", "1", "--batch-size", "4", "--out", str(small_disk / "c.pt")]) == 2
    assert "has only" in one_error_line(capsys.readouterr().err)
    assert list(small_disk.iterdir()) == []


@pytest.fixture
def file_size_limit():
    """file_size_limit(n): files of this process may grow to n bytes; writes past it fail with
    EFBIG, as writes to a full disk fail with ENOSPC (Python ignores SIGXFSZ). Restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_record_stops_at_a_full_disk_with_one_line_and_a_readable_trace(made, tmp_path, capsys, file_size_limit):
    from probes.record import main as record
    from traces import open_trace

    file_size_limit(6 << 20)
    rc = record(["--ckpt", str(made / "tiny.pt"), "--prompts", PROMPT, "--num-samples", "40", "--steps", "8",
                 "--probs", "--latent-tokens", "64", "--batch-size", "2", "--out", str(tmp_path / "t.h5")])
    assert rc == 2 and "stopped after" in one_error_line(capsys.readouterr().err)
    with open_trace(tmp_path / "t.h5") as tr:  # readable up to its last flushed step
        assert not tr.complete and 0 < tr.written.sum() < tr.written.size


def test_train_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, file_size_limit):
    from rsr_model.__main__ import main as rsr
    from rsr_model.checkpoint import load_checkpoint

    out = tmp_path / "c.pt"
    assert rsr(["train", "--stage", "base", "--steps", "1", "--batch-size", "4", "--out", str(out)]) == 0
    file_size_limit(out.stat().st_size // 2)  # the new checkpoint cannot be written
    capsys.readouterr()
    assert rsr(["train", "--stage", "base", "--steps", "1", "--batch-size", "4", "--out", str(out), "--overwrite",
                "--seed", "1"]) == 2
    assert "cannot write checkpoint" in one_error_line(capsys.readouterr().err)
    assert load_checkpoint(out)["args"]["seed"] == 0  # the last good checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.log.csv"]  # no temporary file left

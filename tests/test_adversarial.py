"""Every command tried as an adversarial user would: bad numbers, paths that cannot be written,
sizes that must be refused before the work, interventions that select nothing, unrelated
joins, flags that do not apply, a full disk, signals at start-up and mid-run, racing writers.

The contract each case checks (docs/design.md, "Errors"): exit code 2 (130 for an
interrupt), exactly one `error:` line and no traceback, no existing file changed, and no
half-written output where a complete one was promised.

Most cases fail before any work and run in-process through the command's `main(argv)`;
signals, start-up imports and resource limits need a real process and run as subprocesses.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import one_error_line

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "two red circles left of a blue square"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The files the cases refer to, made once: checkpoints, traces, rank files, plain files."""
    from probes.record import main as record
    from rsr_model.__main__ import main as rsr

    d = tmp_path_factory.mktemp("made")
    fast = ["--batch-size", "4", "--save-every", "1"]
    assert rsr(["train", "--out", str(d / "tiny.pt"), "--steps", "2", *fast]) == 0
    assert rsr(["train", "--preset", "dit-digits", "--stage", "base", "--out", str(d / "dit.pt"), "--steps", "1",
                *fast]) == 0
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
    for log in d.glob("*.log.csv"):
        log.unlink()  # (training logs are not inputs of any case)
    return d


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
    """One bad input. argv may use {m} (the made files) and {t} (an empty folder for outputs)."""

    klass: str  # which failure class it probes (see the module docstring of the issue it came from)
    command: str  # module run as `python -m COMMAND`
    argv: list[str]
    fragment: str  # part of the one error line
    code: int = 2
    outputs: list[str] = field(default_factory=list)  # paths that must not exist afterwards


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
    Case("early", "rsr_model", TRAIN + ["--trace", "{m}/notes.txt/x.h5"], "is a file, not a folder", outputs=["n.pt"]),
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
    Case("early", "traces", ["convert", "{m}/good.h5", "{m}/good.h5", "--overwrite"], "is the input"),
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
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/good.h5", "{m}/other.h5"], "same recording", outputs=["j.h5"]),
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/run.rank0.h5"], "ranks 0..W-1", outputs=["j.h5"]),
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/run.rank0.h5", "{m}/run.rank0.h5", "{m}/run.rank1.h5"],
         "ranks 0..W-1", outputs=["j.h5"]),
    Case("join", "traces", ["join", "{t}/j.h5", "{m}/run.rank0.h5", "{m}/stranger.rank1.h5"], "same recording",
         outputs=["j.h5"]),
    Case("join", "traces", ["join", "{m}/run.rank0.h5", "{m}/run.rank0.h5", "--overwrite"], "also a rank file"),
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
    before = snapshot(made)
    capsys.readouterr()
    rc = _mains()[case.command](argv)
    err = capsys.readouterr().err
    assert rc == case.code, err
    assert case.fragment in one_error_line(err)
    assert snapshot(made) == before  # no existing file changed
    assert list(out.iterdir()) == []  # nothing written, not even a part


def test_table_is_large_and_covers_every_command():
    assert len(CASES) >= 80
    assert {c.command for c in CASES} == set(_mains())


# --------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class Child:
    """A command in its own process; its stderr is collected as it comes."""

    def __init__(self, module: str, *argv: str, cwd: Path, preexec_fn=None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], cwd=cwd, env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_for(self, ready, timeout: float = 60.0) -> None:
        """Poll until `ready()` (or the child exited: then the test sees why)."""
        end = time.monotonic() + timeout
        while not ready() and self.proc.poll() is None:
            assert time.monotonic() < end, "".join(self.err)
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
        self.proc.stdout.read()
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc, "".join(self.err)


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to time signals")

# (module, argv, library the start-up imports map in, stderr text once the real work runs, outputs)
LONG = {
    "train": ("rsr_model", ["train", "--steps", "400", "--batch-size", "4", "--save-every", "1", "--out", "{t}/k.pt"],
              "libtorch", "tiny:", ["k.pt"]),
    "record": ("probes.record", ["--ckpt", "{m}/tiny.pt", "--prompts", PROMPT, "--num-samples", "64", "--steps", "8",
                                 "--batch-size", "2", "--out", "{t}/k.h5"], "libtorch", "img-step", ["k.h5"]),
    "causal": ("probes.causal", CAUSAL[:-1] + ["40", "--num-samples", "8", "--force-expert", "1",
                                               "--json", "{t}/k.json"], "libtorch", "sampling", []),
    "routing_value": ("probes.routing_value", ["--ckpt", "{m}/tiny.pt", "--samples", "512", "--json", "{t}/k.json"],
                      "libtorch", "measuring", []),
    "report": ("probes.report", ["{m}/good.h5", "--json", "{t}/k.json"], "numpy", None, []),
    "traces": ("traces", ["convert", "{m}/good.h5", "{t}/k.h5"], "h5py", None, []),
    "derive": ("probes.derive", ["{m}/good.h5"], "numpy", None, []),
}


@needs_proc
@pytest.mark.parametrize("name", list(LONG))
def test_ctrl_c_while_imports_load_is_one_line_and_130(name, made, tmp_path):
    module, argv, library, _, _ = LONG[name]
    before = snapshot(made)
    child = Child(module, *[a.format(m=made, t=tmp_path) for a in argv], cwd=tmp_path)
    child.wait_for(lambda: child.loaded(library))
    child.proc.send_signal(signal.SIGINT)
    rc, err = child.finish()
    assert rc == 130 and "interrupted" in one_error_line(err)
    assert snapshot(made) == before and list(tmp_path.iterdir()) == []


@needs_proc
@pytest.mark.parametrize("name", ["train", "record", "causal", "routing_value"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_signal_mid_run_loses_nothing_written(name, sig, made, tmp_path):
    """Interrupted or killed while working: what was flushed stays readable, nothing is half-written."""
    from rsr_model.checkpoint import load_checkpoint
    from traces import open_trace

    module, argv, _, working, outputs = LONG[name]
    before = snapshot(made)
    child = Child(module, *[a.format(m=made, t=tmp_path) for a in argv], cwd=tmp_path)
    if name == "record":  # at least one flushed step
        child.wait_for(lambda: child.said(working) and _steps(tmp_path / "k.h5") > 0)
    elif name == "train":  # at least one checkpoint
        child.wait_for(lambda: (tmp_path / "k.pt").exists())
    else:
        child.wait_for(lambda: child.said(working))
    child.proc.send_signal(sig)
    rc, err = child.finish()
    if sig == signal.SIGINT:
        assert rc == 130 and "interrupted" in one_error_line(err)
    else:
        assert rc == -signal.SIGKILL
    assert snapshot(made) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log.csv")) == outputs
    if name == "record":
        with open_trace(tmp_path / "k.h5") as tr:
            assert not tr.complete and tr.steps > 0 and tr.written.any()
    if name == "train":
        step = load_checkpoint(tmp_path / "k.pt")["progress"]["rsr"]
        log = (tmp_path / "k.pt.log.csv").read_text().splitlines()
        assert log[0].startswith("stage,step") and len(log) - 1 >= step  # flushed with every checkpoint


def _steps(path: Path) -> int:
    import h5py

    try:
        with h5py.File(path, "r", swmr=True) as f:
            return int(f["/progress/steps"][0])
    except (OSError, KeyError):
        return 0


def test_resume_after_sigkill_rebuilds_the_loss_log(tmp_path):
    """The log covers steps 1..N with one header after a kill and a resume, whatever was on disk."""
    from rsr_model.__main__ import main as rsr
    from rsr_model.checkpoint import load_checkpoint

    out = tmp_path / "r.pt"
    child = Child("rsr_model", "train", "--steps", "400", "--batch-size", "4", "--save-every", "3", "--out", out,
                  cwd=tmp_path)
    child.wait_for(lambda: out.exists() and load_checkpoint(out)["progress"]["rsr"] >= 3)
    child.proc.kill()
    child.finish()
    log = out.with_name("r.pt.log.csv")
    log.write_text("stage,step\nrsr,999,bogus\n")  # whatever the crash left, even rows past the checkpoint
    n = load_checkpoint(out)["progress"]["rsr"]
    assert rsr(["train", "--steps", str(n + 2), "--batch-size", "4", "--save-every", "3", "--out", str(out),
                "--resume"]) == 0
    rows = log.read_text().splitlines()
    assert rows[0] == "stage,step,loss,balance,load_share" and rows.count(rows[0]) == 1
    assert [int(r.split(",")[1]) for r in rows[1:]] == list(range(1, n + 3))


# --------------------------------------------------------------------------- a full disk


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    return ok


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB file system (a tmpfs; mounting needs root or a user namespace)."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (not root); the file-size-limit cases cover failing writes")
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


def _file_size_limit(nbytes: int):
    """preexec_fn: files may grow to `nbytes` (writes past it fail with EFBIG, as on a full disk)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_record_stops_at_a_full_disk_with_one_line_and_a_readable_trace(made, tmp_path):
    from traces import open_trace

    child = Child("probes.record", "--ckpt", made / "tiny.pt", "--prompts", PROMPT, "--num-samples", "40",
                  "--steps", "8", "--probs", "--latent-tokens", "64", "--batch-size", "2", "--out", tmp_path / "t.h5",
                  cwd=tmp_path, preexec_fn=_file_size_limit(6 << 20))
    rc, err = child.finish()
    assert rc == 2 and "stopped after" in one_error_line(err)
    with open_trace(tmp_path / "t.h5") as tr:  # readable up to its last flushed step
        assert not tr.complete and 0 < tr.written.sum() < tr.written.size


def test_train_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    from rsr_model.checkpoint import load_checkpoint

    out = tmp_path / "c.pt"
    first = subprocess.run([sys.executable, "-m", "rsr_model", "train", "--steps", "1", "--batch-size", "4",
                            "--out", str(out)], env=_env(), capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    size = out.stat().st_size
    # a resumed run whose next checkpoint cannot be written (the old one plus a little is allowed)
    child = Child("rsr_model", "train", "--steps", "3", "--batch-size", "4", "--save-every", "1", "--resume",
                  "--out", out, cwd=tmp_path, preexec_fn=_file_size_limit(size // 2))
    rc, err = child.finish()
    assert rc == 2 and "cannot write checkpoint" in one_error_line(err)
    assert load_checkpoint(out)["progress"]["rsr"] == 1  # the last good checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.log.csv"]  # no temporary file left


# --------------------------------------------------------------------------- concurrent writers, live traces


def test_two_recorders_racing_for_one_path(made, tmp_path):
    """One wins and writes a complete trace; the other fails with one line and leaves it alone."""
    from traces import open_trace

    argv = ["--ckpt", made / "tiny.pt", "--prompts", PROMPT, "--steps", "2", "--out", tmp_path / "t.h5"]
    children = [Child("probes.record", *argv, cwd=tmp_path) for _ in range(2)]
    results = sorted(c.finish() for c in children)
    assert [rc for rc, _ in results] == [0, 2]
    assert "exists" in one_error_line(results[1][1])
    with open_trace(tmp_path / "t.h5") as tr:
        assert tr.complete and tr.written.all()


def test_report_says_live_then_incomplete(made, tmp_path, capsys):
    from probes.report import main as report

    trace = tmp_path / "t.h5"
    child = Child("probes.record", "--ckpt", made / "tiny.pt", "--prompts", PROMPT, "--num-samples", "64",
                  "--steps", "8", "--batch-size", "2", "--out", trace, cwd=tmp_path)
    child.wait_for(lambda: _steps(trace) > 0)
    capsys.readouterr()
    assert report([str(trace), "--no-probes", "--permutations", "0"]) == 0
    assert capsys.readouterr().out.startswith("live: still being written")
    child.proc.kill()
    child.finish()
    assert report([str(trace), "--no-probes", "--permutations", "0"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("incomplete: ") and "of 64 planned samples written" in first

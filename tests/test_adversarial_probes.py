"""The probe and evaluation commands tried as an adversary would (issue 22): outputs that are
inputs, results on mismatched or repeated inputs, flags a mode would ignore, repeated selections,
inputs that used to crash, checks that came after the work, and `probes.derive` killed mid-write.

The table's contract is the one of tests/test_adversarial.py: exit code 2, exactly one `error:`
line and no traceback, every made file byte-identical, nothing in the output folder. The
wrong-result classes also have tests of the result itself (a routing value decides only its own
checkpoint's verdicts; a cached RSR row is reused only for its own base), and the derive's
crash safety is tested by SIGKILLing a real `probes.derive` process at several moments.

Rows per class: see `test_table_covers_every_class_and_command`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest

from .conftest import assert_refused, one_error_line

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "two red circles left of a blue square"
MAP = "SFFF/FHFH/FFFH/HFFG"


# --------------------------------------------------------------------------- fixtures


def _routing_value_variants(d: Path) -> None:
    """Hand-edited copies of a real routing-value result, one defect each."""
    good = json.loads((d / "rv.json").read_text())

    def variant(name: str, edit) -> None:
        value = json.loads(json.dumps(good))
        edit(value)
        (d / name).write_text(json.dumps(value))

    variant("rv_nosha.json", lambda v: v.pop("checkpoint_sha256"))
    variant("rv_v99.json", lambda v: v.update(schema_version=99))
    variant("rv_other.json", lambda v: v.update(checkpoint_sha256="0" * 64))
    variant("rv_scopes_list.json", lambda v: v.update(scopes=[1, 2]))
    variant("rv_value_text.json", lambda v: v["scopes"]["all"].update(value="high"))
    variant("rv_ci_short.json", lambda v: v["scopes"]["all"].update(value_ci95=[0.1]))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The files the cases refer to, made once: checkpoints, traces, routing values, plain files."""
    from probes.record import main as record
    from probes.routing_value import main as routing_value
    from rsr_model.__main__ import main as rsr

    d = tmp_path_factory.mktemp("made")
    fast = ["--batch-size", "4", "--save-every", "1"]
    assert rsr(["train", "--out", str(d / "tiny.pt"), "--steps", "2", *fast]) == 0
    assert rsr(["train", "--preset", "frozenlake", "--out", str(d / "fl.pt"), "--steps", "1", *fast]) == 0
    rec = ["--ckpt", str(d / "tiny.pt"), "--steps", "2"]
    assert record([*rec, "--prompts", PROMPT, "--out", str(d / "good.h5")]) == 0
    assert record([*rec, "--prompts", PROMPT, "--num-samples", "2", "--latent-tokens", "16",
                   "--out", str(d / "lat.h5")]) == 0
    assert routing_value(["--ckpt", str(d / "tiny.pt"), "--samples", "2", "--bins", "1", "--random-draws", "1",
                          "--json", str(d / "rv.json")]) == 0
    _routing_value_variants(d)
    for axis in ("step", "layer"):  # a trace recorded with a repeated selection, before lists were checked
        shutil.copyfile(d / "good.h5", d / f"dup_{axis}.h5")
        with h5py.File(d / f"dup_{axis}.h5", "r+") as f:
            coords = f[f"coords/{axis}"]
            if len(coords) < 2:
                coords = f["coords/step"]
            coords[1] = coords[0]
    shutil.copyfile(d / "fl.pt", d / "fl_copy.pt")
    os.symlink(d / "tiny.pt", d / "ck_link.pt")
    (d / "prompts.txt").write_text(PROMPT + "\n")
    (d / "notes.txt").write_text("not a trace, and not a folder\n")
    (d / "corrupt.pt").write_bytes((d / "tiny.pt").read_bytes()[:5000])
    (d / "lora").mkdir()
    (d / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"keep")
    for log in d.glob("*.log.csv"):
        log.unlink()  # (training logs are not inputs of any case)
    return d


def _mains():
    from probes.causal import main as causal
    from probes.projections import main as derive
    from probes.record import main as record
    from probes.report import main as report
    from probes.routing_value import main as routing_value
    from rsr_model.__main__ import main as rsr

    return {"probes.record": record, "probes.report": report, "probes.causal": causal,
            "probes.routing_value": routing_value, "probes.derive": derive,
            "evaluate": lambda argv: rsr(["evaluate", *argv]), "export-lora": lambda argv: rsr(["export-lora", *argv])}


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One bad input; argv may use {m} (made files, all of which must stay unchanged) and {t} (the
    output folder, which must stay empty)."""

    klass: int  # the class of issue 22
    command: str
    argv: list[str]
    fragment: str  # part of the one error line


CK = ["--ckpt", "{m}/tiny.pt"]
REC = ["--ckpt", "{m}/tiny.pt", "--prompts", PROMPT, "--steps", "2", "--out", "{t}/r.h5"]
MAPS = ["--ckpt", "{m}/fl.pt", "--maps", MAP, "--out", "{t}/m.h5"]
CAUSAL = ["--ckpt", "{m}/tiny.pt", "--prompts", PROMPT, "--steps", "2", "--force-expert", "1"]
RV = ["--samples", "2", "--bins", "1", "--random-draws", "1"]
EXPORT = ["--export", "dpg", "--ckpt", "{m}/tiny.pt", "--prompts", "{m}/prompts.txt", "--samples-per-prompt", "1",
          "--sample-steps", "1"]
LORA = ["--ckpt", "{m}/tiny.pt", "--expert", "0"]
DESTROY = "would destroy the input"

CASES = [
    # 1: an output that is one of the command's inputs is refused, --overwrite or not
    Case(1, "probes.record", REC[:-1] + ["{m}/tiny.pt", "--overwrite"], DESTROY),
    Case(1, "probes.record", REC[:-1] + ["{m}/ck_link.pt", "--overwrite"], DESTROY),
    Case(1, "probes.record", ["--ckpt", "{m}/tiny.pt", "--prompts", "{m}/prompts.txt", "--out", "{m}/prompts.txt",
                              "--overwrite"], DESTROY),
    Case(1, "probes.record", MAPS[:-1] + ["{m}/fl.pt", "--overwrite"], DESTROY),
    Case(1, "probes.report", ["{m}/good.h5", "--json", "{m}/good.h5", "--overwrite"], DESTROY),
    Case(1, "probes.report", ["{m}/good.h5", "--figures", "{m}/good.h5", "--overwrite"], DESTROY),
    Case(1, "probes.report", ["{m}/good.h5", "--routing-value", "{m}/rv.json", "--json", "{m}/rv.json",
                              "--overwrite"], DESTROY),
    Case(1, "probes.report", ["{m}/good.h5", "--compare", "{m}/lat.h5", "--json", "{m}/lat.h5", "--overwrite"],
         DESTROY),
    Case(1, "probes.routing_value", CK + RV + ["--json", "{m}/tiny.pt", "--overwrite"], DESTROY),
    Case(1, "probes.routing_value", ["--ckpt", "{m}/ck_link.pt", *RV, "--json", "{m}/tiny.pt", "--overwrite"],
         DESTROY),
    Case(1, "probes.causal", CAUSAL + ["--json", "{m}/tiny.pt", "--overwrite"], DESTROY),
    Case(1, "probes.causal", ["--ckpt", "{m}/tiny.pt", "--prompts", "{m}/prompts.txt", "--force-expert", "1",
                              "--json", "{m}/prompts.txt", "--overwrite"], DESTROY),
    Case(1, "evaluate", EXPORT + ["--out", "{m}/tiny.pt", "--overwrite"], DESTROY),
    Case(1, "evaluate", EXPORT + ["--out", "{m}/prompts.txt", "--overwrite"], DESTROY),
    Case(1, "evaluate", ["--class-conditioned", "--quick", "--base", "{m}/tiny.pt", "--out", "{m}/tiny.pt"], DESTROY),
    Case(1, "evaluate", ["--table", "--quick", "--base", "{m}/tiny.pt", "--out", "{m}/tiny.pt"], DESTROY),
    Case(1, "evaluate", ["--planning", "{m}/fl.pt", "--out", "{m}/fl.pt", "--overwrite"], DESTROY),
    Case(1, "export-lora", LORA + ["--out", "{m}/tiny.pt", "--overwrite"], DESTROY),
    # 4: results on mismatched or repeated inputs are refused (and --derive writes nothing first)
    Case(4, "probes.report", ["{m}/good.h5", "--routing-value", "{m}/rv_nosha.json"], "no checkpoint_sha256"),
    Case(4, "probes.report", ["{m}/good.h5", "--routing-value", "{m}/rv_v99.json"], "schema_version 99"),
    Case(4, "probes.report", ["{m}/good.h5", "--routing-value", "{m}/rv_other.json"], "another checkpoint"),
    Case(4, "probes.report", ["{m}/lat.h5", "--derive", "--routing-value", "{m}/rv_other.json"],
         "another checkpoint"),
    Case(4, "probes.report", ["{m}/lat.h5", "--derive", "--routing-value", "{m}/rv_nosha.json"],
         "no checkpoint_sha256"),
    Case(4, "evaluate", ["--planning", "{m}/fl.pt", "{m}/fl.pt", "--out", "{t}"], "same checkpoint"),
    Case(4, "evaluate", ["--planning", "{m}/fl.pt", "{m}/fl_copy.pt", "--out", "{t}"], "same checkpoint"),
    Case(4, "evaluate", ["--table", "--quick", "--seeds", "0,0", "--out", "{t}"], "more than once"),
    Case(4, "evaluate", ["--table", "--quick", "--seeds", "0", "1", "0", "--out", "{t}"], "more than once"),
    Case(4, "evaluate", ["--class-conditioned", "--quick", "--seeds", "1,1", "--out", "{t}"], "more than once"),
    Case(4, "evaluate", ["--scorer-check", "--resolutions", "24,24", "--out", "{t}"], "more than once"),
    # 8: a flag the mode does not read is refused, not ignored
    *[Case(8, "probes.record", MAPS + extra, f"{extra[0]} does not apply to a recording of --maps")
      for extra in (["--force-expert", "0"], ["--max-gb", "1"], ["--prompts", PROMPT], ["--rank", "0"],
                    ["--num-samples", "2"], ["--timesteps", "0"], ["--seed", "3"], ["--layers", "1"])],
    Case(8, "probes.record", REC[:2] + ["--prompts", "{m}/lora", "--out", "{t}/r.h5"], "is a folder"),
    Case(8, "evaluate", ["--scorer-check", "--quick", "--out", "{t}"], "--quick does not apply to --scorer-check"),
    Case(8, "evaluate", ["--scorer-check", "--seeds", "0", "--out", "{t}"], "--seeds does not apply"),
    Case(8, "evaluate", ["--scorer-check", "--ckpt", "{m}/tiny.pt", "--out", "{t}"], "--ckpt does not apply"),
    Case(8, "evaluate", ["--scorer-check", "--guidance", "2", "--out", "{t}"], "--guidance does not apply"),
    Case(8, "evaluate", ["--planning", "{m}/fl.pt", "--seeds", "0", "--out", "{t}"], "--seeds does not apply"),
    Case(8, "evaluate", ["--planning", "{m}/fl.pt", "--guidance", "2", "--out", "{t}"], "--guidance does not apply"),
    Case(8, "evaluate", ["--class-conditioned", "--images-per-category", "2", "--out", "{t}"],
         "--images-per-category does not apply"),
    Case(8, "evaluate", ["--table", "--samples-per-class", "2", "--out", "{t}"], "--samples-per-class does not apply"),
    Case(8, "evaluate", EXPORT + ["--quick", "--out", "{t}"], "--quick does not apply"),
    Case(8, "evaluate", ["--prompts-out", "{t}/p.txt", "--out", "{t}"], "--out does not apply"),
    Case(8, "evaluate", ["--table", "--seeds=-1", "--out", "{t}"], ">= 0"),
    # 9: a selection names each index once
    Case(9, "probes.record", REC + ["--layers", "2,2"], "more than once"),
    Case(9, "probes.record", REC + ["--rsr-steps", "1,1,0"], "more than once"),
    Case(9, "probes.record", REC + ["--tokens", "5,5,7"], "more than once"),
    Case(9, "probes.record", REC + ["--timesteps", "2,0,2"], "more than once"),
    Case(9, "probes.record", REC + ["--force-expert", "0", "--at-layers", "1,1"], "more than once"),
    # 10: inputs that used to end in a traceback
    Case(10, "probes.routing_value", ["--ckpt", "{m}/fl.pt", *RV], "flow-matching loss"),
    Case(10, "evaluate", ["--scorer-check", "--resolutions", "", "--out", "{t}"], "at least one integer"),
    Case(10, "probes.derive", ["{m}/lat.h5", "--seed=-1"], ">= 0"),
    Case(10, "probes.report", ["{m}/dup_step.h5"], "is stored more than once"),
    Case(10, "probes.report", ["{m}/dup_layer.h5"], "is stored more than once"),
    Case(10, "probes.report", ["{m}/good.h5", "--routing-value", "{m}/rv_scopes_list.json"], "no scopes"),
    Case(10, "probes.report", ["{m}/good.h5", "--routing-value", "{m}/rv_value_text.json"], "finite value"),
    Case(10, "probes.report", ["{m}/good.h5", "--routing-value", "{m}/rv_ci_short.json"], "value_ci95"),
    # 11: outputs judged before any work (the corrupt checkpoint would fail later: the output's error comes first)
    Case(11, "evaluate", EXPORT[:3] + ["{m}/corrupt.pt", "--out", "{m}/notes.txt/x"], "is a file, not a folder"),
    Case(11, "evaluate", ["--scorer-check", "--out", "{m}/notes.txt"], "not a folder"),
    Case(11, "evaluate", ["--table", "--quick", "--out", "/proc/adversarial"], "cannot write"),
    Case(11, "evaluate", ["--class-conditioned", "--quick", "--out", "{m}/notes.txt"], "not a folder"),
    Case(11, "evaluate", ["--planning", "{m}/fl.pt", "{m}/tiny.pt", "--out", "{t}"], "no held-out maps"),
    Case(11, "export-lora", ["--ckpt", "{m}/corrupt.pt", "--expert", "0", "--out", "{m}/notes.txt/x"],
         "is a file, not a folder"),
    Case(11, "export-lora", ["--ckpt", "{m}/corrupt.pt", "--expert", "0", "--out", "{m}/lora"], "exists"),
    Case(11, "export-lora", LORA[:2] + ["--expert", "-1", "--out", "{t}/l"], ">= 0"),
    # 14: sizes in a unit that shows them
    Case(14, "probes.record", REC + ["--max-gb", "1e-7"], "KiB exceeds --max-gb 1e-07 (107 B)"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.klass}-{c.command}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(case: Case, made, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(m=made, t=out) for a in case.argv]
    assert_refused(_mains()[case.command], argv, made, out, capsys, case.fragment)


def test_table_covers_every_class_and_command():
    rows = {(c.klass, c.command) for c in CASES}
    assert {c.klass for c in CASES} == {1, 4, 8, 9, 10, 11, 14}
    assert {command for klass, command in rows if klass == 1} == set(_mains()) - {"probes.derive"}  # derive: no output
    assert len(CASES) >= 65


# --------------------------------------------------------------------------- results themselves (class 4, 10)


def test_routing_value_decides_only_its_own_checkpoints_verdicts(made, tmp_path, capsys):
    """The matching routing value enters the verdicts; the same numbers with its sha256 removed are
    refused (before: they decided any trace's verdicts)."""
    from probes.report import main as report

    assert report([str(made / "good.h5"), "--routing-value", str(made / "rv.json"), "--no-probes",
                   "--permutations", "0", "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    value = json.loads((made / "rv.json").read_text())
    verdicts = [step["verdict"] for layer in r["layers"].values() for step in layer["steps"].values()]
    assert verdicts and r["routing_value"]["checkpoint_sha256"] == r["trace"]["checkpoint_sha256"]
    assert all(v["evidence"]["adapter_gain"] == pytest.approx(value["scopes"]["all"]["adapter_gain"])
               for v in verdicts)
    capsys.readouterr()
    assert report([str(made / "good.h5"), "--routing-value", str(made / "rv_nosha.json"),
                   "--json", str(tmp_path / "s.json")]) == 2
    assert not (tmp_path / "s.json").exists()


def test_cached_rsr_row_is_reused_only_for_its_own_base(tmp_path):
    """`evaluate --table/--class-conditioned --base B`: a finished row trained on base A is not
    taken for base B (before: the cache key ignored the base); it is reused for A again."""
    from evaluation import table
    from rsr_model.__main__ import main as rsr

    for name, seed in (("a.pt", "0"), ("b.pt", "1")):
        assert rsr(["train", "--stage", "base", "--steps", "1", "--batch-size", "4", "--seed", seed,
                    "--out", str(tmp_path / name)]) == 0
    budget = dataclasses.replace(table.QUICK, rsr_steps=1)
    path_a, seconds_a = table.train_row(tmp_path, tmp_path / "a.pt", "middle", "rsr", 0, budget)
    path_b, seconds_b = table.train_row(tmp_path, tmp_path / "b.pt", "middle", "rsr", 0, budget)
    assert seconds_a > 0 and seconds_b > 0 and path_a != path_b  # B trained its own row
    assert table.train_row(tmp_path, tmp_path / "a.pt", "middle", "rsr", 0, budget) == (path_a, 0.0)


def test_reports_on_token_subsets_and_rank_files(made, tmp_path, capsys):
    """A trace of a few explicit --tokens and one rank file of a two-rank recording report (both
    ended in a traceback): the position table keeps every region, the seed table matches by id."""
    from probes.record import main as record
    from probes.report import main as report

    rec = ["--ckpt", str(made / "tiny.pt"), "--steps", "2", "--prompts", PROMPT]
    assert record([*rec, "--tokens", "5,7", "--out", str(tmp_path / "tok.h5")]) == 0
    assert record([*rec, "--num-samples", "4", "--rank", "1", "--world-size", "2",
                   "--out", str(tmp_path / "r1.h5")]) == 0
    for trace in ("tok.h5", "r1.h5"):
        assert report([str(tmp_path / trace), "--no-probes", "--permutations", "0",
                       "--json", str(tmp_path / f"{trace}.json")]) == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "tok.h5.json").read_text())
    position = next(iter(next(iter(r["layers"].values()))["steps"].values()))["mi"]["position"]
    assert len(position["labels"]) > 2  # the label's regions, not only the two the tokens fall in
    r1 = json.loads((tmp_path / "r1.h5.json").read_text())
    seeds = next(iter(next(iter(r1["layers"].values()))["steps"].values()))["stability"]["seeds"]
    assert seeds["kappa"] is not None  # samples 1 and 3 of one prompt compared


def test_planning_checks_every_checkpoint_before_planning_any(made, tmp_path, capsys, monkeypatch):
    """`--planning FROZENLAKE TEXT`: the text checkpoint is refused before the FrozenLake one plans
    its 200 maps (before: after them)."""
    from evaluation import planning
    from rsr_model.__main__ import main as rsr

    def planned(*_):
        raise AssertionError("a checkpoint was planned before every checkpoint was checked")

    monkeypatch.setattr(planning, "checkpoint_figures", planned)
    assert rsr(["evaluate", "--planning", str(made / "fl.pt"), str(made / "tiny.pt"), "--out", str(tmp_path)]) == 2
    assert "no held-out maps" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- derive killed (class 2)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _derive(trace: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "probes.derive", str(trace), "--overwrite", *extra], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _copies(trace: Path) -> list[Path]:
    return list(trace.parent.glob(f".{trace.name}.derive-*.tmp"))


def _wait(ready, proc: subprocess.Popen, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


def _derived_state(trace: Path) -> str:
    """'none' or 'complete'; anything else (a damaged trace, half a /derived) fails the test."""
    from probes.projections import load_derived
    from traces import open_trace

    with open_trace(trace) as tr:  # opens and validates
        assert tr.complete and int(tr.written.sum()) > 0
    d = load_derived(trace)
    if not d:
        return "none"
    assert d["pca"]["coords"].shape[-1] == 3 and (d["pca"]["coords"] != 0).any()
    return "complete"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_derive_killed_at_any_moment_leaves_a_readable_trace(made, tmp_path):
    """SIGKILL a real `probes.derive` at fixed delays and at moments after its copy appears (the
    window in which the old in-place write destroyed the trace): every time the trace opens,
    validates, and holds either no /derived or a whole one; the next derive removes the stale copy."""
    from traces.derived import stale_copies

    trace = tmp_path / "t.h5"
    hit_window = 0
    moments = [("delay", 0.3), ("delay", 1.0), ("copy", 0.0), ("copy", 0.01), ("copy", 0.05), ("copy", 0.2)]
    for kind, delay in moments:
        shutil.copyfile(made / "lat.h5", trace)
        proc = _derive(trace)
        if kind == "copy":
            _wait(lambda: bool(_copies(trace)), proc)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        hit_window += bool(_copies(trace))
        assert _derived_state(trace) in ("none", "complete")
    assert hit_window >= 2  # the kills did land while the projections were being written
    assert stale_copies(trace)
    proc = _derive(trace)
    assert proc.wait(120) == 0, proc.stderr.read()
    assert _derived_state(trace) == "complete" and _copies(trace) == []


def _holds_flock(path: Path, pid: int) -> bool:
    """Whether process `pid` holds a flock on `path` (from /proc/locks, without taking one)."""
    inode = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[4] == str(pid) and parts[5].endswith(f":{inode}"):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_recorder_cannot_replace_a_trace_a_stopped_derive_holds(made, tmp_path, capsys):
    """A derive stopped (SIGSTOP) anywhere after it took the trace holds the writer lock: a
    recorder's --overwrite is refused with one line and changes nothing; the derive, continued,
    finishes and the trace holds its /derived."""
    from probes.record import main as record

    trace = tmp_path / "t.h5"
    shutil.copyfile(made / "lat.h5", trace)
    before = hashlib.sha256(trace.read_bytes()).hexdigest()
    proc = _derive(trace)
    assert _wait(lambda: _holds_flock(trace, proc.pid), proc), proc.stderr.read()
    proc.send_signal(signal.SIGSTOP)
    try:
        capsys.readouterr()
        assert record(["--ckpt", str(made / "tiny.pt"), "--prompts", "x", "--steps", "2", "--out", str(trace),
                       "--overwrite"]) == 2
        assert "open in another process" in one_error_line(capsys.readouterr().err)
        assert hashlib.sha256(trace.read_bytes()).hexdigest() == before
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(120) == 0, proc.stderr.read()
    assert _derived_state(trace) == "complete"


def test_recorder_cannot_replace_a_trace_while_derive_fits(made, tmp_path, capsys, monkeypatch):
    """The moment of issue 22: the derive has read the latents and is fitting its PCA, with the
    trace closed. A recorder's --overwrite then is refused (the derive holds the writer lock from
    its first read to its swap); before, it truncated the trace and the derive died on it."""
    from probes import projections
    from probes.record import main as record

    trace = tmp_path / "t.h5"
    shutil.copyfile(made / "lat.h5", trace)
    before = hashlib.sha256(trace.read_bytes()).hexdigest()
    fit, answers = projections.pca, []

    def racing_fit(*args, **kw):
        if not answers:
            answers.append(record(["--ckpt", str(made / "tiny.pt"), "--prompts", "x", "--steps", "2",
                                   "--out", str(trace), "--overwrite"]))
            answers.append(one_error_line(capsys.readouterr().err))
            answers.append(hashlib.sha256(trace.read_bytes()).hexdigest())
        return fit(*args, **kw)

    monkeypatch.setattr(projections, "pca", racing_fit)
    capsys.readouterr()
    projections.derive(trace, overwrite=True)
    assert answers[0] == 2 and "open in another process" in answers[1] and answers[2] == before
    assert _derived_state(trace) == "complete"

"""Fixtures and helpers every test file may use: tiny models built in memory, commands run in
process, waits with a deadline, set-up made once per session that many files read (a trained
tiny checkpoint, a trace recorded from it, the quick evaluation results), and the dashboard
served to a headless browser."""

import contextlib
import hashlib
import importlib
import importlib.util
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def sd3():
    """A tiny real SD3Transformer2DModel (eval mode) and one batch of inputs for it."""
    from rsr_model.backbones import tiny_sd3

    torch.manual_seed(0)
    model = tiny_sd3(num_layers=4).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 3, 32, 32, generator=g),
                  encoder_hidden_states=torch.randn(2, 8, 384, generator=g),
                  pooled_projections=torch.randn(2, 384, generator=g),
                  timestep=torch.tensor([700.0, 30.0]))
    return model, inputs


@pytest.fixture
def dit():
    from rsr_model.backbones import tiny_dit

    torch.manual_seed(0)
    model = tiny_dit(num_layers=4).eval()  # eval: DiT drops class labels at random in train mode
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 1, 16, 16, generator=g), timestep=torch.tensor([700.0, 30.0]),
                  class_labels=torch.tensor([3, 7]))
    return model, inputs


def run(model, inputs):
    return model(**inputs).sample


def randomize_rsr(rsr, scale=0.05, seed=0):
    """Give the (zero-initialised) B factors values so that adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in rsr.values():
            layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=g) * scale)


def one_error_line(err: str) -> str:
    """The message of a command that failed as every command must: exactly one `error:` line on
    stderr, the last line (progress bars of work done before the failure may precede it), and
    no traceback. Returns that line."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file under `folder` (symlinks left out): equal before and after a
    refused command means no input changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_refused(main, argv: list[str], inputs: Path, out: Path, capsys, fragment: str, code: int = 2) -> str:
    """The contract of every command on bad input (the adversarial tables): exit `code`, exactly
    one `error:` line holding `fragment`, every file under `inputs` byte-identical, and nothing at all
    written under `out` (not a part, a lock or a folder). Returns the error line."""
    before = snapshot(inputs)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    line = one_error_line(err)
    assert fragment in line, line
    assert snapshot(inputs) == before  # no input changed
    assert list(out.iterdir()) == []  # nothing written, not even a part
    return line


# --------------------------------------------------------------------------- commands and waits


def run_cli(module: str, *args) -> int:
    """`python -m MODULE ARGS...` run in this process (arguments may be paths or numbers): the
    command's exit code. In-process so that a test sees the command's output through capsys and
    pays no interpreter start-up; use a subprocess only where a test needs a real process."""
    spec = importlib.util.find_spec(module)
    target = f"{module}.__main__" if spec is not None and spec.submodule_search_locations is not None else module
    return importlib.import_module(target).main([str(a) for a in args])


def train(out, *args, steps: int = 2, batch_size: int = 4) -> int:
    """A short `python -m rsr_model train` into `out` (the tiny preset and both stages unless
    `args` say otherwise): its exit code. Flags in `args` come last, so they win."""
    return run_cli("rsr_model", "train", "--out", out, "--steps", steps, "--batch-size", batch_size, *args)


def wait_until(condition: Callable[[], Any], timeout: float, waiting_for: str, poll_s: float = 0.05) -> Any:
    """Call `condition()` until it returns something true, and return that. Past `timeout`
    seconds the test fails, saying what it was `waiting_for`. For state that announces no event
    (a file another process writes, a job's flag); a test that can block on an event (a line on
    a pipe, a process exit) should do that instead."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g} s waiting for {waiting_for}", pytrace=False)
        time.sleep(poll_s)
    return result


# --------------------------------------------------------------------------- shared set-up
#
# What several files need is made once per test session, on first use (a file that does not
# ask for a fixture does not pay for it). Tests read these files and never change them: a test
# that must change one copies it into its own tmp_path first. Each fixture checks at the end of
# the session that its files are as it made them, so a test that wrote into one shows up as an
# error at teardown (the checkout may run as root, so file modes cannot enforce it).

TRACE_PROMPTS = "two red circles left of a blue square\na green triangle\na red triangle\n"


@dataclass(frozen=True)
class CommandResult:
    """What a command left: its output folder (or file) and what it printed."""

    out: Path
    stdout: str
    stderr: str


def _digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@contextlib.contextmanager
def _kept_unchanged(*roots: Path) -> Iterator[None]:
    before = {k: v for root in roots for k, v in _digests(root).items()}
    yield
    after = {k: v for root in roots for k, v in _digests(root).items()}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed shared set-up files (copy them into tmp_path first): {changed}"


def _captured(module: str, *args) -> tuple[int, str, str]:
    """run_cli with stdout and stderr kept (a session fixture has no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_cli(module, *args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Iterator[Path]:
    """The tiny preset trained 2 steps per stage (base, then RSR): the checkpoint traces are
    recorded from and commands are tried on."""
    path = tmp_path_factory.mktemp("shared_ckpt") / "tiny.pt"
    assert train(path) == 0
    with _kept_unchanged(path.parent):
        yield path


@pytest.fixture(scope="session")
def dit_base_ckpt(tmp_path_factory) -> Iterator[Path]:
    """The dit-digits preset's base stage, 1 step: a class-conditioned checkpoint without RSR."""
    path = tmp_path_factory.mktemp("shared_dit") / "dit.pt"
    assert train(path, "--preset", "dit-digits", "--stage", "base", steps=1) == 0
    with _kept_unchanged(path.parent):
        yield path


@pytest.fixture(scope="session")
def tiny_trace(tiny_ckpt, tmp_path_factory) -> Iterator[Path]:
    """A sampling trace of `tiny_ckpt`: TRACE_PROMPTS x 2 seeds, 4 sampler steps, gate
    probabilities, 16 stored latent tokens and early-exit decodes."""
    d = tmp_path_factory.mktemp("shared_trace")
    (d / "prompts.txt").write_text(TRACE_PROMPTS)
    path = d / "run.h5"
    assert run_cli("probes.record", "--ckpt", tiny_ckpt, "--prompts", d / "prompts.txt", "--num-samples", 2,
                   "--steps", 4, "--out", path, "--probs", "--latent-tokens", 16, "--decode") == 0
    with _kept_unchanged(d):
        yield path


@pytest.fixture(scope="session")
def training_trace(tmp_path_factory) -> Iterator[Path]:
    """A training trace of the tiny preset: 4 steps of batch 3, routing (with probabilities)
    recorded on steps 2 and 4."""
    d = tmp_path_factory.mktemp("shared_training_trace")
    path = d / "train.h5"
    assert train(d / "m.pt", "--trace", path, "--trace-every", 2, "--trace-probs", steps=4, batch_size=3) == 0
    with _kept_unchanged(d):
        yield path


@pytest.fixture(scope="session")
def quick_table(tmp_path_factory) -> Iterator[CommandResult]:
    """`evaluate --table --quick`: the ablation table on the tiny preset (middle target, 2 seeds),
    its checkpoints under out/checkpoints."""
    out = tmp_path_factory.mktemp("shared_table") / "table"
    rc, stdout, stderr = _captured("rsr_model", "evaluate", "--table", "--quick", "--out", out)
    assert rc == 0, stderr[-2000:]
    with _kept_unchanged(out):
        yield CommandResult(out, stdout, stderr)


@pytest.fixture(scope="session")
def quick_class_conditioned(tmp_path_factory) -> Iterator[CommandResult]:
    """`evaluate --class-conditioned --quick`: the dit-digits quality table."""
    out = tmp_path_factory.mktemp("shared_class_conditioned") / "cc"
    rc, stdout, stderr = _captured("rsr_model", "evaluate", "--class-conditioned", "--quick", "--out", out)
    assert rc == 0, stderr[-2000:]
    with _kept_unchanged(out):
        yield CommandResult(out, stdout, stderr)


# --------------------------------------------------------------------------- the dashboard in a browser


@pytest.fixture(scope="module")
def browser(app_ctx):
    """The app of the requesting module's `app_ctx` fixture on a loopback port, and headless
    Chromium driving it: (driver, url, context). Page helpers are in tests/dashboard_page.py."""
    from .dashboard_browser import chromium, serving

    app, ctx = app_ctx
    with chromium(height=768) as driver, serving(app.server) as url:
        yield driver, url, ctx

"""The error contract every command of the project keeps, and its one argparse `Parser`.

* bad input, an unusable file or a failed write (a `UserError` or an `OSError`): one line
  `error: ...` on stderr, exit code 2, never a traceback;
* Ctrl-C (SIGINT), also while the command's imports are still loading: one line, exit code 130.

Checks that serve every command live here, so a new command reuses them rather than restating
them: argparse types for numbers (`finite_float`, `positive_int`, `int_at_least`), `read_lines`
for prompt and label files, `env_int` for launcher variables; output paths are judged by
`cli_common.outputs.check_output` before a command loads a model or takes a step.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from .errors import UsageError, UserError
from .outputs import os_error_reason
from .version import version_line


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are `UsageError`s (one `error:` line, exit 2 through `run_main`)
    instead of usage text and exit code 2 from inside argparse. `version=True` (every command's
    top-level parser) adds `--version`: the toolkit's version from the package metadata."""

    def __init__(self, *args, version: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if version:
            self.add_argument("--version", action="version", version=version_line(),
                              help="print the toolkit's version and exit")

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _interrupted_while_starting(signum, frame) -> None:
    print("error: interrupted while starting; nothing was written", file=sys.stderr)
    os._exit(130)  # mid-import: nothing to clean up, and a KeyboardInterrupt here would print a traceback


def guard_startup(module_name: str) -> None:
    """Call first thing in a command's module: until `run_main` starts, Ctrl-C ends the process
    with one line and exit code 130 (instead of a traceback from whichever import was loading).
    Does nothing when the module is imported as a library."""
    if module_name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def run_main(body: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run a command body under the error contract; returns the exit code. A `UserError` (every
    package's user-facing errors derive from it) or an OSError (unreadable file, full disk)
    becomes one `error:` line and exit 2; Ctrl-C exit 130."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, interrupts are handled below
    try:
        body()
    except (UserError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; ask for less (fewer samples, a smaller batch)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        return f"file operation failed{where}: {os_error_reason(e)}"
    return " ".join(str(e).split()) or type(e).__name__


def finite_float(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float (never nan or inf) in [low, high] (`*_open`: bound excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"expected a number {' and '.join(x for x in (lo, hi) if x)}, got {text}")
        return value
    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


positive_int = int_at_least(1)


def available_cpus() -> int:
    """CPUs this process may run on (a cluster job's share, not the node's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(text: str) -> int:
    """argparse type: a number of worker processes, 1 to the CPUs this process may use (more
    would only share them)."""
    value = positive_int(text)
    if value > available_cpus():
        raise argparse.ArgumentTypeError(f"{value} workers: this process may use {available_cpus()} CPUs; "
                                         "more workers than that only share them")
    return value


def read_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a text file (prompts, labels); UsageError if unreadable or empty."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {type(e).__name__}") from None
    if not lines:
        raise UsageError(f"{path} is empty")
    return lines


def env_int(name: str, default: int) -> int:
    """An integer environment variable (e.g. RANK set by a launcher); UsageError if it is not one."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None

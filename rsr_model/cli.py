"""What every command line of the project shares: bad input ends in one `error:` line on
stderr and exit code 2, never a traceback; Ctrl-C ends with exit code 130 (`run_main`).

Checks that serve every command live here, so a new command reuses them rather than
restating them: argparse types for numbers (`finite_float`, `positive_int`, `int_at_least`)
and, from `traces.outputs`, `check_output` / `check_free_space` for output paths, which a
command calls before it loads a model or takes a step.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from pathlib import Path
from typing import Callable

from traces.cli import guard_startup, run_command
from traces.errors import UserError
from traces.outputs import OutputError, check_free_space, check_output, write_atomic

__all__ = ["Parser", "UsageError", "OutputError", "run_main", "guard_startup", "finite_float", "positive_int",
           "int_at_least", "check_output", "check_free_space", "write_atomic", "read_lines", "env_int", "sha256_file"]


class UsageError(UserError):
    """Bad command-line input; the message is the one line the user sees."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def run_main(body: Callable[[], None], interrupted: str = "interrupted") -> int:
    """Run a command: a `UserError` (every package's user-facing errors derive from it) or an
    OSError (unreadable file, full disk) becomes one `error:` line and exit 2; Ctrl-C exit 130."""
    return run_command(body, interrupted)


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


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

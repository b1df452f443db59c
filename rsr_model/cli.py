"""What every command line of the project shares: bad input ends in one `error:` line on
stderr and exit code 2, never a traceback; Ctrl-C ends with exit code 130."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Callable

from traces.errors import UserError


class UsageError(UserError):
    """Bad command-line input; the message is the one line the user sees."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def run_main(body: Callable[[], None], interrupted: str = "interrupted") -> int:
    """Run a command: a `UserError` (every package's user-facing errors derive from it) or an
    OSError (unreadable file, full disk) becomes one `error:` line and exit 2."""
    try:
        body()
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return 0


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

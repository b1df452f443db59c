"""Command-line plumbing of the `traces` commands (`python -m traces join|convert`).

traces depends on numpy and h5py only, so it does not borrow rsr_model.cli: the same rules,
restated here: bad input is one `error:` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import TraceError, UserError


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are TraceErrors (one line, exit 2 through `run`)."""

    def error(self, message: str):
        raise TraceError(f"{self.prog}: {message}")


def run(body: Callable[[], str]) -> int:
    """Run a command body; print what it returns, or its user error as one `error:` line."""
    try:
        message = body()
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(message)
    return 0

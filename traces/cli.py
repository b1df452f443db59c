"""The error contract every command line of the project keeps, and the `traces` commands' parser.

* bad input, an unusable file or a failed write (a `UserError` or an `OSError`): one line
  `error: ...` on stderr, exit code 2, never a traceback;
* Ctrl-C (SIGINT), also while the command's imports are still loading: one line, exit code 130.

traces depends on numpy and h5py only, so this module needs nothing but the standard library;
`rsr_model.cli.run_main` is `run_command` with the project's other shared checks beside it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable

from .errors import TraceError, UserError
from .outputs import os_error_reason


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are TraceErrors (one line, exit 2 through `run`)."""

    def error(self, message: str):
        raise TraceError(f"{self.prog}: {message}")


def _interrupted_while_starting(signum, frame) -> None:
    print("error: interrupted while starting; nothing was written", file=sys.stderr)
    os._exit(130)  # mid-import: nothing to clean up, and a KeyboardInterrupt here would print a traceback


def guard_startup(module_name: str) -> None:
    """Call first thing in a command's `__main__` module: until `run_command` starts, Ctrl-C
    ends the process with one line and exit code 130 (instead of a traceback from whichever
    import was loading). Does nothing when the module is imported as a library."""
    if module_name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def run_command(body: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run a command body under the error contract; returns the exit code."""
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


def run(body: Callable[[], str]) -> int:
    """Run a `traces` command body; print what it returns, or its error as one `error:` line."""
    return run_command(lambda: print(body()))


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        return f"file operation failed{where}: {os_error_reason(e)}"
    return " ".join(str(e).split()) or type(e).__name__

"""The project's base class of user errors, and the one exception type of the trace package.

`UserError` is what every package raises for a failure the user can fix (bad flag, wrong
file, old checkpoint, empty selection); every command line prints it as one `error:` line
and exits 2 (`rsr_model.cli.run_main`). It lives here because `traces` is the one package
every other one imports and it needs nothing but the standard library for this.

Every failure a user can cause with a trace (wrong file, old file, bad selection, bad write)
raises `TraceError` with a one-line message.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; the message is the one line a command prints."""


class TraceError(UserError):
    """A trace file or a request against it is invalid; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

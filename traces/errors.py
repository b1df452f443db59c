"""The one exception type of the trace package.

Every failure a user can cause with a trace (wrong file, old file, bad selection, bad write)
raises `TraceError` with a one-line message; it is a `cli_common.errors.UserError`, so every
command prints it as one `error:` line and exits 2.
"""

from __future__ import annotations

from cli_common.errors import UserError


class TraceError(UserError):
    """A trace file or a request against it is invalid; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

"""The one exception type of the trace package.

Every failure a user can cause (wrong file, old file, bad selection, bad write) raises
`TraceError` with a one-line message, so command-line tools can print it and exit 2
without a traceback.
"""

from __future__ import annotations


class TraceError(Exception):
    """A trace file or a request against it is invalid; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

"""The project's base class of user errors and its command-line kinds.

Every package raises a `UserError` (or a subclass: `traces.TraceError`, `rsr_model.ConfigError`,
...) for a failure the user can fix: a bad flag, a wrong file, an old checkpoint, an empty
selection. Every command prints it as one `error:` line and exits 2 (`cli_common.command.run_main`).
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; the message is the one line a command prints."""


class UsageError(UserError):
    """Bad command-line input; the message is the one line the user sees."""


class OutputError(UserError):
    """An output path that cannot be written, or a disk too small for it; one line."""

"""The toolkit's version, read once from the installed package's metadata: what `--version` of
every command prints, and the `toolkit_version` stored in every trace, checkpoint and report, so
a file says which toolkit wrote it."""

from __future__ import annotations

import functools
from importlib import metadata

DISTRIBUTION = "thinking-pixel"  # [project] name in pyproject.toml
UNKNOWN = "0+unknown"  # a source tree that was never installed: a PEP 440 version that sorts below any release


@functools.cache
def toolkit_version() -> str:
    """The installed `thinking-pixel` version (e.g. "0.1.0"), or "0+unknown" when the code runs
    from a folder that pip never installed (no metadata to read)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def version_line() -> str:
    """What `--version` prints: the distribution and its version, whichever command asks."""
    return f"{DISTRIBUTION} {toolkit_version()}"

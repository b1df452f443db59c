"""`python -m traces COMMAND ...`: `join` rank files, `convert` compression (see each --help)."""

from __future__ import annotations

import sys

from cli_common.command import guard_startup
from cli_common.version import version_line

guard_startup(__name__)  # before h5py loads: Ctrl-C while it does exits 130 with one line

from . import convert, join

COMMANDS = {"join": join.main, "convert": convert.main}


USAGE = """usage: python -m traces {join,convert} ...

  join     join the rank files of one recording into one trace (virtual datasets)
  convert  re-compress a trace (--portable: gzip, readable without hdf5plugin)

`python -m traces COMMAND --help` describes a command."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(version_line())
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        got = f"got {argv[0]!r}" if argv else "got none"
        print(f"error: python -m traces: expected a command, one of {', '.join(COMMANDS)} ({got}; --help lists them)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

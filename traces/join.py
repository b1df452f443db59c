"""Join rank files: `python -m traces join OUT.h5 RANK0.h5 RANK1.h5 ... [--overwrite]`.

Only the ranks 0..W-1 of one recording join (same run id, checkpoint and command line).

The joined file maps every growing dataset onto the rank files through HDF5 virtual
datasets: keep the rank files where they are relative to it (move the folder as a whole);
reading it refuses missing or replaced rank files. Join after the recording ends (a rank
still being written is refused). OUT may be none of the rank files (symlinks resolved), even
with --overwrite. Bad input: one `error:` line, exit code 2.
"""

from __future__ import annotations

import sys

from cli_common.command import Parser, run_main

from .vds import join_ranks


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m traces join", description=__doc__.splitlines()[0], version=True)
    ap.add_argument("out", metavar="OUT", help="the joined trace to write (refused if it is one of the rank files)")
    ap.add_argument("ranks", nargs="+", metavar="RANK",
                    help="rank files 0..W-1 of one finished recording; keep them where they are relative to OUT")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT (never a rank file)")

    def body() -> str:
        args = ap.parse_args(argv)
        path = join_ranks(args.ranks, args.out, overwrite=args.overwrite)
        return f"wrote {path} (virtual datasets over {len(args.ranks)} rank file(s))"

    return run_main(lambda: print(body()))


if __name__ == "__main__":
    sys.exit(main())

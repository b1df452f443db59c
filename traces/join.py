"""Join rank files: `python -m traces join OUT.h5 RANK0.h5 RANK1.h5 ... [--overwrite]`.

Only the ranks 0..W-1 of one recording join (same run id, checkpoint and command line).

The joined file maps every growing dataset onto the rank files through HDF5 virtual
datasets, so keep the rank files beside it. Bad input: one `error:` line, exit code 2.
"""

from __future__ import annotations

import os
import sys

from cli_common.command import Parser, run_main
from cli_common.outputs import check_output

from .errors import TraceError
from .vds import join_ranks


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m traces join", description=__doc__.splitlines()[0], version=True)
    ap.add_argument("out")
    ap.add_argument("ranks", nargs="+")
    ap.add_argument("--overwrite", action="store_true")

    def body() -> str:
        args = ap.parse_args(argv)
        if any(os.path.abspath(args.out) == os.path.abspath(r) for r in args.ranks):
            raise TraceError(f"{args.out} is also a rank file; the joined trace needs a new path")
        check_output(args.out, args.overwrite, flag="OUT")
        path = join_ranks(args.ranks, args.out, overwrite=args.overwrite)
        return f"wrote {path} (virtual datasets over {len(args.ranks)} rank file(s))"

    return run_main(lambda: print(body()))


if __name__ == "__main__":
    sys.exit(main())

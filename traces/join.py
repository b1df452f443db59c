"""Join rank files: `python -m traces.join OUT.h5 RANK0.h5 RANK1.h5 ... [--overwrite]`.

The joined file maps every growing dataset onto the rank files through HDF5 virtual
datasets, so keep the rank files beside it. Bad input: one `error:` line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import TraceError, UserError
from .vds import join_ranks


class _Parser(argparse.ArgumentParser):
    # traces depends on numpy and h5py only, so it does not borrow rsr_model.cli's parser
    def error(self, message: str):
        raise TraceError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="python -m traces.join", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("ranks", nargs="+")
    ap.add_argument("--overwrite", action="store_true")
    try:
        args = ap.parse_args(argv)
        if args.out in args.ranks:
            raise TraceError(f"{args.out} is also a rank file; the joined trace needs a new path")
        path = join_ranks(args.ranks, args.out, overwrite=args.overwrite)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (virtual datasets over {len(args.ranks)} rank file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

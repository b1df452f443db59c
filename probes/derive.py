"""`python -m probes.derive TRACE`: store PCA/UMAP projections of latents under /derived (see probes.projections)."""

import sys

from cli_common.command import guard_startup

guard_startup(__name__)  # before the projections' imports: Ctrl-C while they load exits 130 with one line

from .projections import main

if __name__ == "__main__":
    sys.exit(main())

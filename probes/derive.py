"""`python -m probes.derive TRACE`: store PCA/UMAP projections of latents under /derived (see probes.projections)."""

import sys

from .projections import main

if __name__ == "__main__":
    sys.exit(main())

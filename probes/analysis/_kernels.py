"""The numba kernels of `probes.analysis.compiled` (imported only through it). Ids are clipped
(every invalid id is the extra slot K), so each is an index into the tables as they are."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def pair_counts(first: np.ndarray, second: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """out[layer, step, first id, second id] += 1 per token; first, second (L, S', N), out (L, S, K+1, K+1)
    int64 with S >= S' (the rows of ChunkTables.pairs)."""
    n_layers, n_steps, n_tokens = first.shape
    for layer in range(n_layers):
        for step in range(n_steps):
            a, b = first[layer, step], second[layer, step]
            for token in range(n_tokens):
                out[layer, step, a[token], b[token]] += 1

"""UMAP projection (kept apart from test_probe_stats: numba compilation costs ~10 s)."""

from __future__ import annotations

import numpy as np

from probes.stats import umap_embedding


def test_umap_separates_planted_clusters_and_records_params():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (3, 80))
    y = np.repeat(np.arange(3), 100)
    X = (centers[y] + rng.normal(size=(300, 80))).astype(np.float32)
    p = umap_embedding(X, n_neighbors=10, seed=0, pca_dims=20, n_epochs=100)
    assert p.coords.shape == (300, 2) and p.coords.dtype == np.float32
    assert p.params["pca_dims"] == 20 and p.params["n_neighbors"] == 10 and p.params["seed"] == 0
    # every point is nearer to its own cluster's centroid in the embedding
    cent = np.stack([p.coords[y == c].mean(0) for c in range(3)])
    nearest = np.argmin(((p.coords[:, None] - cent[None]) ** 2).sum(-1), axis=1)
    assert (nearest == y).mean() > 0.99

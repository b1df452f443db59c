"""Low-dimensional projections of latents (PCA, UMAP) with the parameters used.

Each function returns a :class:`Projection`: the coordinates plus a flat
``params`` dict (JSON/HDF5-attribute friendly) recording method, seed, sizes and
library versions, so the projection can be stored in the trace under
``/derived`` and never recomputed by the dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sklearn
from sklearn.decomposition import PCA, IncrementalPCA


@dataclass
class Projection:
    """coords: (n, n_components) float32; params: settings used;
    components / mean: the linear map (PCA only) so new points can be projected as
    ``(x - mean) @ components.T``; explained_variance_ratio: per component (PCA only)."""

    coords: np.ndarray
    params: dict
    components: np.ndarray | None = None
    mean: np.ndarray | None = None
    explained_variance_ratio: np.ndarray | None = field(default=None)


def pca(
    X: np.ndarray,
    n_components: int = 50,
    method: str = "randomized",
    seed: int = 0,
    batch_size: int = 10000,
) -> Projection:
    """PCA of ``X`` (n, d).

    ``method``: ``"randomized"`` (Halko et al. randomized SVD; the fast choice for
    100k x 1536, n_components << d), ``"full"`` (exact LAPACK SVD) or
    ``"incremental"`` (IncrementalPCA in batches of ``batch_size``, memory
    O(batch x d), for data that does not fit at once — pass a memory-mapped array).
    """
    X = np.asarray(X) if method != "incremental" else X
    n, d = X.shape
    k = int(min(n_components, n, d))
    if method == "incremental":
        model = IncrementalPCA(n_components=k, batch_size=batch_size)
        for start in range(0, n, batch_size):
            model.partial_fit(np.asarray(X[start : start + batch_size], dtype=np.float32))
        coords = np.concatenate(
            [model.transform(np.asarray(X[s : s + batch_size], dtype=np.float32)) for s in range(0, n, batch_size)]
        )
    elif method in ("randomized", "full"):
        model = PCA(n_components=k, svd_solver=method, random_state=seed)
        coords = model.fit_transform(X)
    else:
        raise ValueError(f"unknown PCA method {method!r}")
    params = {
        "method": "pca",
        "solver": method,
        "n_components": k,
        "seed": int(seed),
        "n_samples": int(n),
        "n_features": int(d),
        "explained_variance_total": float(np.sum(model.explained_variance_ratio_)),
        "sklearn_version": sklearn.__version__,
    }
    if method == "incremental":
        params["batch_size"] = int(batch_size)
    return Projection(
        coords=np.asarray(coords, dtype=np.float32),
        params=params,
        components=np.asarray(model.components_, dtype=np.float32),
        mean=np.asarray(model.mean_, dtype=np.float32),
        explained_variance_ratio=np.asarray(model.explained_variance_ratio_),
    )


def umap_embedding(
    X: np.ndarray,
    n_components: int = 2,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "euclidean",
    seed: int | None = 0,
    pca_dims: int | None = 50,
    n_epochs: int | None = None,
) -> Projection:
    """UMAP embedding of ``X`` (n, d), optionally after a PCA to ``pca_dims``.

    Reducing 1536-dim latents to 50 PCA dimensions first is the usual practice:
    the neighbour graph is nearly unchanged and the nearest-neighbour search is
    ~30x cheaper.  ``seed`` makes the result reproducible but forces umap-learn to
    a single thread; ``seed=None`` uses all cores (non-deterministic).
    """
    import umap  # imported lazily: numba start-up costs seconds

    X = np.asarray(X, dtype=np.float32)
    n, d = X.shape
    pre = None
    if pca_dims is not None and d > pca_dims:
        pre = pca(X, n_components=pca_dims, seed=0 if seed is None else seed)
        Z = pre.coords
    else:
        Z = X
    model = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        n_epochs=n_epochs,
        low_memory=True,
    )
    coords = model.fit_transform(Z)
    params = {
        "method": "umap",
        "n_components": int(n_components),
        "n_neighbors": int(n_neighbors),
        "min_dist": float(min_dist),
        "metric": metric,
        "seed": -1 if seed is None else int(seed),
        "n_epochs": -1 if n_epochs is None else int(n_epochs),
        "pca_dims": int(pre.params["n_components"]) if pre is not None else 0,
        "n_samples": int(n),
        "n_features": int(d),
        "umap_version": umap.__version__,
    }
    return Projection(coords=np.asarray(coords, dtype=np.float32), params=params)

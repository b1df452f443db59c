"""Linear decodability of a label from latent vectors.

A cross-validated multinomial logistic regression (standardised features,
stratified k-fold) predicts a discrete label (timestep bin, recursion step,
expert, prompt attribute) from latents.  Held-out accuracy is reported against

* ``baseline``: the same pipeline trained on *shuffled* labels (what the probe
  gets from dimensionality and class imbalance alone), and
* ``chance``: the majority-class share.

A probe well above its shuffled baseline means the label is linearly present in
the representation (cf. Huginn's ``classify_loops`` for the recursion step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from .running import ArrayResult


@dataclass
class ProbeResult(ArrayResult):
    """accuracy: mean held-out accuracy over folds; accuracy_std: its std over folds;
    baseline: mean accuracy with shuffled labels; chance: majority-class share;
    fold_accuracy: per fold; n, n_classes, n_splits, C: setup."""

    accuracy: float
    accuracy_std: float
    baseline: float
    chance: float
    fold_accuracy: list
    n: int
    n_classes: int
    n_splits: int
    C: float


def _stratified_subsample(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-proportional random subsample of size ~n."""
    idx = []
    classes, counts = np.unique(y, return_counts=True)
    for c, k in zip(classes, counts):
        take = max(1, int(round(n * k / len(y))))
        idx.append(rng.choice(np.flatnonzero(y == c), size=min(take, k), replace=False))
    return np.sort(np.concatenate(idx))


def linear_probe(
    X: np.ndarray,
    y: np.ndarray,
    n_splits: int = 5,
    C: float = 1.0,
    max_samples: int | None = 20000,
    n_shuffles: int = 1,
    seed: int = 0,
    max_iter: int = 500,
) -> ProbeResult:
    """Cross-validated linear-probe accuracy of ``y`` from ``X`` (n, d), with shuffled baseline.

    ``max_samples`` caps the sample (stratified subsample) to bound the cost;
    ``n_shuffles`` label shuffles are averaged for the baseline.
    """
    rng = np.random.default_rng(seed)
    X = np.asarray(X)
    y = np.asarray(y)
    if max_samples is not None and len(y) > max_samples:
        keep = _stratified_subsample(y, max_samples, rng)
        X, y = X[keep], y[keep]
    classes, counts = np.unique(y, return_counts=True)
    n_splits = int(min(n_splits, counts.min()))
    if len(classes) < 2 or n_splits < 2:
        raise ValueError("need at least 2 classes with at least 2 samples each")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    # One BLAS thread: with torch's OpenMP pool loaded in the same process, OpenBLAS threads
    # contend for the cores and a 2k x 128 probe takes ~17 s instead of ~0.08 s (2 cores).
    # These problems are small, so a single thread is also the fastest choice without torch.
    with threadpool_limits(1):
        scores = cross_val_score(model, X, y, cv=cv)
        base = [cross_val_score(model, X, rng.permutation(y), cv=cv).mean() for _ in range(n_shuffles)]
    return ProbeResult(
        accuracy=float(scores.mean()),
        accuracy_std=float(scores.std()),
        baseline=float(np.mean(base)),
        chance=float(counts.max() / counts.sum()),
        fold_accuracy=[float(s) for s in scores],
        n=int(len(y)),
        n_classes=int(len(classes)),
        n_splits=n_splits,
        C=float(C),
    )

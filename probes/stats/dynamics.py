"""Latent dynamics across recursion steps: convergence, orbits and drift.

Input: latents ``h`` of shape ``(..., L, D)`` (one trajectory of ``L`` recursion
steps per token).  With steps ``delta_l = h_{l+1} - h_l`` (``l = 0..L-2``):

* distance to the last step ``||h_l - h_{L-1}||`` (Huginn's ``||x - x*||`` heatmap);
* relative step size ``||delta_l|| / ||h_l||`` (Huginn's latent-diff exit criterion);
* step cosine ``cos(delta_l, delta_{l+1})``: 1 = moving straight, < 1 = turning;
  successive steps becoming orthogonal is the signature reported by the
  two-scale-dynamics work (arXiv 2509.23314);
* contraction ratio ``||delta_{l+1}|| / ||delta_l||`` and its trajectory-level
  estimate ``rho = exp(slope)`` of the least-squares fit of ``log ||delta_l||``
  against ``l``.  For a linear map ``s_{l+1} = s* + rho R (s_l - s*)`` with ``R`` a
  rotation, ``||delta_l|| = rho^l ||delta_0||`` exactly, so the log-slope is
  ``log rho`` and the step cosine is ``cos(theta)``.

Classification of a trajectory (thresholds are keyword arguments):

* ``fixed_point``: ``rho < 1 - rho_tol`` (default 0.95), i.e. steps shrink by
  more than 5 % per step, or all steps are negligible (``||delta|| <= eps *
  ||h||``, already converged);
* ``drift``: ``rho > 1 + rho_tol`` (growing steps), or ``|rho - 1| <= rho_tol``
  and mean step cosine ``>= cos_drift`` (default 0.98, i.e. turning by less than
  ~11 degrees per step: a "slider" moving along a direction);
* ``orbit``: ``|rho - 1| <= rho_tol`` and mean step cosine ``< cos_drift``:
  steps keep their size but turn (rotation without convergence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .running import ArrayResult, GroupedSums, Stat, safe_div

TRAJECTORY_LABELS: tuple[str, ...] = ("fixed_point", "orbit", "drift")
FIXED_POINT, ORBIT, DRIFT = 0, 1, 2


@dataclass
class ConvergenceMetrics(ArrayResult):
    """Per-trajectory metrics; leading shape ``(...)`` of the latents.

    dist_to_last: (..., L)    ||h_l - h_{L-1}||
    rel_step:     (..., L-1)  ||delta_l|| / ||h_l||
    step_cos:     (..., L-2)  cos(delta_l, delta_{l+1})
    contraction:  (..., L-2)  ||delta_{l+1}|| / ||delta_l||
    rho:          (...)       exp(log-slope of ||delta_l|| over l)
    mean_cos:     (...)       mean step cosine over the trajectory
    label:        (...)       0 fixed_point, 1 orbit, 2 drift (see TRAJECTORY_LABELS)
    """

    dist_to_last: np.ndarray
    rel_step: np.ndarray
    step_cos: np.ndarray
    contraction: np.ndarray
    rho: np.ndarray
    mean_cos: np.ndarray
    label: np.ndarray


def log_slope_rho(step_norms: np.ndarray, floor: float = 1e-30) -> np.ndarray:
    """``rho = exp(b)`` where ``b`` is the least-squares slope of ``log ||delta_l||`` on ``l``.

    ``step_norms`` has shape ``(..., L-1)``; slope ``b = sum (l - lbar)(y_l - ybar) /
    sum (l - lbar)^2`` with ``y_l = log max(||delta_l||, floor)``.
    """
    s = np.asarray(step_norms, dtype=np.float64)
    n = s.shape[-1]
    if n < 2:
        return np.full(s.shape[:-1], np.nan)
    y = np.log(np.maximum(s, floor))
    x = np.arange(n, dtype=np.float64)
    xc = x - x.mean()
    slope = ((y - y.mean(axis=-1, keepdims=True)) * xc).sum(axis=-1) / (xc**2).sum()
    return np.exp(slope)


def classify_trajectories(
    rho: np.ndarray,
    mean_cos: np.ndarray,
    converged: np.ndarray | None = None,
    rho_tol: float = 0.05,
    cos_drift: float = 0.98,
) -> np.ndarray:
    """Label trajectories 0 fixed_point / 1 orbit / 2 drift from rho and mean step cosine.

    See the module docstring for the rule.  ``converged`` (bool) forces fixed_point.
    """
    rho = np.asarray(rho, dtype=np.float64)
    c = np.asarray(mean_cos, dtype=np.float64)
    label = np.full(rho.shape, ORBIT, dtype=np.int8)
    near_one = np.abs(rho - 1.0) <= rho_tol
    label[near_one & (c >= cos_drift)] = DRIFT
    label[rho > 1.0 + rho_tol] = DRIFT
    label[rho < 1.0 - rho_tol] = FIXED_POINT
    if converged is not None:
        label[np.asarray(converged, dtype=bool)] = FIXED_POINT
    return label


def convergence_metrics(
    latents: np.ndarray, rho_tol: float = 0.05, cos_drift: float = 0.98, eps: float = 1e-6
) -> ConvergenceMetrics:
    """Convergence metrics and trajectory labels for latents ``(..., L, D)`` (needs ``L >= 3``)."""
    h = np.asarray(latents, dtype=np.float64)
    if h.shape[-2] < 3:
        raise ValueError("need at least 3 recursion steps")
    delta = np.diff(h, axis=-2)  # (..., L-1, D)
    dn = np.linalg.norm(delta, axis=-1)  # ||delta_l||
    hn = np.linalg.norm(h, axis=-1)  # ||h_l||
    dist_last = np.linalg.norm(h - h[..., -1:, :], axis=-1)
    rel = safe_div(dn, hn[..., :-1])
    dot = np.sum(delta[..., 1:, :] * delta[..., :-1, :], axis=-1)
    cos = safe_div(dot, dn[..., 1:] * dn[..., :-1])
    contr = safe_div(dn[..., 1:], dn[..., :-1])
    rho = log_slope_rho(dn)
    ok = np.isfinite(cos)
    mean_cos = safe_div(np.where(ok, cos, 0.0).sum(axis=-1), ok.sum(axis=-1))
    scale = np.maximum(hn.max(axis=-1), 1e-300)
    converged = dn.max(axis=-1) <= eps * scale
    mean_cos = np.where(converged, np.nan, mean_cos)
    label = classify_trajectories(rho, np.nan_to_num(mean_cos, nan=0.0), converged, rho_tol, cos_drift)
    return ConvergenceMetrics(dist_last, rel, cos, contr, rho, mean_cos, label)


@dataclass
class ConvergenceSummary(ArrayResult):
    """Group means of the per-step metrics and label shares (group shape + step axis)."""

    dist_to_last: np.ndarray
    rel_step: np.ndarray
    step_cos: np.ndarray
    contraction: np.ndarray
    log_rho_mean: np.ndarray
    label_share: np.ndarray  # group + (3,), order TRAJECTORY_LABELS
    n: np.ndarray


class ConvergenceAccumulator(Stat):
    """Streaming means of the convergence metrics per recursion step, per group.

    ``update(latents, *groups)`` with latents ``(..., L, D)``; group arrays broadcast
    to ``(...)``.  Non-finite values (e.g. cosines of zero steps) are counted as 0
    contribution, so prefer it on trajectories that have not converged exactly.
    """

    def __init__(self, n_steps: int, group_shape: Sequence[int] = (), **classify_kw: float) -> None:
        self.L = int(n_steps)
        self.kw = classify_kw
        width = self.L + (self.L - 1) + 2 * (self.L - 2) + 1 + len(TRAJECTORY_LABELS)
        self._sums = GroupedSums(width, group_shape)

    def update(self, latents: np.ndarray, *groups: np.ndarray | int) -> None:
        m = convergence_metrics(latents, **self.kw)
        onehot = (m.label[..., None] == np.arange(len(TRAJECTORY_LABELS))).astype(np.float64)
        cols = np.concatenate(
            [m.dist_to_last, m.rel_step, m.step_cos, m.contraction, np.log(m.rho)[..., None], onehot], axis=-1
        )
        self._sums.update(np.nan_to_num(cols, nan=0.0, posinf=0.0, neginf=0.0), groups)

    def result(self) -> ConvergenceSummary:
        mean = self._sums.mean()
        _, n = self._sums.result()
        L = self.L
        i = np.cumsum([0, L, L - 1, L - 2, L - 2, 1, len(TRAJECTORY_LABELS)])
        return ConvergenceSummary(
            dist_to_last=mean[..., i[0] : i[1]],
            rel_step=mean[..., i[1] : i[2]],
            step_cos=mean[..., i[2] : i[3]],
            contraction=mean[..., i[3] : i[4]],
            log_rho_mean=mean[..., i[4]],
            label_share=mean[..., i[5] : i[6]],
            n=n,
        )

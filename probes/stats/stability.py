"""Routing stability: do two routings of the same tokens pick the same experts?

The two routings can differ in seed (noise draw), adjacent diffusion timesteps,
guidance branch (conditional vs unconditional), or training checkpoint (OLMoE's
"router saturation").  From the joint table ``C[i, j] = #{e^a = i, e^b = j}``:

* agreement ``p_o = sum_i C[i, i] / N``;
* chance agreement ``p_e = sum_k p^a_k p^b_k`` (independent choices with the
  observed shares);
* Cohen's kappa ``(p_o - p_e) / (1 - p_e)``: 1 identical, 0 no better than chance.
  Kappa corrects for imbalance: two collapsed routers agree trivially.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .running import ArrayResult, GroupedCounts, Stat, safe_div


@dataclass
class AgreementStats(ArrayResult):
    """Per-group agreement statistics (``confusion`` adds ``(K, K)``)."""

    agreement: np.ndarray
    chance: np.ndarray
    kappa: np.ndarray
    confusion: np.ndarray
    n: np.ndarray


def agreement_vs_chance(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, observed, chance)`` from joint counts ``(..., K, K)`` of two choices a and b:
    n records, observed = share with a == b (the table's trace), chance = ``sum_k p^a_k p^b_k``
    (independent choices with the observed shares). The one definition behind both the
    agreement of two routings (kappa) and the persistence of a transition (lift)."""
    c = np.asarray(joint, dtype=np.float64)
    n = c.sum(axis=(-2, -1))
    observed = safe_div(np.trace(c, axis1=-2, axis2=-1), n)
    pa = safe_div(c.sum(axis=-1), n[..., None])
    pb = safe_div(c.sum(axis=-2), n[..., None])
    return n, observed, np.sum(pa * pb, axis=-1)


def agreement_stats(confusion: np.ndarray) -> AgreementStats:
    """Agreement, chance agreement and Cohen's kappa from joint counts ``(..., K, K)``."""
    c = np.asarray(confusion, dtype=np.float64)
    n, po, pe = agreement_vs_chance(c)
    return AgreementStats(
        agreement=po, chance=pe, kappa=safe_div(po - pe, 1.0 - pe), confusion=c.astype(np.int64), n=n.astype(np.int64)
    )


def routing_agreement(ids_a: np.ndarray, ids_b: np.ndarray, n_experts: int) -> AgreementStats:
    """One-shot agreement between two routings (arrays of the same shape)."""
    acc = AgreementAccumulator(n_experts)
    acc.update(ids_a, ids_b)
    return acc.result()


class AgreementAccumulator(Stat):
    """Streaming confusion table between two routings, optionally per group."""

    def __init__(self, n_experts: int, group_shape: Sequence[int] = ()) -> None:
        self.counts = GroupedCounts((n_experts, n_experts), group_shape)

    def update(self, ids_a: np.ndarray, ids_b: np.ndarray, *groups: np.ndarray | int) -> None:
        self.counts.update([ids_a, ids_b], groups)

    def add_counts(self, counts: np.ndarray, at: tuple | None = None) -> None:
        """Fold in pre-counted confusion tables (see :meth:`GroupedCounts.add_counts`)."""
        self.counts.add_counts(counts, at)

    def result(self) -> AgreementStats:
        return agreement_stats(self.counts.result())

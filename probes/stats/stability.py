"""Routing stability: do two routings of the same tokens pick the same experts?

The two routings can differ in seed (noise draw), adjacent diffusion timesteps,
guidance branch (conditional vs unconditional), or training checkpoint (OLMoE's
"router saturation").  From the joint table ``C[i, j] = #{e^a = i, e^b = j}``:

* agreement ``p_o = sum_i C[i, i] / N``;
* chance agreement ``p_e = sum_k p^a_k p^b_k`` (independent choices with the
  observed shares);
* Cohen's kappa ``(p_o - p_e) / (1 - p_e)``: 1 identical, 0 no better than chance.
  Kappa corrects for imbalance: two collapsed routers agree trivially.

All three read only the table's trace and its two margins, so a stream that already has
each routing's expert counts needs one equality count per token, not a K x K table
(`AgreementCounts`, `agreement_from_counts`); the same figures as from the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .running import ArrayResult, GroupedCounts, Stat, safe_div


@dataclass
class AgreementStats(ArrayResult):
    """Per-group agreement statistics (``confusion`` adds ``(K, K)``)."""

    agreement: np.ndarray
    chance: np.ndarray
    kappa: np.ndarray
    confusion: np.ndarray | None  # None when counted from the trace and margins alone
    n: np.ndarray


def agreement_vs_chance(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, observed, chance)`` from joint counts ``(..., K, K)`` of two choices a and b:
    n records, observed = share with a == b (the table's trace), chance = ``sum_k p^a_k p^b_k``
    (independent choices with the observed shares). The one definition behind both the
    agreement of two routings (kappa) and the persistence of a transition (lift)."""
    return _vs_chance(*joint_margins(np.asarray(joint, dtype=np.float64)))


def joint_margins(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What agreement reads of a joint table (..., K, K) of two choices a and b: the records
    with a == b (its trace) and the counts of a and of b (its row and column sums)."""
    return np.trace(joint, axis1=-2, axis2=-1), joint.sum(axis=-1), joint.sum(axis=-2)


def _vs_chance(same: np.ndarray, count_a: np.ndarray, count_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, observed, chance)`` from the records with a == b and the two margins (..., K)."""
    same, count_a, count_b = (np.asarray(x, dtype=np.float64) for x in (same, count_a, count_b))
    n = count_a.sum(axis=-1)
    pa = safe_div(count_a, n[..., None])
    pb = safe_div(count_b, n[..., None])
    return n, safe_div(same, n), np.sum(pa * pb, axis=-1)


def agreement_stats(confusion: np.ndarray) -> AgreementStats:
    """Agreement, chance agreement and Cohen's kappa from joint counts ``(..., K, K)``."""
    c = np.asarray(confusion, dtype=np.float64)
    return replace(agreement_from_counts(*joint_margins(c)), confusion=c.astype(np.int64))


def agreement_from_counts(same: np.ndarray, count_a: np.ndarray, count_b: np.ndarray) -> AgreementStats:
    """`agreement_stats` from the joint table's trace ``same`` (...) and margins ``count_a``,
    ``count_b`` (..., K): the counts of each routing over the pairs counted (no confusion)."""
    n, po, pe = _vs_chance(same, count_a, count_b)
    return AgreementStats(agreement=po, chance=pe, kappa=safe_div(po - pe, 1.0 - pe), confusion=None,
                          n=n.astype(np.int64))


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


class AgreementCounts(Stat):
    """Streaming agreement per group from what kappa reads: the pairs with the same expert
    (``same``, group shape) and each routing's expert counts over the pairs (``first``,
    ``second``: group shape + (K,)). `add(same, first, second, at)` folds in one block of the
    group grid (``at`` as `GroupedCounts.add_counts`); `add_table` a joint table (K, K)."""

    def __init__(self, n_experts: int, group_shape: Sequence[int] = ()) -> None:
        shape = tuple(int(g) for g in group_shape)
        self.same = np.zeros(shape, np.int64)
        self.first = np.zeros(shape + (int(n_experts),), np.int64)
        self.second = np.zeros(shape + (int(n_experts),), np.int64)

    def add(self, same: np.ndarray, first: np.ndarray, second: np.ndarray, at: tuple = ()) -> None:
        self.same[at] += same
        self.first[at] += first
        self.second[at] += second

    def add_table(self, joint: np.ndarray, at: tuple = ()) -> None:
        """Fold in joint counts (..., K, K) of (first, second)."""
        self.add(*joint_margins(joint), at)

    def update(self, *args, **kwargs) -> None:  # the Stat contract's name for folding in a chunk
        self.add(*args, **kwargs)

    def result(self) -> AgreementStats:
        return agreement_from_counts(self.same, self.first, self.second)

    def summed(self, axes: tuple[int, ...]) -> AgreementStats:
        """The statistics with the group axes ``axes`` pooled (counts summed)."""
        return agreement_from_counts(self.same.sum(axis=axes), self.first.sum(axis=axes),
                                     self.second.sum(axis=axes))

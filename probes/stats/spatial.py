"""Spatial coherence of routing: do neighbouring image patches share an expert?

Vision tokens lie on an ``h x w`` grid.  Over all 4-neighbour pairs (horizontal
``(r, c)-(r, c+1)`` and vertical ``(r, c)-(r+1, c)``; there are
``h (w-1) + (h-1) w`` per map) we count the share routed to the same expert,

    same = #{pairs with e_a = e_b} / #pairs,

and compare it with the chance level ``sum_k p_k^2`` (``p`` = expert shares in the
same group), the same-expert probability of two tokens drawn independently.
``same > chance`` means experts own contiguous regions (objects, background);
``same < chance`` means alternating (checkerboard-like) routing.  The
chance-corrected score ``(same - chance) / (1 - chance)`` is a kappa: 1 for
constant maps, 0 at chance, negative for anti-coherence.  This is the 2-D
analogue of Mixtral's consecutive-token same-expert rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .running import ArrayResult, GroupedCounts, GroupedSums, Stat, count_true, group_axis_names, safe_div, sum_groups


@dataclass
class SpatialStats(ArrayResult):
    """Per-group spatial coherence (fields have the group shape).

    same:          share of 4-neighbour pairs with the same expert.
    same_h, same_v: the same for horizontal and vertical pairs separately.
    chance:        sum_k p_k^2.
    lift:          same / chance.
    kappa:         (same - chance) / (1 - chance).
    n_pairs:       neighbour pairs counted.
    """

    same: np.ndarray
    same_h: np.ndarray
    same_v: np.ndarray
    chance: np.ndarray
    lift: np.ndarray
    kappa: np.ndarray
    n_pairs: np.ndarray


def neighbour_agreement(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-map counts of same-expert horizontal and vertical neighbour pairs.

    ``maps`` has shape ``(..., h, w)``; returns two int arrays of shape ``(...)``.
    Computed on the row-major token axis (contiguous slices, one byte sum for both):
    horizontal pairs are the tokens 1 apart less the ``h - 1`` that wrap from the end of one
    row to the start of the next, vertical pairs the tokens ``w`` apart.
    """
    m = np.asarray(maps)
    *lead, h, w = m.shape
    n = h * w
    flat = m.reshape(*lead, n)
    same = np.empty((*lead, 2, n), bool)  # (..., horizontal / vertical, first token of the pair)
    np.equal(flat[..., 1:], flat[..., :-1], out=same[..., 0, : n - 1])
    same[..., 0, w - 1 :: w] = False  # the pairs that wrap, and the last token (no pair)
    np.equal(flat[..., w:], flat[..., :-w], out=same[..., 1, : n - w])
    same[..., 1, n - w :] = False  # the last row: no token below
    counts = count_true(same)
    return counts[..., 0], counts[..., 1]


class SpatialCoherenceAccumulator(Stat):
    """Streaming spatial coherence per group.

    ``update(ids, *groups)``: ``ids`` of shape ``(..., h*w)`` (row-major token
    order) or ``(..., h, w)``; group arrays broadcast to the map axes ``(...)``.
    State: same-pair counts per group and expert counts per group.

    ``group_names`` names the group axes (default ``g0, g1, ...``);
    ``result(keep=...)`` pools the pair and expert counts over the other axes
    (``keep=()``: global), so a marginal's chance level uses the marginal's shares.
    """

    def __init__(self, n_experts: int, grid: tuple[int, int], group_shape: Sequence[int] = (),
                 group_names: Sequence[str] | None = None) -> None:
        self.n_experts = int(n_experts)
        self.h, self.w = int(grid[0]), int(grid[1])
        self.group_shape = tuple(int(g) for g in group_shape)
        self.group_names = group_axis_names(group_names, len(self.group_shape))
        self._pairs = GroupedSums(3, self.group_shape)  # same_h, same_v, maps
        self._experts = GroupedCounts((self.n_experts,), self.group_shape)

    def update(self, ids: np.ndarray, *groups: np.ndarray | int, expert_counts: np.ndarray | None = None) -> None:
        """Fold in maps; ``expert_counts`` (shape ``maps + (K,)``: each map's expert counts),
        when the caller has them already, saves counting the ids again."""
        a = np.asarray(ids)
        if a.shape[-1] == self.h * self.w and (a.ndim < 2 or a.shape[-2:] != (self.h, self.w)):
            a = a.reshape(a.shape[:-1] + (self.h, self.w))
        lead = a.shape[:-2]
        sh, sv = neighbour_agreement(a)
        cols = np.stack([sh, sv, np.ones(lead)], axis=-1).astype(np.float64)
        self._pairs.update(cols, groups)
        if expert_counts is not None:
            c = np.asarray(expert_counts)
            if c.shape != lead + (self.n_experts,):
                raise ValueError(f"expert_counts must have shape {lead + (self.n_experts,)}")
            self._experts.add_grouped(c, groups)
        else:
            self._experts.update([a], [np.expand_dims(np.asarray(g), (-2, -1)) if np.ndim(g) else g for g in groups])

    def add_block(self, ids: np.ndarray, at: tuple, expert_counts: np.ndarray) -> None:
        """Fold in maps whose groups are one block of the group grid: ``at`` indexes it (ints
        and slices, as `GroupedCounts.add_counts`), ``ids`` has the block's shape + ``(h, w)``
        (or ``h*w``) and ``expert_counts`` the block's shape + ``(K,)``. The same state as
        `update` with one group index per map, without building group keys."""
        a = np.asarray(ids)
        if a.shape[-1] == self.h * self.w and (a.ndim < 2 or a.shape[-2:] != (self.h, self.w)):
            a = a.reshape(a.shape[:-1] + (self.h, self.w))
        sh, sv = neighbour_agreement(a)
        self._pairs.add_columns(at, sh, sv, 1)
        self._experts.add_counts(expert_counts, at)

    def result(self, keep: Sequence[str] | None = None) -> SpatialStats:
        """Coherence per group; ``keep`` names the group axes to keep (the others are
        summed out; ``None`` keeps all, ``()`` gives the global figures)."""
        sums, _ = self._pairs.result()
        sums = sum_groups(sums, self.group_names, keep)
        maps = sums[..., 2]
        n_h = maps * self.h * (self.w - 1)
        n_v = maps * (self.h - 1) * self.w
        counts = sum_groups(self._experts.result(), self.group_names, keep).astype(np.float64)
        p = safe_div(counts, counts.sum(axis=-1, keepdims=True))
        chance = np.sum(p**2, axis=-1)  # sum_k p_k^2
        same = safe_div(sums[..., 0] + sums[..., 1], n_h + n_v)
        return SpatialStats(
            same=same,
            same_h=safe_div(sums[..., 0], n_h),
            same_v=safe_div(sums[..., 1], n_v),
            chance=chance,
            lift=safe_div(same, chance),
            kappa=safe_div(same - chance, 1.0 - chance),
            n_pairs=(n_h + n_v).astype(np.int64),
        )

"""Expert load: shares, utilisation, dead experts, CV, MaxVio, load entropy.

Load uses `/routing/counts` (all tokens, even with a token stride); the stored ids only feed
the consistency checks (counts vs ids, invalid records).
"""

from __future__ import annotations

import numpy as np

from ...stats import load_stats
from ..chunk import Chunk
from ..results import stats_at
from .base import Part, ProbeFamily


class LoadFamily(ProbeFamily):
    name = "load"

    def setup(self) -> None:
        grid = self.grid
        # sampling: per recorded timestep (Figure 4's data); training: per timestep bin
        n_time = grid.n_timesteps if grid.sampling else grid.n_bins
        self.counts = np.zeros((len(grid.layers), len(grid.steps), n_time, len(grid.branches), grid.n_experts),
                               np.int64)
        self.records = np.zeros((), np.int64)
        self.invalid = np.zeros((), np.int64)
        self.count_check_cells = np.zeros((), np.int64)
        self.count_check_max = np.zeros((), np.int64)  # a running maximum: see merge

    def update(self, chunk: Chunk) -> None:
        time = chunk.timestep if self.grid.sampling else chunk.timestep_bin
        self.counts[:, :, time, chunk.branch] += np.maximum(chunk.counts, 0)
        self.records += chunk.ids.size
        self.invalid += chunk.n_invalid
        if self.grid.full_grid or len(self.grid.tokens) == self.grid.n_grid_tokens:  # exact only with every token
            diff = int(np.abs(chunk.expert_counts - chunk.counts).max())
            self.count_check_max[...] = max(int(self.count_check_max), diff)
            self.count_check_cells += chunk.ids.shape[0] * chunk.ids.shape[1]

    def merge(self, other: "LoadFamily") -> None:
        highest = max(int(self.count_check_max), int(other.count_check_max))
        super().merge(other)
        self.count_check_max[...] = highest

    def by_bin(self) -> np.ndarray:
        """Counts (layer, step, timestep bin, branch, K)."""
        if not self.grid.sampling:
            return self.counts
        bin_of_t = self.grid.timestep_bin  # the grid's bins (traces.bins.timestep_bins), not a second rule
        return np.stack([self.counts[:, :, bin_of_t == b].sum(axis=2) for b in range(self.grid.n_bins)], axis=2)

    def result(self) -> Part:
        grid, counts = self.grid, self.by_bin()
        per_bin = load_stats(counts.sum(axis=3))  # (layer, step, bin)
        per_step = load_stats(counts.sum(axis=(2, 3)))
        per_branch = load_stats(counts.sum(axis=2))
        per_layer = load_stats(counts.sum(axis=(1, 2, 3)))
        everything = load_stats(counts.sum(axis=(0, 1, 2, 3)))
        part = Part(top={"checks": self._checks(), "global": {"load": stats_at(everything, ())}})
        if self.invalid:
            part.notes.append(f"{int(self.invalid)} routing records with invalid ids (>= K: unwritten or ablated) "
                              "left out")
        for li in range(len(grid.layers)):
            part.layers[li] = {"load": stats_at(per_layer, (li,))}
            for si in range(len(grid.steps)):
                d = {"load": stats_at(per_step, (li, si)),
                     "load_by_timestep_bin": [stats_at(per_bin, (li, si, b)) for b in range(grid.n_bins)]}
                if len(grid.branches) > 1:
                    d["load_by_branch"] = {br: stats_at(per_branch, (li, si, bi))
                                           for bi, br in enumerate(grid.branches)}
                if grid.sampling:
                    d["share_by_timestep"] = self._share_by_timestep(li, si)
                part.steps[li, si] = d
        return part

    def _share_by_timestep(self, li: int, si: int) -> dict:
        c = self.counts[li, si].sum(axis=1)  # (T, K)
        total = c.sum(axis=-1, keepdims=True)
        return {"timestep_value": self.grid.timestep_values.tolist(),
                "share": np.where(total > 0, c / np.maximum(total, 1), np.nan).tolist()}

    def _checks(self) -> dict:
        return {"records": int(self.records), "invalid_records": int(self.invalid),
                "counts_vs_ids_max_abs_diff": int(self.count_check_max) if self.count_check_cells else None,
                "counts_vs_ids_cells": int(self.count_check_cells),
                "share_sum_max_abs_dev": _share_sum_deviation(self.counts)}


def _share_sum_deviation(counts: np.ndarray) -> float | None:
    total = counts.sum(axis=-1, keepdims=True)
    written = total[..., 0] > 0
    if not written.any():
        return None
    share = counts / np.maximum(total, 1)
    return float(np.abs(share.sum(axis=-1)[written] - 1.0).max())

"""Recursion-step transitions: expert at step l -> expert at step l+1 of the same token
(persistence vs chance, conditional entropy, MI); needs >= 2 consecutive recorded steps."""

from __future__ import annotations

from ...stats import TransitionAccumulator, transition_stats
from ..chunk import Chunk
from ..results import stats_at
from ..setup import Context
from .base import Part, ProbeFamily


class TransitionFamily(ProbeFamily):
    name = "transitions"

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        grid = self.grid
        if not grid.consecutive_steps:
            self.skipped = "transitions skipped: fewer than 2 or non-consecutive recorded recursion steps"
            return
        self.transitions = TransitionAccumulator(grid.n_experts, (len(grid.layers), grid.n_bins, len(grid.steps) - 1))

    def update(self, chunk: Chunk) -> None:  # table (layer, bin, step pair, K, K)
        pairs = chunk.tables.pairs(chunk.clipped, chunk.clipped, shift=1)[:, :-1]
        self.transitions.add_counts(pairs, at=(slice(None), chunk.timestep_bin))

    def result(self) -> Part:
        steps, table = self.grid.steps, self.transitions.table()
        total, per_bin = transition_stats(table.sum(axis=1)), transition_stats(table)
        part = Part()
        for li in range(len(self.grid.layers)):
            part.layers[li] = {"transitions": {
                f"{steps[s]}->{steps[s + 1]}": {
                    **stats_at(total, (li, s)),
                    "by_timestep_bin": [stats_at(per_bin, (li, b, s), drop=("matrix",)) for b in range(self.grid.n_bins)]}
                for s in range(len(steps) - 1)}}
        return part

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

    @classmethod
    def unavailable(cls, context: Context) -> str | None:
        enough = context.grid.consecutive_steps
        return None if enough else "transitions skipped: fewer than 2 or non-consecutive recorded recursion steps"

    def setup(self) -> None:
        shape = (len(self.grid.layers), self.grid.n_bins, len(self.grid.steps) - 1)
        self.transitions = TransitionAccumulator(self.grid.n_experts, shape)

    def update(self, chunk: Chunk) -> None:  # table (layer, bin, step pair, K, K)
        self.transitions.add_counts(chunk.transitions(), at=(slice(None), chunk.timestep_bin))

    def result(self) -> Part:
        steps, table = self.grid.steps, self.transitions.table()
        total, per_bin = transition_stats(table.sum(axis=1)), transition_stats(table)
        part = Part()
        for li in range(len(self.grid.layers)):
            part.layers[li] = {"transitions": {
                f"{steps[s]}->{steps[s + 1]}": {
                    **stats_at(total, (li, s)),
                    "by_timestep_bin": [stats_at(per_bin, (li, b, s), drop=("matrix",))
                                        for b in range(self.grid.n_bins)]}
                for s in range(len(steps) - 1)}}
        return part

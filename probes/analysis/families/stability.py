"""Routing stability: agreement and Cohen's kappa between two routings of the same tokens.

seeds: each sample against the first sample of the same prompt (same branch, timestep,
layer, step, token); adjacent_timesteps: each recorded timestep against the next recorded
one, binned by the earlier one; branches: every branch against the first ("cond" first in
recorded traces). Only one sample's routing (plus the reference sample's) is kept.
"""

from __future__ import annotations

import numpy as np

from ...stats import AgreementCounts
from ..chunk import Chunk, ChunkTables, Routing, make_chunk
from ..results import stats_at
from .base import Part, ProbeFamily

ALL = slice(None)


class StabilityFamily(ProbeFamily):
    name = "stability"
    sampling_only = True

    def setup(self) -> None:
        grid = self.grid
        shape = (len(grid.layers), len(grid.steps), grid.n_bins)
        # agreement needs only the same-expert pairs and each routing's counts (not K x K tables)
        self.seeds = AgreementCounts(grid.n_experts, shape)
        self.adjacent = AgreementCounts(grid.n_experts, shape)
        self.branches = AgreementCounts(grid.n_experts, shape + (max(len(grid.branches) - 1, 1),))
        self.seed_skipped = np.zeros((), np.int64)
        self.bin_of_timestep = [grid.bin_of({"timestep": t}) for t in grid.timesteps]
        # by sample id (a chunk's coordinate), not row: a rank file holds ids rank, rank + W, ...
        trace = self.context.trace
        self.prompt_of = dict(zip((int(i) for i in trace.coords["sample"]), trace.samples()["prompt"]))
        self.current_sample: int | None = None
        self.current: dict[tuple[int, int], Routing] = {}  # (branch, timestep) -> routing
        self.reference_prompt = self.reference_sample = None
        self.reference: dict[tuple[int, int], Routing] = {}
        self.seen_prompts: set = set()

    def update(self, chunk: Chunk) -> None:
        if chunk.sample != self.current_sample:
            self._finish_sample()
            self.current_sample, self.current = chunk.sample, {}
        branch, time, routing, agreement = chunk.branch, chunk.timestep, chunk.routing, chunk.tables.agreement
        previous = self.current.get((branch, time - 1))
        if previous is not None:
            self.adjacent.add(*agreement(previous, routing), at=(ALL, ALL, self.bin_of_timestep[time - 1]))
        if branch > 0 and (0, time) in self.current:
            self.branches.add(*agreement(self.current[0, time], routing), at=(ALL, ALL, chunk.timestep_bin, branch - 1))
        if self.reference_prompt == self.prompt_of[chunk.sample] and self.reference_sample != chunk.sample:
            reference = self.reference.get((branch, time))
            if reference is not None:
                self.seeds.add(*agreement(reference, routing), at=(ALL, ALL, chunk.timestep_bin))
        self.current[branch, time] = routing

    def start_at(self, row: int) -> None:
        """The prompts the one-process pass has seen before sample row `row` and its reference
        sample there (the last one whose prompt was new), with the reference's routing read
        again when a sample from `row` on has the reference's prompt."""
        trace = self.context.trace
        ids = [int(i) for i in trace.coords["sample"]]
        prompts = [self.prompt_of[i] for i in ids]
        for r in np.flatnonzero(trace.written[:row].any(axis=1)):  # the samples the pass visited
            if prompts[r] not in self.seen_prompts:
                self.seen_prompts.add(prompts[r])
                self.reference_prompt, self.reference_sample, reference_row = prompts[r], ids[r], int(r)
        if self.reference_prompt is None or self.reference_prompt not in prompts[row:]:
            return
        tables = ChunkTables(self.grid, self.context.labels)
        for block in trace.iter_chunks("/routing/expert", sample=reference_row):
            chunk = make_chunk(self.grid, tables, block.coords, block.data, None, None, None)
            self.reference[chunk.branch, chunk.timestep] = chunk.routing

    def finish(self) -> None:
        self._finish_sample()
        self.current_sample, self.current = None, {}

    def _finish_sample(self) -> None:
        if self.current_sample is None:
            return
        prompt = self.prompt_of[self.current_sample]
        if prompt not in self.seen_prompts:
            self.seen_prompts.add(prompt)
            self.reference_prompt, self.reference_sample, self.reference = prompt, self.current_sample, self.current
        elif prompt != self.reference_prompt:
            self.seed_skipped += 1  # same prompt seen before but its reference was evicted

    def result(self) -> Part:
        self.finish()
        part, kinds = Part(), {}
        for name, acc in (("seeds", self.seeds), ("adjacent_timesteps", self.adjacent), ("branches", self.branches)):
            if name == "branches":  # pooled over the non-reference branches
                per_bin, total = acc.summed((3,)), acc.summed((2, 3))
            else:
                per_bin, total = acc.result(), acc.summed((2,))
            if acc.first.any():
                kinds[name] = (total, per_bin)
        if "seeds" not in kinds:
            part.notes.append("seed stability skipped: no prompt was sampled with more than one seed")
        if self.seed_skipped:
            part.notes.append(f"seed stability: {int(self.seed_skipped)} samples skipped (same-prompt samples not "
                              "consecutive)")
        for cell in self.cells() if kinds else []:
            part.steps[cell] = {"stability": {name: self._at(total, per_bin, cell)
                                              for name, (total, per_bin) in kinds.items()}}
        return part

    def _at(self, total, per_bin, index: tuple) -> dict:
        return {**stats_at(total, index, drop=("confusion",)),
                "by_timestep_bin": [stats_at(per_bin, index + (b,), drop=("confusion",))
                                    for b in range(self.grid.n_bins)]}

"""Expert change between adjacent timesteps: the share of tokens whose expert differs between
one recorded timestep and the next (same sample, branch, layer, recursion step), binned by
the earlier timestep. Only tokens valid at both timesteps count."""

from __future__ import annotations

import numpy as np

from ..chunk import Chunk
from .base import Part, ProbeFamily


class ExpertChangeFamily(ProbeFamily):
    name = "expert_change"
    sampling_only = True

    def setup(self) -> None:
        shape = (len(self.grid.layers), len(self.grid.steps), self.grid.n_bins)
        self.changed = np.zeros(shape, np.int64)  # tokens whose expert changed
        self.pairs = np.zeros(shape, np.int64)  # tokens valid at both timesteps
        # branch -> (sample, timestep, clipped ids, all valid) of the branch's previous chunk
        self.previous: dict[int, tuple[int, int, np.ndarray, bool]] = {}
        self.bin_of_timestep = [self.grid.bin_of({"timestep": t}) for t in self.grid.timesteps]

    def update(self, chunk: Chunk) -> None:
        last = self.previous.get(chunk.branch)
        self.previous[chunk.branch] = (chunk.sample, chunk.timestep, chunk.clipped, chunk.all_valid)
        if last is None or last[:2] != (chunk.sample, chunk.timestep - 1):
            return
        earlier, ids = last[2], chunk.clipped
        at = (slice(None), slice(None), self.bin_of_timestep[chunk.timestep - 1])
        if last[3] and chunk.all_valid:  # the common case: one comparison pass
            self.pairs[at] += ids.shape[-1]
            self.changed[at] += (earlier != ids).sum(axis=-1)
            return
        both = (earlier < self.grid.n_experts) & (ids < self.grid.n_experts)
        self.pairs[at] += both.sum(axis=-1)
        self.changed[at] += (both & (earlier != ids)).sum(axis=-1)

    def result(self) -> Part:
        with np.errstate(invalid="ignore", divide="ignore"):
            share_by_bin = self.changed / self.pairs
            share = self.changed.sum(axis=2) / self.pairs.sum(axis=2)
        part = Part()
        for cell in self.cells():
            part.steps[cell] = {"expert_change": {
                "share": share[cell], "n": self.pairs[cell].sum(),
                "by_timestep_bin": [{"share": share_by_bin[cell + (b,)], "n": self.pairs[cell + (b,)]}
                                    for b in range(self.grid.n_bins)]}}
        return part

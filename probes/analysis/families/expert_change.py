"""Expert change between adjacent timesteps: the share of tokens whose expert differs between
one recorded timestep and the next (same sample, branch, layer, recursion step), binned by
the earlier timestep. Only tokens valid at both timesteps count."""

from __future__ import annotations

import numpy as np

from ..chunk import Chunk, Routing
from .base import Part, ProbeFamily


class ExpertChangeFamily(ProbeFamily):
    name = "expert_change"
    sampling_only = True

    def setup(self) -> None:
        shape = (len(self.grid.layers), len(self.grid.steps), self.grid.n_bins)
        self.changed = np.zeros(shape, np.int64)  # tokens whose expert changed
        self.pairs = np.zeros(shape, np.int64)  # tokens valid at both timesteps
        # branch -> (sample, timestep, routing) of the branch's previous chunk
        self.previous: dict[int, tuple[int, int, Routing]] = {}
        self.bin_of_timestep = [self.grid.bin_of({"timestep": t}) for t in self.grid.timesteps]

    def update(self, chunk: Chunk) -> None:
        last = self.previous.get(chunk.branch)
        self.previous[chunk.branch] = (chunk.sample, chunk.timestep, chunk.routing)
        if last is None or last[:2] != (chunk.sample, chunk.timestep - 1):
            return
        # over the tokens valid at both timesteps: the pairs are the earlier counts' sum, the
        # changes those less the same-expert pairs (the stability family's adjacent-timestep
        # agreement of the same two chunks: counted once, ChunkTables.agreement)
        same, earlier, _ = chunk.tables.agreement(last[2], chunk.routing)
        n = earlier.sum(axis=-1)
        at = (slice(None), slice(None), self.bin_of_timestep[chunk.timestep - 1])
        self.pairs[at] += n
        self.changed[at] += n - same

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

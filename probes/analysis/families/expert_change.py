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
        # branch -> (sample, timestep, clipped ids) of the branch's previous chunk
        self.previous: dict[int, tuple[int, int, np.ndarray]] = {}
        self.bin_of_timestep = [self.grid.bin_of({"timestep": t}) for t in self.grid.timesteps]

    def update(self, chunk: Chunk) -> None:
        last = self.previous.get(chunk.branch)
        self.previous[chunk.branch] = (chunk.sample, chunk.timestep, chunk.clipped)
        if last is None or last[:2] != (chunk.sample, chunk.timestep - 1):
            return
        # the joint table of (expert at the earlier timestep, expert now) over the tokens valid at
        # both: its sum is the pairs, its off-diagonal the changes (the stability family's
        # adjacent-timestep table of the same two chunks: counted once, ChunkTables.pairs)
        table = chunk.tables.pairs(last[2], chunk.clipped)
        n = table.sum(axis=(-2, -1))
        at = (slice(None), slice(None), self.bin_of_timestep[chunk.timestep - 1])
        self.pairs[at] += n
        self.changed[at] += n - np.trace(table, axis1=-2, axis2=-1)

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

"""Expert change between adjacent timesteps: the share of tokens whose expert differs between
one recorded timestep and the next (same sample, branch, layer, recursion step), binned by
the earlier timestep. Only tokens valid at both timesteps count."""

from __future__ import annotations

import numpy as np

from ..chunk import Chunk
from ..setup import Context
from .base import Part, ProbeFamily


class ExpertChangeFamily(ProbeFamily):
    name = "expert_change"

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        grid = self.grid
        if not grid.sampling:
            self.skipped = "expert change skipped: it compares adjacent timesteps of a sampling trace"
            return
        shape = (len(grid.layers), len(grid.steps), grid.n_bins)
        self.changed = np.zeros(shape, np.int64)  # tokens whose expert changed
        self.pairs = np.zeros(shape, np.int64)  # tokens valid at both timesteps
        self.previous: dict[int, tuple[int, int, np.ndarray]] = {}  # branch -> (sample, timestep, clipped ids)

    def update(self, chunk: Chunk) -> None:
        last = self.previous.get(chunk.branch)
        self.previous[chunk.branch] = (chunk.sample, chunk.timestep, chunk.clipped)
        if last is None or last[:2] != (chunk.sample, chunk.timestep - 1):
            return
        k, earlier = self.grid.n_experts, last[2]
        both = (earlier < k) & (chunk.clipped < k)
        earlier_bin = self.grid.bin_of({"timestep": self.grid.timesteps[chunk.timestep - 1]})
        self.pairs[:, :, earlier_bin] += both.sum(axis=-1)
        self.changed[:, :, earlier_bin] += (both & (earlier != chunk.clipped)).sum(axis=-1)

    def result(self) -> Part:
        with np.errstate(invalid="ignore", divide="ignore"):
            share_by_bin = self.changed / self.pairs
            share = self.changed.sum(axis=2) / self.pairs.sum(axis=2)
        part = Part()
        for li in range(len(self.grid.layers)):
            for si in range(len(self.grid.steps)):
                part.steps[li, si] = {"expert_change": {
                    "share": share[li, si], "n": self.pairs[li, si].sum(),
                    "by_timestep_bin": [{"share": share_by_bin[li, si, b], "n": self.pairs[li, si, b]}
                                        for b in range(self.grid.n_bins)]}}
        return part

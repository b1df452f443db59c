"""Spatial coherence: the share of 4-neighbour token pairs routed to the same expert vs
chance. Needs the full token grid; a map holding an invalid id is left out."""

from __future__ import annotations

import numpy as np

from ...stats import SpatialCoherenceAccumulator
from ..chunk import Chunk
from ..results import stats_at
from ..setup import Context
from .base import Part, ProbeFamily


class SpatialFamily(ProbeFamily):
    name = "spatial"
    constants = ("layer_index", "step_index")

    @classmethod
    def unavailable(cls, context: Context) -> str | None:
        if not context.grid.full_grid:
            return "spatial coherence skipped: the stored tokens are not the full token grid (stride or subset)"
        return None

    def setup(self) -> None:
        grid = self.grid
        n_layers, n_steps = len(grid.layers), len(grid.steps)
        self.spatial = SpatialCoherenceAccumulator(grid.n_experts, grid.token_grid, (n_layers, n_steps, grid.n_bins),
                                                   ("layer", "step", "tbin"))
        self.layer_index = np.arange(n_layers).reshape(-1, 1)
        self.step_index = np.arange(n_steps).reshape(1, -1)

    def update(self, chunk: Chunk) -> None:
        n_layers, n_steps = chunk.ids.shape[:2]
        maps = chunk.ids.reshape(n_layers, n_steps, *self.grid.token_grid)
        if chunk.all_valid:
            self.spatial.add_block(maps, (slice(None), slice(None), chunk.timestep_bin), chunk.expert_counts)
            return
        valid = (chunk.ids < self.grid.n_experts).all(axis=-1)
        if valid.any():
            self.spatial.update(maps[valid], np.broadcast_to(self.layer_index, valid.shape)[valid],
                                np.broadcast_to(self.step_index, valid.shape)[valid], chunk.timestep_bin)

    def result(self) -> Part:
        per_bin = self.spatial.result()  # (layer, step, bin)
        total = self.spatial.result(keep=("layer", "step"))  # pooled over timestep bins
        part = Part()
        for cell in self.cells():
            part.steps[cell] = {"spatial": stats_at(total, cell),
                                "spatial_by_timestep_bin": [stats_at(per_bin, cell + (b,))
                                                            for b in range(self.grid.n_bins)]}
        return part

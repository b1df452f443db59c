"""Router confidence from the stored gate probabilities: gate entropy, top-1 margin, the
balance monitor K sum f P, soft MI and the sampling disagreement."""

from __future__ import annotations

import numpy as np

from ...stats import GateAccumulator
from ..chunk import Chunk
from ..results import stats_at
from ..setup import Context
from .base import Part, ProbeFamily


class GateFamily(ProbeFamily):
    name = "gate"
    constants = ("layer_index", "step_index")
    needs = ("/routing/prob",)

    @classmethod
    def unavailable(cls, context: Context) -> str | None:
        if not context.trace.has("/routing/prob"):
            return ("router confidence, balance monitor, soft MI and sampling disagreement need /routing/prob "
                    "(record with --probs)")
        return None

    def setup(self) -> None:
        grid = self.grid
        self.gate = GateAccumulator(grid.n_experts, (len(grid.layers), len(grid.steps), grid.n_bins,
                                                      len(grid.branches)), ("layer", "step", "tbin", "branch"))
        self.layer_index = np.arange(len(grid.layers)).reshape(-1, 1, 1)
        self.step_index = np.arange(len(grid.steps)).reshape(1, -1, 1)

    def update(self, chunk: Chunk) -> None:
        groups = (self.layer_index, self.step_index, chunk.timestep_bin, chunk.branch)
        if chunk.all_valid:  # stored float16: GateAccumulator's row path, with the chunk's counts
            self.gate.update(probs=chunk.prob, ids=chunk.ids, groups=groups, expert_counts=chunk.expert_counts)
            return
        probs = chunk.prob.astype(np.float64)
        valid = chunk.ids < self.grid.n_experts
        self.gate.update(probs=probs[valid], ids=chunk.ids[valid],
                         groups=(np.broadcast_to(self.layer_index, valid.shape)[valid],
                                 np.broadcast_to(self.step_index, valid.shape)[valid]) + groups[2:])

    def result(self) -> Part:
        # pooled over branches: per (layer, step, bin), per (layer, step), global
        per_bin = self.gate.result(keep=("layer", "step", "tbin"))
        per_step = self.gate.result(keep=("layer", "step"))
        part = Part(top={"global": {"gate": stats_at(self.gate.result(keep=()), ())}})
        if self.grid.sampling:
            part.notes.append("sampling disagreement in a sampling trace is argmax routing vs stored id (0 unless an "
                              "intervention or a float16 tie); it is meaningful in training traces")
        for cell in self.cells():
            part.steps[cell] = {"gate": stats_at(per_step, cell),
                                "gate_by_timestep_bin": [stats_at(per_bin, cell + (b,))
                                                         for b in range(self.grid.n_bins)]}
        return part

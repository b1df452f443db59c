"""MI(expert; label) with Miller-Madow, permutation null and AMI, plus lift P(e|y)/P(e).

Every label's table is filled from the chunk's counts (a chunk has one timestep bin,
branch and sample), so no record is counted twice. Tables are (layer, step, bin, K, M),
except recursion_step's: (layer, bin, K, steps), reported per layer. The position label adds
up each chunk's counted table (`Chunk.counted`) per bin and takes the histogram from the sums,
once, at the end.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...stats import ContingencyAccumulator, lift_table, mi_summary
from ..chunk import Chunk, ChunkTables, position_histogram
from ..results import stats_at
from ..setup import Label
from .base import Part, ProbeFamily

ALL = slice(None)


class InformationFamily(ProbeFamily):
    name = "information"

    def setup(self) -> None:
        grid = self.grid
        n_layers, n_steps = len(grid.layers), len(grid.steps)
        self.labels = self.context.labels
        # per-sample label codes are in row order; a chunk names its sample by id
        self.row_of = self.context.trace.sample_rows() if grid.sampling else None
        self.tables = {lab.name: ContingencyAccumulator(grid.n_experts, len(lab.values),
                                                        (n_layers, grid.n_bins) if lab.kind == "step"
                                                        else (n_layers, n_steps, grid.n_bins))
                       for lab in self.labels if lab.kind != "position"}
        shape = ChunkTables(grid, self.labels).counted_shape
        self.position = np.zeros((grid.n_bins,) + shape, np.int64)  # sum of Chunk.counted per bin

    def _state(self) -> dict:  # the Stat state: one accumulator per label, and the position sums
        return {"position": self.position, **{f"tables.{name}": acc for name, acc in self.tables.items()}}

    def _table(self, lab: Label) -> np.ndarray:
        if lab.kind != "position":
            return self.tables[lab.name].table()
        k = self.grid.n_experts  # (bin, layer, step, region, K) -> (layer, step, bin, K, region)
        return np.stack([position_histogram(at)[..., :k] for at in self.position]).transpose(1, 2, 0, 4, 3)

    def update(self, chunk: Chunk) -> None:
        b = chunk.timestep_bin
        for lab in self.labels:
            if lab.kind == "position":
                self.position[b] += chunk.counted
                continue
            table = self.tables[lab.name]
            if lab.kind == "step":
                table.add_counts(chunk.expert_counts.transpose(0, 2, 1), at=(ALL, b))
            else:  # one label value per chunk cell
                table.add_counts(chunk.expert_counts, at=(ALL, ALL, b, ALL, _code(lab, chunk, self.row_of)))

    def result(self) -> Part:
        part = Part()
        summaries = {lab.name: self._summaries(lab) for lab in self.labels}
        for li in range(len(self.grid.layers)):
            part.layers[li] = {"mi": {lab.name: self._layer_mi(lab, summaries[lab.name], li) for lab in self.labels}}
        for cell in self.cells():
            part.steps[cell] = {"mi": {lab.name: self._mi_at(lab, summaries[lab.name], cell)
                                       for lab in self.labels if lab.kind != "step"}}
        return part

    def _summaries(self, lab: Label) -> dict[str, Any]:
        opt = self.context.options
        table = self._table(lab)
        bin_axis = 1 if lab.kind == "step" else 2
        total = table.sum(axis=bin_axis)
        out = {"total": mi_summary(total, n_perm=opt.n_perm, seed=opt.seed), "table": total,
               "by_bin": mi_summary(table, n_perm=0, analytic_emi=False)}
        if lab.kind != "step":
            out["all_steps"] = mi_summary(total.sum(axis=1), n_perm=opt.n_perm, seed=opt.seed)
        return out

    def _mi_at(self, lab: Label, summary: dict, index: tuple) -> dict:
        by_bin = summary["by_bin"]
        return {**stats_at(summary["total"], index), "labels": lab.values, "lift": lift_table(summary["table"][index]),
                "by_timestep_bin": [{"mi": by_bin.mi[index + (b,)], "mi_mm": by_bin.mi_mm[index + (b,)],
                                     "n": by_bin.n[index + (b,)]} for b in range(self.grid.n_bins)]}

    def _layer_mi(self, lab: Label, summary: dict, li: int) -> dict:
        if lab.kind == "step":
            return self._mi_at(lab, summary, (li,))
        return {**stats_at(summary["all_steps"], (li,)), "labels": lab.values}


def _code(lab: Label, chunk: Chunk, row_of: dict[int, int] | None) -> int:
    if lab.kind == "bin":
        return chunk.timestep_bin
    if lab.kind == "branch":
        return chunk.branch
    if lab.kind == "sample":
        return int(lab.codes[row_of[chunk.sample] if row_of is not None else chunk.sample])
    return int(lab.codes[int(chunk.coords["event"])])

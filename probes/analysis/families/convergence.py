"""Latent convergence across recursion steps: distance to the last step, relative step
size, step cosine, contraction rho, and the fixed-point / orbit / drift shares. Needs
/latents/h and >= 3 consecutive recorded recursion steps."""

from __future__ import annotations

import numpy as np

from ...stats import TRAJECTORY_LABELS, ConvergenceAccumulator
from ..chunk import Chunk
from ..setup import Context
from .base import Part, ProbeFamily

NO_LATENTS = "latent convergence, linear probes and projections skipped: no /latents/h"
FIELDS = ("dist_to_last", "rel_step", "step_cos", "contraction", "log_rho_mean", "label_share")


class ConvergenceFamily(ProbeFamily):
    name = "convergence"
    constants = ("layer_index",)
    needs = ("/latents/h",)

    @classmethod
    def unavailable(cls, context: Context) -> str | None:
        grid = context.grid
        if not (grid.sampling and context.trace.has("/latents/h")):
            return NO_LATENTS
        if not (len(grid.steps) >= 3 and grid.consecutive_steps):
            return "latent convergence skipped: needs >= 3 consecutive recorded recursion steps"
        return None

    def setup(self) -> None:
        grid = self.grid
        self.convergence = ConvergenceAccumulator(len(grid.steps), (len(grid.layers), grid.n_bins))
        self.layer_index = np.arange(len(grid.layers)).reshape(-1, 1)

    def update(self, chunk: Chunk) -> None:
        trajectories = np.moveaxis(chunk.latents.astype(np.float32), 1, 2)  # (layer, token, step, dim)
        finite = np.isfinite(trajectories).all(axis=(-2, -1))
        if finite.all():
            self.convergence.update(trajectories, self.layer_index, chunk.timestep_bin)
        elif finite.any():
            self.convergence.update(trajectories[finite], np.broadcast_to(self.layer_index, finite.shape)[finite],
                                    chunk.timestep_bin)

    def result(self) -> Part:
        summary = self.convergence.result()
        part = Part()
        for li in range(len(self.grid.layers)):
            part.layers[li] = {"convergence": {
                **self._pooled(summary, li),
                "by_timestep_bin": [self._finish({k: getattr(summary, k)[li, b] for k in FIELDS + ("n",)})
                                    for b in range(self.grid.n_bins)]}}
        return part

    def _pooled(self, summary, li: int) -> dict:
        """Weighted mean over the timestep bins (weights: trajectories per bin)."""
        n = summary.n[li]
        weight = n / max(n.sum(), 1)
        d = {k: np.tensordot(weight, np.nan_to_num(getattr(summary, k)[li]), axes=(0, 0)) for k in FIELDS}
        d["n"] = int(n.sum())
        return self._finish(d)

    def _finish(self, d: dict) -> dict:
        d["rho"] = float(np.exp(d["log_rho_mean"])) if np.isfinite(d["log_rho_mean"]) else None
        d["labels"] = list(TRAJECTORY_LABELS)
        d["steps"] = self.grid.steps
        return d

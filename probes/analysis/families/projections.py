"""Latent subsample and linear probes: how well the timestep bin, the recursion step, the
routed expert and each prompt label can be decoded linearly from h_l (cross-validated,
against shuffled labels), on a subsample of at most `max_latent_points` vectors. (The
latent-trajectory figure reads every stored latent itself: `probes.trajectories`.)"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ...stats import linear_probe
from ..chunk import Chunk
from ..setup import Context
from .base import Part, ProbeFamily
from .convergence import NO_LATENTS

LATENT_COLUMNS = ("layer", "step", "tbin", "timestep", "sample", "branch", "token", "expert")


class ProjectionFamily(ProbeFamily):
    name = "projections"
    needs = ("/latents/h",)

    @classmethod
    def unavailable(cls, context: Context) -> str | None:
        return None if context.grid.sampling and context.trace.has("/latents/h") else NO_LATENTS

    def setup(self) -> None:
        trace, grid, opt = self.context.trace, self.grid, self.context.options
        self.latent_tokens = np.asarray(trace.coords["stored_token"], dtype=np.int64)
        position = {int(t): i for i, t in enumerate(grid.tokens)}
        self.routed_position = np.array([position.get(int(t), -1) for t in self.latent_tokens])  # -1: not routed
        n_cells = int(trace.written.sum()) * len(grid.branches) * len(grid.layers) * len(grid.steps)
        self.keep = max(1, min(len(self.latent_tokens), opt.max_latent_points // max(1, n_cells)))
        self.vectors: list[np.ndarray] = []
        self.meta: list[np.ndarray] = []

    def update(self, chunk: Chunk) -> None:
        if not self.context.options.linear_probes:  # the subsample feeds the linear probes only
            return
        latents = chunk.latents.astype(np.float32)  # (layer, step, stored token, dim)
        n_layers, n_steps, n_tokens = latents.shape[:3]
        # drawn from the seed and the cell's coordinates, not from one stream: the same tokens
        # whichever process folds the cell (probes.analysis.parallel)
        rng = np.random.default_rng((self.context.options.seed, chunk.sample, chunk.branch, chunk.timestep))
        pick = np.sort(rng.choice(n_tokens, size=min(self.keep, n_tokens), replace=False))
        routed = self.routed_position[pick]
        experts = np.where(routed >= 0, chunk.ids[:, :, np.maximum(routed, 0)], 255).astype(np.int64)
        layer, step = np.meshgrid(np.arange(n_layers), np.arange(n_steps), indexing="ij")
        cell = np.broadcast_to(np.stack([layer, step], axis=-1)[:, :, None, :], (n_layers, n_steps, len(pick), 2))
        fixed = np.broadcast_to(np.array([chunk.timestep_bin, chunk.timestep, chunk.sample, chunk.branch]),
                                (n_layers, n_steps, len(pick), 4))
        tokens = np.broadcast_to(self.latent_tokens[pick][:, None], (n_layers, n_steps, len(pick), 1))
        meta = np.concatenate([cell, fixed, tokens, experts[..., None]], axis=-1)
        self.vectors.append(latents[:, :, pick].reshape(-1, latents.shape[-1]))
        self.meta.append(meta.reshape(-1, len(LATENT_COLUMNS)))

    def _state(self) -> dict:
        return {}

    def merge(self, other: "ProjectionFamily") -> None:
        self.vectors += other.vectors
        self.meta += other.meta

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"vectors": np.concatenate(self.vectors), "meta": np.concatenate(self.meta)} if self.vectors else {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.vectors = [state["vectors"]] if "vectors" in state else []
        self.meta = [state["meta"]] if "meta" in state else []

    def result(self) -> Part:
        part = Part()
        if not self.vectors:
            return part
        vectors, meta = np.concatenate(self.vectors), np.concatenate(self.meta)
        if self.context.options.linear_probes:
            part.top["linear_probes"] = {str(layer): self._probes(vectors, meta, li)
                                         for li, layer in enumerate(self.grid.layers)}
        return part

    def _probes(self, vectors: np.ndarray, meta: np.ndarray, li: int) -> dict[str, Any]:
        column = {c: i for i, c in enumerate(LATENT_COLUMNS)}
        select = meta[:, column["layer"]] == li
        x, m = vectors[select], meta[select]
        finite = np.isfinite(x).all(axis=1)
        x, m = x[finite], m[finite]
        targets = {"timestep_bin": m[:, column["tbin"]], "recursion_step": m[:, column["step"]],
                   "expert": m[:, column["expert"]]}
        rows = self.context.trace.sample_rows()  # label codes are by row; meta names samples by id
        sample_rows = np.fromiter((rows[int(i)] for i in m[:, column["sample"]]), np.int64, count=len(m))
        for lab in self.context.labels:
            if lab.kind == "sample":
                targets[lab.name] = lab.codes[sample_rows]
        opt, out = self.context.options, {}
        for name, y in targets.items():
            keep = y < self.grid.n_experts if name == "expert" else np.ones(len(y), bool)
            try:
                with warnings.catch_warnings():  # linear_probe limits BLAS to one thread itself
                    warnings.simplefilter("ignore")  # ConvergenceWarning: the held-out accuracy is what counts
                    out[name] = linear_probe(x[keep], y[keep], n_splits=opt.probe_splits,
                                             max_samples=opt.probe_max_samples,
                                             C=opt.probe_C, max_iter=200, seed=opt.seed).to_dict()
            except ValueError as e:
                out[name] = {"skipped": str(e)}
        return out

"""Specialization over training ("when did the experts split?"), from a training trace: per
window of training steps, the gate's entropy and margin, the MI of the expert with the timestep
bin and with the recursion step (each with its permutation p, null mean and std, and adjusted
MI), the load, and the mean loss and balance logged in those steps; per (layer, step) and pooled
over every layer and step (`pooled`, what the dashboard's Training-health tab draws).

This is the one definition of the training curves (issue 18): windows hold equal numbers of
recorded training steps (a window of a run recorded every N steps is never empty), gate entropy
is `gate_entropy(p, normalised=True)` averaged over tokens with a valid id, and the permutation
count is the report's `--permutations`."""

from __future__ import annotations

import numpy as np

from ...stats import gate_entropy, load_stats, mi_summary, top1_margin
from ..chunk import Chunk
from ..setup import Context
from .base import Part, ProbeFamily

MAX_WINDOWS = 20


class TrainingCurvesFamily(ProbeFamily):
    name = "training_curves"
    needs = ("/routing/prob",)

    @classmethod
    def unavailable(cls, context: Context) -> str | None:
        if context.grid.sampling:
            return "training curves skipped: they need a training trace"
        return None

    def setup(self) -> None:
        steps = np.asarray(self.context.trace.events()["step"])
        recorded = np.unique(steps)
        n_windows = max(1, min(MAX_WINDOWS, len(recorded)))
        # windows of consecutive recorded training steps, equal in number of recorded steps
        window = np.arange(len(recorded)) * n_windows // max(len(recorded), 1)
        self.window_of_step = dict(zip(recorded.tolist(), window.tolist()))
        self.first = [int(recorded[window == w].min()) if (window == w).any() else None for w in range(n_windows)]
        self.last = [int(recorded[window == w].max()) if (window == w).any() else None for w in range(n_windows)]
        grid = self.grid
        shape = (n_windows, len(grid.layers), len(grid.steps), grid.n_bins, grid.n_experts)
        self.counts = np.zeros(shape, np.int64)  # (window, layer, step, bin, K)
        self.entropy = np.zeros((n_windows, len(grid.layers), len(grid.steps)))
        self.margin = np.zeros_like(self.entropy)
        self.prob_tokens = np.zeros_like(self.entropy)

    def update(self, chunk: Chunk) -> None:
        w = self.window_of_step.get(int(chunk.coords["train_step"]))
        if w is None:
            return
        self.counts[w, :, :, chunk.timestep_bin] += chunk.expert_counts
        if chunk.prob is not None:
            p = chunk.prob.astype(np.float64)  # (layer, step, token, K)
            valid = chunk.ids < self.grid.n_experts
            self.entropy[w] += np.where(valid, gate_entropy(p, normalised=True), 0).sum(-1)
            self.margin[w] += np.where(valid, top1_margin(p), 0).sum(-1)
            self.prob_tokens[w] += valid.sum(-1)

    def _scalars(self) -> dict[str, list]:
        """Mean of every logged training scalar per window."""
        train = self.context.trace.train()
        steps = np.asarray(train.pop("step"))
        # a logged step belongs to the first window whose last recorded step is not before it
        window = np.searchsorted(np.asarray(self.last, dtype=float), steps, side="left")
        out = {}
        for name, values in train.items():
            values = np.asarray(values, dtype=float)
            out[name] = [float(np.nanmean(values[window == w])) if (window == w).any() else None
                         for w in range(len(self.counts))]
        return out

    def result(self) -> Part:
        n_perm, seed = self.context.options.n_perm, self.context.options.seed
        with_time = mi_summary(self.counts.transpose(0, 1, 2, 4, 3), n_perm=n_perm, seed=seed)  # (W, layer, step)
        with_step = mi_summary(self.counts.sum(3).transpose(0, 1, 3, 2), n_perm=n_perm, seed=seed)  # (W, layer)
        total = self.counts.sum(axis=(3, 4), keepdims=True)
        share = np.where(total > 0, self.counts.sum(3, keepdims=True) / np.maximum(total, 1), np.nan)[..., 0, :]
        has_prob = self.prob_tokens.sum() > 0
        tokens = np.maximum(self.prob_tokens, 1)
        curves = {
            "window_start_step": self.first, "window_end_step": self.last,
            "records": self.counts.sum(axis=(1, 2, 3, 4)).tolist(),
            "load_share": share.tolist(),  # [window][layer][step][K]
            "mi_timestep_bin": _mi(with_time), "mi_recursion_step": _mi(with_step),
            "gate_norm_entropy": (self.entropy / tokens).tolist() if has_prob else None,
            "gate_margin": (self.margin / tokens).tolist() if has_prob else None,
            "pooled": self._pooled(has_prob),
            **self._scalars(),
        }
        part = Part(top={"training_curves": curves})
        if not has_prob:
            part.notes.append("training curves: gate entropy and margin need --trace-probs")
        return part

    def _pooled(self, has_prob: bool) -> dict:
        """Every layer and recursion step pooled per window: one load, one MI(expert; timestep
        bin) table, one token-weighted gate entropy and margin."""
        counts = self.counts.sum(axis=(1, 2))  # (W, bin, K)
        load = load_stats(counts.sum(axis=1))
        mi = mi_summary(counts.transpose(0, 2, 1), n_perm=self.context.options.n_perm, seed=self.context.options.seed)
        tokens = np.maximum(self.prob_tokens.sum(axis=(1, 2)), 1)
        return {"load_share": load.share.tolist(), "load_norm_entropy": load.norm_entropy.tolist(),
                "mi_timestep_bin": _mi(mi),
                "gate_norm_entropy": (self.entropy.sum(axis=(1, 2)) / tokens).tolist() if has_prob else None,
                "gate_margin": (self.margin.sum(axis=(1, 2)) / tokens).tolist() if has_prob else None}


def _mi(r) -> dict:
    """MI with its permutation null (mean, std: the band the dashboard draws), p and AMI."""
    return {"mi": r.mi, "ami": r.ami, "p_value": r.p_value, "null_mean": r.null_mean, "null_std": r.null_std}

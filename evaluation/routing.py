"""Routing figures of a checkpoint beside its quality: what the gate did while the table's images
were sampled, and whether its choices matter for the loss (probes.routing_value).

During sampling (both branches of classifier-free guidance) the expert hook points count the
chosen expert per (layer, recursion step, timestep bin) and the probability hook points give
the gate entropy. Figures:

    gate_entropy      mean per-token entropy of the gate, divided by log K (1 = uniform gate)
    ami_timestep      adjusted MI of expert and timestep bin, largest over (layer, step), and its
                      permutation p-value (probes.stats.mi_summary)
    ami_step          adjusted MI of expert and recursion step (L > 1), largest over layers, and p
    gate_margin       mean per-token top-1 minus top-2 gate probability (the verdict's flatness)
    routing_value     1 - loss(gate) / loss(random routing of the same load, one expert per image) on
                      held-out batches, with its 95% interval (probes.routing_value schema 2, scope "all");
                      beside it value_token (per-token null), adapter_gain, routing_share, oracle_gap,
                      argmax_vs_sampled, each with its interval
    verdict           the whole model's verdict from probes.verdict.step_verdict (the function the
                      report and the dashboard use): scope "all"'s value and adapter gain, the mean gate
                      margin, and the AMI of the (layer, step) with the strongest timestep structure;
                      verdict_text says it in words (and that the structure was planted, when it was)

Rows whose mode has no gate (sft, no_modulation: one expert) have none of these.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rsr_model.flow import NUM_TRAIN_TIMESTEPS
from rsr_model.hooks import hook_name
from traces.bins import timestep_bins


class SamplingRouting:
    """Hooks that count routing while `generate` runs; `figures()` summarises them."""

    def __init__(self, rsr, n_bins: int = 4) -> None:
        self.rsr, self.n_bins = rsr, n_bins
        self.K, self.L = rsr.config.experts, rsr.config.steps
        self.layers = rsr.layer_indices
        self.counts = np.zeros((len(self.layers), self.L, n_bins, self.K), np.int64)  # expert by time bin
        self.entropy_sum, self.margin_sum, self.tokens = 0.0, 0.0, 0

    def _on_expert(self, ids: torch.Tensor, ctx) -> None:
        t = ctx.timestep.detach().double().cpu().numpy()  # (B,) sigma * 1000
        bins = timestep_bins(NUM_TRAIN_TIMESTEPS - t, self.n_bins, 0, NUM_TRAIN_TIMESTEPS)  # bin 0 the noisiest
        layer = self.layers.index(ctx.layer)
        for b in np.unique(bins):
            chosen = ids[torch.as_tensor(bins == b)].reshape(-1)
            self.counts[layer, ctx.step, b] += np.bincount(chosen[chosen >= 0].numpy(), minlength=self.K)

    def _on_probs(self, probs: torch.Tensor, ctx) -> None:
        from probes.stats import gate_entropy, top1_margin

        p = probs.detach().double().cpu().numpy()
        self.entropy_sum += float(gate_entropy(p, normalised=True).sum())
        if p.shape[-1] > 1:
            self.margin_sum += float(top1_margin(p).sum())
        self.tokens += probs.shape[0] * probs.shape[1]

    def hooks(self) -> dict[str, Any]:
        return {hook_name("*", "expert", "*"): self._on_expert, hook_name("*", "probs", "*"): self._on_probs}

    def figures(self) -> dict[str, Any]:
        from probes.stats import mi_summary

        by_time = mi_summary(self.counts.transpose(0, 1, 3, 2), n_perm=199, seed=0)  # (layers, L): expert x bin
        best = np.unravel_index(int(np.nanargmax(by_time.ami)), by_time.ami.shape)
        out = {"gate_entropy": self.entropy_sum / max(self.tokens, 1),
               "gate_margin": self.margin_sum / max(self.tokens, 1),
               "ami_timestep": float(by_time.ami[best]), "p_timestep": float(by_time.p_value[best]),
               "ami_timestep_at": {"layer": self.layers[best[0]], "step": int(best[1])},
               "load": (self.counts.sum(2) / np.maximum(self.counts.sum((2, 3))[..., None], 1)).round(3).tolist()}
        if self.L > 1:
            by_step = mi_summary(self.counts.sum(2).transpose(0, 2, 1), n_perm=199, seed=0)  # (layers,): expert x step
            layer = int(np.nanargmax(by_step.ami))
            out.update(ami_step=float(by_step.ami[layer]), p_step=float(by_step.p_value[layer]))
        return out


FIGURES = ("value_token", "adapter_gain", "routing_share", "oracle_gap", "argmax_vs_sampled")


def routing_value_figures(task, transformer, rsr, samples: int, bins: int, draws: int,
                          evidence: dict[str, Any] | None = None, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """probes.routing_value on held-out batches of the task's training distribution, scope "all", and the
    verdict `probes.verdict.step_verdict` gives it with the sampling `evidence` (SamplingRouting.figures())."""
    from probes.routing_value import held_out_batches, planted_for, routing_value
    from probes.verdict import step_verdict

    torch.manual_seed(0)
    batches = held_out_batches(task, samples, bins)
    result = routing_value(transformer, rsr, batches, random_draws=draws, n_boot=500)
    scope = result["scopes"]["all"]
    out = {"routing_value": scope["value"], "routing_value_ci95": list(scope["value_ci95"]),
           "gate_below_every_forced": bool(scope["gate_below_every_forced"])}
    for k in FIGURES:
        out[k], out[k + "_ci95"] = scope[k], list(scope[k + "_ci95"])
    planted = planted_for(ckpt, task, transformer, rsr, batches) if ckpt is not None else None
    ev = evidence or {}
    step = {"gate": {"mean_margin": ev.get("gate_margin")},
            "mi": {"timestep_bin": {"ami": ev.get("ami_timestep"), "p_value": ev.get("p_timestep")}}}
    verdict = step_verdict(step, scope, scope, planted)
    out.update(verdict=verdict["label"], verdict_text=verdict["text"], planted=planted)
    return out

"""Expert warm start: a curriculum that breaks the experts' symmetry before the gate is free.

Why: with a gate that starts near uniform, hard Gumbel routing sends every token to a random
expert, so all experts see the same data, receive the same gradients in expectation and stay
alike; a gate then has nothing to choose between (measured in docs/specialization.md: gate
entropy 0.9996 of its maximum after the paper's RSR stage). The warm start gives each expert
its own share of the work first:

    for the first `steps` RSR training steps:
        expert of every vision token at recursion step s  :=  cell(s, band(t))   (forced through the
                                                              expert hook point, as a probe would)
        loss += cross_entropy(gate logits, cell(s, band(t)))   (the gate learns the assignment)
    afterwards the gate alone routes (hard Gumbel, as the paper trains).

`band(t)` splits the training noise levels into equal-probability bands (quantiles of the
task's timestep density, so every expert gets the same share of tokens). Layouts:

    band       K bands, expert = band                    (timestep specialists)
    step-band  L x (K / L) cells, expert = s * (K/L) + band  (one expert per recursion step and
                                                           noise band; needs K divisible by L)

Nothing keeps the assignment after the warm start: whether the gate holds it, and whether it
matters, is what the probes measure (routing value, verdicts).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .config import ConfigError
from .flow import NUM_TRAIN_TIMESTEPS
from .hooks import HookContext, hook_name

LAYOUTS = ("none", "band", "step-band")


def check_layout(layout: str, experts: int, steps: int) -> None:
    """Fail before training if the layout cannot give every expert a cell."""
    if layout not in LAYOUTS:
        raise ConfigError(f"warm start must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "step-band" and experts % steps:
        raise ConfigError(f"warm start 'step-band' needs the experts ({experts}) divisible by the latent "
                          f"steps ({steps})")
    if layout != "none" and experts < 2:
        raise ConfigError(f"warm start {layout!r} needs at least 2 experts (mode runs {experts})")


def noise_quantile(timestep: torch.Tensor, weighting: str, shift: float) -> torch.Tensor:
    """Where each model timestep (sigma * 1000) lies in the training density of sigma, in [0, 1]."""
    sigma = (timestep.double() / NUM_TRAIN_TIMESTEPS).clamp(1e-6, 1 - 1e-6)
    sigma = sigma / (shift - (shift - 1) * sigma)  # undo the shift that training applies
    if weighting == "uniform":
        return sigma
    logit = torch.log(sigma / (1 - sigma))  # logit-normal(0, 1): the quantile is Phi(logit)
    return 0.5 * (1 + torch.erf(logit / math.sqrt(2)))


class WarmStart:
    """Forces each token's expert to its cell and collects the gate's cross-entropy to it."""

    def __init__(self, rsr, layout: str, weighting: str, shift: float) -> None:
        cfg = rsr.config
        check_layout(layout, cfg.experts, cfg.steps)
        self.rsr, self.layout, self.weighting, self.shift = rsr, layout, weighting, shift
        self.experts, self.steps = cfg.experts, cfg.steps
        self._losses: list[torch.Tensor] = []

    def cell(self, timestep: torch.Tensor, step: int) -> torch.Tensor:
        """(B,) expert of each sample's cell at recursion step `step`."""
        bands = self.experts if self.layout == "band" else self.experts // self.steps
        band = (noise_quantile(timestep, self.weighting, self.shift) * bands).long().clamp(max=bands - 1)
        return band if self.layout == "band" else step * bands + band

    @contextlib.contextmanager
    def forcing(self) -> Iterator["WarmStart"]:
        """Within the block, every RSR layer's routing is the cell assignment."""
        self._losses = []

        def target(value: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            return self.cell(ctx.timestep.to(value.device), ctx.step)[:, None].expand(value.shape[:2])  # (B, N)

        def learn(logits: torch.Tensor, ctx: HookContext) -> None:
            goal = target(logits, ctx)
            self._losses.append(F.cross_entropy(logits.flatten(0, 1).float(), goal.reshape(-1)))

        def force(expert: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            return target(expert, ctx)

        with self.rsr.hooks.hooks({hook_name("*", "logits", "*"): learn, hook_name("*", "expert", "*"): force}):
            yield self

    def gate_loss(self) -> torch.Tensor:
        """Mean cross-entropy of the gate's logits to the cells, over the layers and steps just run."""
        return torch.stack(self._losses).mean()

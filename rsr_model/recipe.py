"""The RSR stage's routing recipe: what routes the tokens at each training step.

Why a recipe: a gate that starts near uniform sends every token to a random expert under hard
routing, so all experts see the same data, get the same expected gradient and stay alike; the gate
then has nothing to choose between (docs/specialization.md measured gate entropy 0.9996 of its
maximum after the paper's RSR stage). The warm start (warm_start.py) breaks that symmetry by
planting an assignment; this recipe lets the assignment be learned instead. Each phase is a flag
and any may be left out:

    steps [0, upcycle)            upcycle  every token to expert 0: one LoRA learns the task first
    at step `upcycle`                      expert 0 (and its optimizer moments) copied into every
                                           expert, plus noise of `upcycle_noise` x its spread, so the
                                           experts start useful and the zero-initialised B no longer
                                           makes the recursion second order in the adapters
    [upcycle, upcycle + soft)     soft     the adapters' output is the gate's probability-weighted
                                           mixture of every expert: the gate gets the loss's own
                                           gradient and experts drift apart along its soft partition
    the rest                      hard     one expert per token (the config's routing rule); with
                                           `anneal`, the Gumbel noise of the draw falls linearly from
                                           1 (the paper's draw) to 0 (the argmax that sampling uses),
                                           so experts end training under the routing they sample with

`train_routing="random"` is the control: every token of every step goes to a uniformly random
expert for the whole stage (the gate is never used), so no expert can specialise by design; the
routing value of such a model is the null the learned one is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError

TRAIN_ROUTINGS = ("gate", "random")


@dataclass(frozen=True)
class Phase:
    """How one training step routes: `routing` as RunState reads it, and the draw's noise scale."""

    name: str  # "upcycle", "soft", "hard" or "random"
    routing: str | None  # RunState.routing: "first", "soft", "random" or None (the gate draws)
    temperature: float = 1.0


@dataclass(frozen=True)
class Recipe:
    upcycle_steps: int = 0
    upcycle_noise: float = 0.01
    soft_steps: int = 0
    anneal: bool = False
    train_routing: str = "gate"

    @classmethod
    def of_stage(cls, settings: dict, total: int) -> "Recipe":
        """The recipe of an RSR stage of `total` steps from flag values (a phase left at None lasts a quarter
        of the stage): what training runs, and what a caller checks before training."""
        quarter = total // 4
        return cls(**{k: (quarter if v is None and k in ("upcycle_steps", "soft_steps") else v)
                      for k, v in settings.items()})

    def check(self, total: int, has_gate: bool) -> None:
        """Fail before training if the phases cannot run in a stage of `total` steps."""
        if self.train_routing not in TRAIN_ROUTINGS:
            raise ConfigError(f"train routing must be one of {', '.join(TRAIN_ROUTINGS)}, got {self.train_routing!r}")
        learned = self.upcycle_steps or self.soft_steps or self.anneal
        if learned and not has_gate:
            raise ConfigError("upcycling, a soft phase and annealing route between experts, and this run has no gate")
        if learned and self.train_routing == "random":
            raise ConfigError("the random-routing control trains under random routing throughout; it takes no "
                              "upcycling, soft phase or annealing")
        if self.upcycle_steps + self.soft_steps >= total:
            raise ConfigError(f"upcycling ({self.upcycle_steps}) and the soft phase ({self.soft_steps}) leave no "
                              f"hard-routing step in the RSR stage's {total} steps")

    def phase(self, step: int, total: int) -> Phase:
        """The routing of 0-based RSR step `step` of `total`."""
        if self.train_routing == "random":
            return Phase("random", "random")
        if step < self.upcycle_steps:
            return Phase("upcycle", "first")
        start = self.upcycle_steps + self.soft_steps
        if step < start:
            return Phase("soft", "soft")
        if not self.anneal:
            return Phase("hard", None)
        return Phase("hard", None, max(0.0, 1.0 - (step - start) / max(1, total - 1 - start)))

    def upcycles_at(self, step: int) -> bool:
        return self.train_routing == "gate" and self.upcycle_steps > 0 and step == self.upcycle_steps


@torch.no_grad()
def upcycle(rsr, optimizer: torch.optim.Optimizer, noise: float, seed: int) -> None:
    """Copy expert 0 of every layer into all its experts, with Gaussian noise of `noise` x the spread
    of each factor; expert 0's optimizer moments go with it, so Adam's step sizes stay calibrated."""
    gen = torch.Generator().manual_seed(seed)
    state = getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps the optimizer
    for layer in rsr.values():
        for p in (layer.experts.A, layer.experts.B):
            first = p[0].detach().clone()  # (D, 3r) or (3, r, Do)
            jitter = torch.randn(p.shape, generator=gen).to(p) * (noise * float(first.float().std()))
            p.copy_(first.expand_as(p) + jitter)
            for moment in state.get(p, {}).values():
                if torch.is_tensor(moment) and moment.shape == p.shape:
                    moment.copy_(moment[:1].expand_as(moment))

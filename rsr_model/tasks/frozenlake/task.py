"""The task class of `frozenlake`: planning in visual latents (the paper's FrozenLake
experiment), 4x4 maps; `frozenlake-6x6` and `frozenlake-8x8` are the same at larger sizes.

One training example is a random map's shortest plan (maps.py): the
frames of the agent after 0..T actions, padded to the horizon with the last frame, and the
actions padded with NO_ACTION. The whole model (encoder, stack, RSR, decoder) trains in one
stage, from scratch: the frames decoded from every latent step are matched to the true ones
(pixel MSE, the agent's path weighted up since the agent is a few pixels of the frame) while
the true action forces the step's expert, and the gate's logits get a cross-entropy against
the action at every token (model.py). `--mode no_modulation` trains the
baseline without routing (one shared adapter, the action as an embedding).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import config
from ...install import RSR
from ..base import Task, TaskCommands, TaskError
from . import maps as lake
from .model import NO_ACTION, FrozenLakeNet, decode, rollout

PATH_WEIGHT = 10.0  # extra pixel-loss weight on the cells the agent visits


def to_model(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(frames).float() / 127.5 - 1
    return x.movedim(-1, -3)


class FrozenLake(Task):
    name = "frozenlake"
    backbone_class = "FrozenLakeNet"
    conditioning = "map"
    two_stage = False
    trains_base_with_rsr = True  # nothing is pretrained: encoder, stack, RSR and decoder learn together
    default_steps = {"rsr": 3000}
    batch_size = 32
    lr = {"rsr": 1e-3}
    size = 4
    encoder_blocks = 2  # RSR goes on the block after them
    frozen = 0.7  # share of frozen cells in generated maps (the rest are holes)
    n_eval = 200  # held-out maps

    @property
    def horizon(self) -> int:
        """Most actions a plan may take: the Manhattan distance S->G plus one detour of two."""
        return 2 * (self.size - 1) + 2

    def default_rsr(self) -> config.RSRConfig:
        # L = horizon + 1 latent steps (frames 0..horizon); the true action picks the expert in
        # training, so the balance loss has nothing to balance.
        return config.RSRConfig(num_experts=4, latent_steps=self.horizon + 1, rank=16,
                                target_layers=[self.encoder_blocks], gate_hidden=128, balance_weight=0.0)

    def new_backbone(self) -> nn.Module:
        return FrozenLakeNet(map_size=self.size, encoder_blocks=self.encoder_blocks)

    def backbone_from_config(self, config: dict[str, Any]) -> nn.Module:
        return FrozenLakeNet(**config)  # the project's own net, not a diffusers class

    # --- data -------------------------------------------------------------------------------
    @cached_property
    def eval_maps(self) -> list[lake.Map]:
        return lake.split_maps(self.size, self.frozen, self.n_eval, self.horizon)

    @cached_property
    def training_maps(self) -> lake.TrainingMaps:
        return lake.TrainingMaps(self.size, self.frozen, self.horizon, held_out=self.eval_maps)

    def padded(self, episodes: Sequence[lake.Episode]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames (B, L, 3, H, W) in [-1, 1] (the last frame repeated) and actions (B, L) (NO_ACTION after the plan)."""
        L = self.horizon + 1
        frames = np.stack([np.concatenate([ep.frames, np.repeat(ep.frames[-1:], L - len(ep.frames), 0)])
                           for ep in episodes])
        actions = torch.full((len(episodes), L), NO_ACTION, dtype=torch.long)
        for i, ep in enumerate(episodes):
            actions[i, :len(ep.actions)] = torch.as_tensor(ep.actions)
        return to_model(frames), actions

    def batch(self, rng: np.random.Generator, n: int):
        frames, actions = self.padded([self.training_maps.draw(rng) for _ in range(n)])
        return frames, {"actions": actions}

    def training_loss(self, model: nn.Module, rsr: RSR | None, x0: torch.Tensor, cond: dict[str, torch.Tensor],
                      seed: int) -> torch.Tensor:
        net = getattr(model, "module", model)  # the plan runs through hooks, not through a DDP wrapper
        actions = cond["actions"]
        plan = rollout(net, rsr, x0[:, 0], actions)
        frames = decode(net, plan.latents)
        agent = torch.tensor(lake.COLOURS["agent"], dtype=x0.dtype, device=x0.device) / 127.5 - 1
        on_path = ((x0 - agent[:, None, None]).abs().sum(2) < 1e-3).any(1, keepdim=True)  # (B, 1, H, W)
        weight = 1 + PATH_WEIGHT * on_path[:, :, None].to(x0.dtype)
        frame_loss = (weight * (frames - x0) ** 2).mean()
        valid = actions >= 0
        logits = plan.logits[valid]  # (steps, N, K)
        targets = actions[valid][:, None].expand(logits.shape[:2])
        action_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self.last_parts = {"frame": frame_loss.item(), "action": action_loss.item(),
                           "agreement": plan.agreement[valid].mean().item()}
        return frame_loss + action_loss

    # --- command line and traces --------------------------------------------------------------
    @classmethod
    def item_flags(cls, command: str) -> tuple[str, ...]:
        return {"sample": ("--map",), "record": ("--maps",)}[command]

    @classmethod
    def arguments(cls, command: str) -> list[tuple[str, dict[str, Any]]]:
        if command == "sample":
            return [("--map", dict(action="append", default=[], help="FrozenLake map like SFFF/FHFH/FFFH/HFFG "
                                   "(frozenlake presets; repeatable): plan from its start"))]
        return [("--maps", dict(help="frozenlake checkpoints: a file of maps (one per line, rows joined by '/') "
                                "or one map"))]

    def commands(self) -> TaskCommands:
        from . import commands  # plans, not images: the strip of decoded frames and the plan trace

        return commands

    def token_grid(self, transformer: nn.Module) -> tuple[int, int]:
        return self.size, self.size  # one token per map cell

    def condition(self, items: Sequence) -> dict[str, torch.Tensor]:
        raise TaskError(f"preset {self.name!r} plans from maps, it does not sample images: pass --map")

    null_condition = condition

    def parse_items(self, items: Sequence[str]) -> list[lake.Map]:
        maps = [lake.parse_map(text) for text in items]
        wrong = [lake.map_text(m) for m in maps if len(m) != self.size]
        if wrong:
            raise lake.MapError(f"preset {self.name!r} plans on {self.size}x{self.size} maps, got {wrong[0]}")
        return maps

    def describe(self, item: lake.Map) -> dict:
        """The map, its shortest plan and the true action per latent step (the probes' labels)."""
        actions = lake.shortest_path(item) or []
        names = [lake.ACTIONS[a] for a in actions]
        steps = {f"action_step_{l}": names[l] if l < len(names) else "none" for l in range(self.horizon + 1)}
        return {"map": lake.map_text(item), "shortest_plan": names, "attributes": steps}


    # --- evaluation ---------------------------------------------------------------------------
    def plan_figures(self, transformer: nn.Module, rsr: RSR, n: int) -> dict[str, Any]:
        """The judge's rates on the first n held-out maps (evaluation/planning.py collects them)."""
        from .judge import judge, make_plans, summarize

        plans = make_plans(self, transformer, rsr, self.eval_maps[:n])
        verdicts = [judge(p) for p in plans]
        return {"size": f"{self.size}x{self.size}", **summarize(verdicts, plans),
                "success_per_map": [bool(v.success_env) for v in verdicts]}


class FrozenLake6(FrozenLake):
    name = "frozenlake-6x6"
    size = 6
    default_steps = {"rsr": 3000}


class FrozenLake8(FrozenLake):
    name = "frozenlake-8x8"
    size = 8
    default_steps = {"rsr": 4000}

"""The surface every training preset offers."""

from __future__ import annotations

import argparse
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from cli_common.errors import UserError

from ..config import RSRConfig


class TaskError(UserError):
    """Bad input for a task (data folder, pretrained folder, prompt); one line for users."""


# The command-line flags that carry each conditioning's items, per command: `sample` is
# `python -m rsr_model sample`, `record` is `python -m probes.record`. A task with another
# source (FrozenLake's maps) overrides `Task.item_flags` and adds its flags in `Task.arguments`.
ITEM_FLAGS = {"text": {"sample": ("--prompt", "--prompts-file"), "record": ("--prompts",)},
              "class": {"sample": ("--label", "--prompts-file"), "record": ("--prompts",)}}

Model = tuple  # (task, transformer, RSR or None, checkpoint dict), as `rsr_model.sample.load_model` returns it


class TaskCommands(Protocol):
    """The bodies of `sample` and `record` for a task whose checkpoints make something other than
    diffusion samples (FrozenLake: plans). Both get the parsed flags and the loaded checkpoint."""

    def sample(self, args: argparse.Namespace, model: Model) -> None: ...

    def record(self, args: argparse.Namespace, model: Model) -> None: ...


class Task:
    name: str = ""
    backbone_class: str = ""  # the diffusers transformer class the preset trains
    conditioning: str = "text"  # "text" (prompts), "class" (integer labels) or "map" (FrozenLake maps)
    two_stage: bool = True  # train the base first (tiny backbones), or fine-tune RSR only (pretrained)
    trains_base_with_rsr: bool = False  # one stage in which the backbone learns together with RSR (frozenlake)
    default_steps: dict[str, int] = {"base": 1000, "rsr": 300}
    batch_size: int = 32
    lr: dict[str, float] = {"base": 1e-3, "rsr": 1e-3}
    gate_lr_scale: float = 1.0  # the gate's learning rate relative to the experts' (RSR stage)
    warm_start: str = "none"  # expert warm start of the RSR stage (rsr_model/warm_start.py)
    warm_start_steps: int | None = None  # None: the first quarter of the RSR stage
    rsr_ema_decay: float = 0.0  # EMA of the experts and gate in the RSR stage (0 = off)
    # the RSR stage's routing recipe (rsr_model/recipe.py): none of it by default (the paper's hard Gumbel)
    upcycle_steps: int | None = 0  # None: the first quarter of the RSR stage
    upcycle_noise: float = 0.01
    soft_steps: int | None = 0  # None: the second quarter
    anneal: bool = False
    train_routing: str = "gate"
    weighting: str = "logit_normal"
    shift: float = 1.0
    one_stage: str = "fine-tunes RSR on pretrained weights"  # why a preset without two_stage has no base stage
    takes_folders: bool = False  # built from local folders (--pretrained, --data)

    def default_rsr(self) -> RSRConfig:
        raise NotImplementedError

    def __init__(self, **_: object) -> None:
        pass

    def new_backbone(self) -> nn.Module:
        """A freshly initialised backbone (presets that train their own base)."""
        raise NotImplementedError

    def build_backbone(self, backbone: dict | None = None) -> nn.Module:
        """A fresh backbone, or the one a checkpoint describes ({"class", "config"})."""
        if backbone is None:
            return self.new_backbone()
        if backbone.get("class") != self.backbone_class:
            raise TaskError(f"checkpoint holds a {backbone.get('class')}, preset {self.name!r} uses a "
                            f"{self.backbone_class}")
        return self.backbone_from_config(backbone["config"])

    def backbone_from_config(self, config: dict[str, Any]) -> nn.Module:
        """The backbone a checkpoint's config describes (a diffusers class by default)."""
        import diffusers

        return getattr(diffusers, self.backbone_class).from_config(config)

    def backbone_record(self, transformer: nn.Module) -> dict[str, Any]:
        return {"class": type(transformer).__name__, "config": dict(transformer.config)}

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clean training inputs x0 (n, C, H, W) and the transformer's conditioning kwargs."""
        raise NotImplementedError

    def stage_batch(self, stage: str, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training batch of `stage` ("base" or "rsr"): `batch` unless the stages train on different
        data (a shifted task's base learns the plain task, its RSR stage the shift)."""
        return self.batch(rng, n)

    def training_loss(self, model: nn.Module, rsr, x0: torch.Tensor, cond: dict[str, torch.Tensor],
                      seed: int) -> torch.Tensor:
        """The loss of one batch from `batch`; by default flow matching (MSE of the predicted velocity)."""
        from ..flow import training_pair

        xt, t, target = training_pair(x0, torch.Generator().manual_seed(seed), self.weighting, self.shift)
        pred = model(hidden_states=xt, timestep=t.to(x0.device), **cond).sample
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def condition(self, items: Sequence) -> dict[str, torch.Tensor]:
        """Conditioning kwargs for prompts (text tasks) or labels (class tasks)."""
        raise NotImplementedError

    def null_condition(self, n: int) -> dict[str, torch.Tensor]:
        """The unconditional branch of classifier-free guidance."""
        raise NotImplementedError

    def latent_shape(self, transformer: nn.Module) -> tuple[int, int, int]:
        c = transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def token_grid(self, transformer: nn.Module) -> tuple[int, int]:
        """(rows, cols) of the vision tokens at the RSR layer (the trace's token axis, row-major)."""
        _, H, W = self.latent_shape(transformer)
        patch = transformer.config.patch_size
        return H // patch, W // patch

    def to_images(self, x0: torch.Tensor) -> np.ndarray:
        """Model space (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
        x = ((x0.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        x = x.transpose(0, 2, 3, 1)
        return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x

    def encoder_identity(self) -> dict | None:
        return None

    def parse_items(self, items: Sequence[str]) -> list:
        """Command-line prompts/labels to what `condition` takes."""
        return list(items)

    def describe(self, item) -> dict[str, Any]:
        """Ground truth of a conditioning item, for traces (e.g. the scene a caption describes)."""
        return {}

    # --- command line ---------------------------------------------------------------------
    @classmethod
    def item_flags(cls, command: str) -> tuple[str, ...]:
        """The flags of `command` ("sample" or "record") that carry this task's items, the main one first."""
        return ITEM_FLAGS[cls.conditioning][command]

    @classmethod
    def arguments(cls, command: str) -> list[tuple[str, dict[str, Any]]]:
        """Flags this task adds to `command` beyond the shared ones, as (flag, `add_argument` options);
        the parsers add every task's, so they never name a task."""
        return []

    def flag_rules(self) -> list:
        """The training flags this task refuses or constrains, as `rsr_model.arguments.RULES` rows
        (flags, applies(plan), reason(plan)); checked before the shared rows."""
        return []

    @classmethod
    def inapplicable_flags(cls, command: str) -> dict[str, str]:
        """Flags of `command` ("sample" or "record") that this task's own body would ignore, with why."""
        return {}

    def commands(self) -> TaskCommands | None:
        """Own `sample` and `record` bodies; None: the diffusion sampler's (`rsr_model/__main__.py`
        draws images, `probes/record.py` records the sampler's routing)."""
        return None

    # --- evaluation -----------------------------------------------------------------------
    def plan_figures(self, transformer: nn.Module, rsr, n: int) -> dict[str, Any]:
        """`evaluate --planning`: the rates of the task's own judge on its first n held-out problems,
        with "size" (the row label) and "success_per_map" (for the paired test). Only tasks that plan have it."""
        raise TaskError(f"preset {self.name!r} has no held-out maps to plan on "
                        f"(planning figures are for presets that plan, like frozenlake)")

"""Sampling from a checkpoint: Euler flow-matching steps with classifier-free guidance.

    python -m rsr_model sample --ckpt sd3_rsr.pt --prompt "two red circles left of a blue square" \
        --seed 0 --steps 28 --out out.png

Sample j of a call uses noise from seed + j, so an image does not depend on what else is
in the batch. Several prompts come from repeated --prompt or --prompts-file (one per line);
for class-conditioned presets, --label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint
from .flow import SamplerStep
from .flow import sample as flow_sample
from .install import RSR
from .tasks import Task, TaskError, get_task
from .train import build_from_checkpoint


def load_model(path: str | Path) -> tuple[Task, nn.Module, RSR | None, dict[str, Any]]:
    """(task, transformer in eval mode, RSR or None, checkpoint dict) from a checkpoint file."""
    ckpt = load_checkpoint(path)
    try:
        task = get_task(ckpt.get("preset", "?"), pretrained=ckpt.get("pretrained"), data=None)
    except TaskError as e:
        raise CheckpointError(f"{path}: {e}") from None
    transformer, rsr = build_from_checkpoint(task, ckpt)
    transformer.eval()
    return task, transformer, rsr, ckpt


def initial_noise(shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def make_denoiser(transformer: nn.Module, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None,
                  guidance: float, before: Callable[[int, torch.Tensor], None] | None = None):
    """Velocity function for `flow.sample`; with guidance, one batched call on [uncond; cond].

    `before(i, t)` runs before each transformer call (recorders set hook context there).
    """
    def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        if uncond is None or guidance == 1.0:
            if before:
                before(i, t)
            return transformer(hidden_states=x, timestep=t, **cond).sample
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        if before:
            before(i, torch.cat([t, t]))
        v_u, v_c = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), **both).sample.chunk(2)
        return v_u + guidance * (v_c - v_u)
    return denoise


@torch.no_grad()
def generate(task: Task, transformer: nn.Module, items: Sequence, seeds: Sequence[int], steps: int = 28,
             guidance: float = 3.0, before: Callable[[int, torch.Tensor], None] | None = None,
             on_step: Callable[[SamplerStep], None] | None = None) -> torch.Tensor:
    """x0 (B, C, H, W) in model space for conditioning items (prompts or labels), one per seed.

    `before` and `on_step` are the denoiser's and the sampler's callbacks (see make_denoiser, flow.sample).
    """
    cond = task.condition(list(items))
    uncond = task.null_condition(len(items)) if guidance != 1.0 else None
    noise = initial_noise(task.latent_shape(transformer), seeds)
    return flow_sample(make_denoiser(transformer, cond, uncond, guidance, before), noise, steps, task.shift, on_step)


def image_grid(images: np.ndarray, cols: int | None = None, scale: int = 4) -> np.ndarray:
    """uint8 (B, H, W, 3) -> one uint8 grid image, upscaled (nearest) for viewing."""
    B, H, W, C = images.shape
    cols = cols or min(B, 8)
    rows = -(-B // cols)
    grid = np.zeros((rows * (H + 2), cols * (W + 2), C), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = im
    return grid.repeat(scale, 0).repeat(scale, 1)


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a PNG whole or not at all (a temporary file beside it, then a rename)."""
    import io

    from PIL import Image

    from cli_common.outputs import write_atomic

    data = io.BytesIO()
    Image.fromarray(image).save(data, format="PNG")
    write_atomic(path, data.getvalue())

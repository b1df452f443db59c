"""Rectified-flow (flow matching) training targets and Euler sampling, as SD3 trains.

Noise level sigma in [0, 1]: x_t = (1 - sigma) x_0 + sigma * noise, the transformer predicts
the velocity noise - x_0, and the model's timestep is sigma * 1000 (diffusers' convention).
Training sigmas come from diffusers' `compute_density_for_timestep_sampling` (logit-normal by
default, as in SD3; "uniform" also); sampling uses `FlowMatchEulerDiscreteScheduler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

NUM_TRAIN_TIMESTEPS = 1000
WEIGHTINGS = ("logit_normal", "uniform")


def make_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)


def training_pair(x0: torch.Tensor, generator: torch.Generator, weighting: str = "logit_normal",
                  shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x_t, timestep (B,), target velocity) for clean inputs x0 (B, C, H, W).

    `shift` maps sigma as the sampling scheduler does (sigma' = s*sigma / (1 + (s-1)*sigma)), so
    a model is trained on the noise levels it will be sampled at (SD3 uses shift 3).
    """
    B = x0.shape[0]
    scheme = "logit_normal" if weighting == "logit_normal" else "none"  # "none" is uniform in diffusers
    sigma = compute_density_for_timestep_sampling(scheme, B, logit_mean=0.0, logit_std=1.0,
                                                  generator=generator).to(x0.device, x0.dtype)  # (B,)
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    s = sigma.view(B, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma * NUM_TRAIN_TIMESTEPS, noise - x0


Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class SamplerStep:
    """One Euler step as `on_step` sees it: after the denoiser call, before x moves on."""

    index: int  # sampler step 0..steps-1
    t: torch.Tensor  # (B,) model timestep values
    sigma: float  # noise level of x
    x: torch.Tensor  # x_t the denoiser saw
    v: torch.Tensor  # the velocity it predicted
    denoise: Denoiser  # for further calls at this x_t (early-exit decodes, interventions)


@torch.no_grad()
def sample(denoise: Denoiser, noise: torch.Tensor, steps: int, shift: float = 1.0,
           on_step: Callable[[SamplerStep], None] | None = None) -> torch.Tensor:
    """Euler integration from noise (sigma=1) to x_0. `denoise(x, t (B,), i)` returns the velocity;
    `on_step` sees every step (recorders write traces there, causal probes compare velocities)."""
    sched = make_scheduler(shift)
    sched.set_timesteps(steps, device=noise.device)
    x = noise
    for i, t in enumerate(sched.timesteps):
        tt = t.expand(x.shape[0]).to(x.dtype)
        v = denoise(x, tt, i)
        if on_step is not None:
            on_step(SamplerStep(i, tt, float(sched.sigmas[i]), x, v, denoise))
        x = sched.step(v, t, x).prev_sample
    return x

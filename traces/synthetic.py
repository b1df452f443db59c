"""Synthetic but realistic routing data, for tests, size calibration and benchmarks.

Real RSR gates route spatially coherent regions of the token grid to the same expert, and the
assignment drifts slowly across recursion steps and diffusion timesteps. Random uniform ids
would make every compressor look bad and every size estimate pessimistic, so measurements in
this package use this generator: a coarse random expert map per (sample, layer), upsampled to
the token grid, re-drawn in a few cells per step and timestep, with a fraction of isolated
noisy tokens.
"""

from __future__ import annotations

import numpy as np


def coherent_routing(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    n_experts: int = 8,
    grid: int | None = None,
    cell: int = 8,
    noise: float = 0.08,
    drift: float = 0.05,
) -> np.ndarray:
    """Expert ids of shape `shape` whose last axis is a square token grid (row-major).

    The second-to-last axis is treated as the recursion step (drift between neighbours);
    all leading axes are independent. Returns uint8.
    """
    *lead, n_steps, n_tokens = shape
    side = grid or int(round(np.sqrt(n_tokens)))
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} tokens is not a square grid")
    coarse_side = max(1, side // cell)
    n_lead = int(np.prod(lead)) if lead else 1
    base = rng.integers(0, n_experts, size=(n_lead, coarse_side, coarse_side), dtype=np.uint8)
    out = np.empty((n_lead, n_steps, side, side), dtype=np.uint8)
    rep = -(-side // coarse_side)
    for s in range(n_steps):
        if s:
            flip = rng.random(base.shape) < drift
            base = np.where(flip, rng.integers(0, n_experts, size=base.shape, dtype=np.uint8), base)
        up = np.repeat(np.repeat(base, rep, axis=1), rep, axis=2)[:, :side, :side]
        out[:, s] = up
    noisy = rng.random(out.shape) < noise
    out[noisy] = rng.integers(0, n_experts, size=int(noisy.sum()), dtype=np.uint8)
    return out.reshape(*lead, n_steps, n_tokens)


def gate_probs(rng: np.random.Generator, expert: np.ndarray, n_experts: int) -> np.ndarray:
    """Softmax-like float16 probabilities that peak at the chosen expert."""
    logits = rng.normal(0.0, 1.0, size=expert.shape + (n_experts,)).astype(np.float32)
    np.put_along_axis(logits, expert[..., None].astype(np.int64), 4.0, axis=-1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float16)


def cell_routing(seed: int, batch_start: int, t: int, shape: tuple[int, ...], n_experts: int = 8) -> np.ndarray:
    """Deterministic coherent ids for one (batch, timestep) write: lets a test regenerate
    exactly what a (possibly killed) writer process wrote."""
    return coherent_routing(np.random.default_rng([seed, batch_start, t]), shape, n_experts)


def write_synthetic(path, layout, n_samples: int, batch: int, seed: int = 0, on_step=None,
                    images: bool = True, **writer_kwargs):
    """Write a full synthetic sampling trace of `layout` (routing from `cell_routing`, plus
    probabilities, latents and images if the layout asks for them). `on_step(b0, t)` is
    called after each flushed step. Returns the path."""
    from .layout import SampleTable
    from .writer import SamplingWriter

    nb, nt, nl, ns, nn = layout.cell_shape()
    k = layout.n_experts
    table = SampleTable(prompt=[f"prompt {i}" for i in range(n_samples)], seed=list(range(n_samples)),
                        label=[i % 10 for i in range(n_samples)],
                        scene=[{"objects": [{"id": i, "pos": [i % 4, i // 4]}]} for i in range(n_samples)])
    rng = np.random.default_rng(seed + 1)
    with SamplingWriter(path, layout, table, **writer_kwargs) as w:
        for b0 in range(0, n_samples, batch):
            b = min(batch, n_samples - b0)
            w.begin_batch(b)
            for t in range(nt):
                e = cell_routing(seed, b0, t, (b, nb, nl, ns, nn), k)
                extra = {}
                if layout.store_prob:
                    extra["prob"] = gate_probs(rng, e, k)
                if layout.latent_tokens is not None:
                    extra["latents"] = rng.normal(size=(b, nb, nl, ns, len(layout.latent_tokens),
                                                        layout.latent_dim)).astype(np.float16)
                if layout.image_shape is not None and layout.decode_steps and images:
                    extra["decoded"] = smooth_images(rng, (b, len(layout.decoded_branches), nl, ns), layout.image_shape)
                w.write_timestep(t, e, **extra)
                if on_step is not None:
                    on_step(b0, t)
            if layout.image_shape is not None and images:
                w.write_final(smooth_images(rng, (b,), layout.image_shape))
    return path


def smooth_images(rng: np.random.Generator, lead: tuple[int, ...], hwc: tuple[int, int, int]) -> np.ndarray:
    """uint8 images with smooth gradients plus sensor-like noise (compress like real decodes,
    unlike uniform noise)."""
    h, w, c = hwc
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    n = int(np.prod(lead))
    a = rng.random((n, 1, 1, c))
    b = rng.random((n, 1, 1, c))
    img = 255 * (a * yy[None, :, :, None] + b * xx[None, :, :, None]) / np.maximum(a + b, 1e-6)
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8).reshape(*lead, h, w, c)

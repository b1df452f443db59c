"""scikit-learn's bundled 8x8 digits as a class-conditioned image set.

Why: the class-conditioned DiT experiment needs real labelled images that ship with
an installed package (no download).  The 1797 images (0-16 grey levels) are upsampled
bilinearly to the model's resolution and scaled to [-1, 1] (0 -> -1 background, 16 -> 1).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np

NUM_CLASSES = 10
N_TEST = 297  # the last 297 images form a fixed held-out split (1500 train)


@lru_cache(maxsize=8)
def _load(size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).numpy()  # (N,1,S,S) in [-1,1]
    if channels == 3:
        x = np.repeat(x, 3, axis=1)
    x.setflags(write=False)
    y = d.target.astype(np.int64)
    y.setflags(write=False)
    return x, y


def load_digits_images(size: int = 16, channels: int = 1, split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, C, size, size) in [-1,1], labels int64 (N,)); read-only arrays,
    cached per process.  split: "all" (1797), "train" (first 1500) or "test" (last 297)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    x, y = _load(int(size), int(channels))
    if split == "all":
        return x, y
    if split == "train":
        return x[:-N_TEST], y[:-N_TEST]
    if split == "test":
        return x[-N_TEST:], y[-N_TEST:]
    raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")


def sample_batch(rng: np.random.Generator, batch_size: int, size: int = 16, channels: int = 1,
                 split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """A random batch (with replacement), deterministic given the generator's state:
    (images float32 (B, C, size, size) in [-1,1], labels int64 (B,))."""
    x, y = load_digits_images(size, channels, split)
    idx = rng.integers(len(y), size=batch_size)
    return x[idx].copy(), y[idx].copy()


def batches(batch_size: int, seed: int = 0, size: int = 16, channels: int = 1,
            split: str = "train") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled epochs (without replacement within an epoch), deterministic by seed."""
    x, y = load_digits_images(size, channels, split)
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(len(y))
        for s in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[s:s + batch_size]
            yield x[idx].copy(), y[idx].copy()

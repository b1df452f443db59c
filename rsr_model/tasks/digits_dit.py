"""`dit-digits`: class-conditioned DiT (diffusers `DiTTransformer2DModel`) with RSR on
self-attention, on scikit-learn's bundled 8x8 digits upsampled to 16x16 — the paper's
class-conditioned experiment in small. Label 10 is DiT's null class for guidance.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import config
from ..backbones import tiny_dit
from ..data import digits
from .base import Task, TaskError

NUM_CLASSES = 10


class DigitsDiT(Task):
    name = "dit-digits"
    backbone_class = "DiTTransformer2DModel"
    conditioning = "class"
    two_stage = True
    default_steps = {"base": 1500, "rsr": 400}
    batch_size = 64
    lr = {"base": 1e-3, "rsr": 1e-3}

    def default_rsr(self) -> config.RSRConfig:
        return config.tiny(target_layers=[2])

    def new_backbone(self) -> nn.Module:
        return tiny_dit(num_layers=6, num_embeds_ada_norm=NUM_CLASSES)

    def batch(self, rng: np.random.Generator, n: int):
        x, y = digits.sample_batch(rng, n, size=16, channels=1)
        # DiT drops labels to the null class itself in train mode (class_dropout_prob 0.1).
        return torch.from_numpy(x), self.condition(y.tolist())

    def condition(self, items: Sequence[int]):
        return {"class_labels": torch.as_tensor(list(items), dtype=torch.long)}

    def null_condition(self, n: int):
        return {"class_labels": torch.full((n,), NUM_CLASSES, dtype=torch.long)}

    def parse_items(self, items: Sequence[str]) -> list[int]:
        try:
            labels = [int(i) for i in items]
        except ValueError:
            raise TaskError(f"dit-digits takes class labels 0-9, got {list(items)}") from None
        bad = [i for i in labels if not 0 <= i < NUM_CLASSES]
        if bad:
            raise TaskError(f"class labels must be in 0-{NUM_CLASSES - 1}, got {bad}")
        return labels

    def describe(self, item: int) -> dict:
        return {"label": int(item)}

"""`tiny`: a small SD3-architecture transformer on the embedded coloured-shapes captions.

Pixel space (no VAE), 24x24 RGB, patch 2 (144 vision tokens). Measured on 2 CPU cores:
32x32 with patch 4 (64 tokens) trains fastest but its samples stay scattered 4x4 blocks after
1500 steps; 16x16 with patch 2 gives coherent but tiny objects; 24x24 with patch 2 gives
compact, correctly coloured objects after about 1000 steps. Text: the frozen MiniLM encoder shipped in a
PyPI package (token states as `encoder_hidden_states`, pooled embedding as
`pooled_projections`); 10% of captions are dropped to "" so guidance works.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import config
from ..backbones import tiny_sd3
from ..data import shapes
from .base import Task, TaskError

MAX_TOKENS = 16


class TinySD3Shapes(Task):
    name = "tiny"
    backbone_class = "SD3Transformer2DModel"
    conditioning = "text"
    two_stage = True
    default_steps = {"base": 1800, "rsr": 400}
    batch_size = 32
    lr = {"base": 1e-3, "rsr": 1e-3}
    caption_dropout = 0.1
    size, patch = 24, 2  # image side and patch side: (size / patch)^2 vision tokens

    def __init__(self, **_: object) -> None:
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            from ..text_encoder import TextEncoder

            self._encoder = TextEncoder()
        return self._encoder

    # The RSR-stage recipe, chosen by measurement (docs/specialization.md): six experts, one per
    # (recursion step, noise half) cell for the first quarter of the stage, then a free gate;
    # balance over the whole recursion so steps may use different experts.
    warm_start = "step-band"

    def default_rsr(self) -> config.RSRConfig:
        return config.tiny(target_layers=[2], num_experts=6, balance_over="recursion")

    def new_backbone(self) -> nn.Module:
        return tiny_sd3(sample_size=self.size, patch_size=self.patch, pos_embed_max_size=self.size // self.patch,
                        num_layers=6, attention_head_dim=32, num_attention_heads=4)

    def batch(self, rng: np.random.Generator, n: int):
        images, captions, _ = shapes.sample_batch(rng, n, size=self.size)
        return self._conditioned(rng, images, captions)

    def _conditioned(self, rng: np.random.Generator, images: np.ndarray, captions: Sequence[str]):
        """(images as a tensor, their conditioning) with each caption dropped to "" at `caption_dropout`
        (the unconditional branch classifier-free guidance needs); every shapes preset's batches end here."""
        drop = rng.random(len(captions)) < self.caption_dropout
        return torch.from_numpy(images), self.condition(["" if d else c for c, d in zip(captions, drop)])

    def condition(self, items: Sequence[str]):
        states, pooled = self.encoder.encode(list(items), max_length=MAX_TOKENS)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def null_condition(self, n: int):
        return self.condition([""] * n)

    def encoder_identity(self) -> dict:
        return self.encoder.identity

    def parse_items(self, items: Sequence[str]) -> list[str]:
        if any(not isinstance(p, str) for p in items):
            raise TaskError("prompts must be text")
        return list(items)

    def describe(self, item: str) -> dict:
        try:
            spec = shapes.parse_caption(item)
        except Exception:
            return {}
        out = {"spec": shapes.spec_text(spec), "caption": item}
        if spec.groups:  # what the probes' MI and linear probes read from /samples/scene
            first = spec.groups[0]
            out["attributes"] = {"colour": str(first.colour), "shape": str(first.shape), "count": str(first.count),
                                 "relation": str(spec.relation) if spec.relation else "none"}
        return out

"""Tiny diffusers backbones built from configs (nothing is downloaded).

`tiny_sd3` is an SD3-architecture (MMDiT) transformer of a few million parameters working in
pixel space; `tiny_dit` is a class-conditioned DiT of the same spirit. Both are the real
diffusers classes, only small.
"""

from __future__ import annotations

from typing import Any

from diffusers import DiTTransformer2DModel, SD3Transformer2DModel


def tiny_sd3(**kw: Any) -> SD3Transformer2DModel:
    """32x32 RGB, patch 2 (256 vision tokens), 6 joint blocks of width 128 (4 heads x 32)."""
    cfg = dict(sample_size=32, patch_size=2, in_channels=3, out_channels=3, num_layers=6,
               attention_head_dim=32, num_attention_heads=4, joint_attention_dim=384,
               caption_projection_dim=128, pooled_projection_dim=384, pos_embed_max_size=32)
    return SD3Transformer2DModel(**{**cfg, **kw})


def tiny_dit(**kw: Any) -> DiTTransformer2DModel:
    """16x16 single-channel images (digits), patch 2 (64 tokens), 6 blocks of width 128, 10 classes."""
    cfg = dict(sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=6,
               attention_head_dim=32, num_attention_heads=4, num_embeds_ada_norm=10)
    return DiTTransformer2DModel(**{**cfg, **kw})

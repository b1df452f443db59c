"""Where RSR goes in each supported diffusers architecture: data, not code paths (pyvene style).

blocks:     attribute holding the list of transformer blocks
attention:  the attention module inside a block whose processor RSR replaces
cond:       the module whose forward output is the gate's conditioning vector c, and whose first
            positional input is the diffusion timestep; "{block}." means per block
joint:      True when the attention is SD3-style joint attention with text tokens
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    blocks: str
    attention: str
    cond: str
    joint: bool


ARCHITECTURES: dict[str, ArchSpec] = {
    # c = temb = timestep embedding + pooled text projection, shared by all blocks.
    "SD3Transformer2DModel": ArchSpec(blocks="transformer_blocks", attention="attn", cond="time_text_embed",
                                      joint=True),
    # c = timestep + class-label embedding of each block's own adaLN-Zero.
    "DiTTransformer2DModel": ArchSpec(blocks="transformer_blocks", attention="attn1", cond="{block}.norm1.emb",
                                      joint=False),
    # Navigation (rsr_model/tasks/frozenlake/model.py): diffusers BasicTransformerBlocks; c = start-frame summary.
    "FrozenLakeNet": ArchSpec(blocks="transformer_blocks", attention="attn1", cond="condition", joint=False),
}

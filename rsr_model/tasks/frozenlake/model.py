"""The navigation model: a frame encoder, a small stack of diffusers attention blocks whose last
block carries RSR, and a Transformer decoder from every latent state back to a frame.

    start frame -> patch embedding (one token per cell) -> encoder blocks -> c = summary
    last block: RSRAttnProcessor with K = 4 experts = the four actions, L = horizon + 1 steps
        h_0 = the normalised tokens;  h_{l+1} = h_l + Attn(dW_{a_l}(h_l))   (layer.py)
    decoder(h_l) -> frame l, the agent after l actions

The RSR layer is the project's own (installed by `install_rsr` on `transformer_blocks[-1].attn1`);
nothing of the mechanism is copied here. Plans are made through its hook points:

- teacher forcing: the expert hook of step l returns the true action a_l for every token
  (-1, "no adapter", after the plan has ended, so the latent stays where it is);
- the gate is trained with a cross-entropy of its logits (logits hook) against a_l at every token,
  and by nothing else (the layer's straight-through path gets detached logits);
- inference: the gate alone chooses. Every token votes with its argmax and the step's action is
  the majority, applied to all tokens (the same one-action-per-step shape as in training);
  `Rollout.agreement` is the share of tokens that voted for it.

Without routing (RSR mode `no_modulation`: one shared adapter, no gate) the same net is the
baseline: `policy` (a gate-shaped MLP on [h_l, c]) predicts the action, and `action_embed`
adds the action to h_l before the shared step, under the same teacher forcing and vote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from ...gate import Gate
from ...hooks import hook_name
from ...install import RSR

NUM_ACTIONS = 4
NO_ACTION = -1  # expert id "no adapter": the latent is left as it is


class StartSummary(nn.Module):
    """c, the gate's conditioning: an MLP of the mean encoded start-frame token.

    Its first argument is the timestep slot RSR's conditioning hook reads for its context;
    there is no diffusion here, so callers pass zeros."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timestep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.mean(1))  # (B, D)


def _blocks(n: int, dim: int, heads: int) -> nn.ModuleList:
    # a 2x GELU feed-forward: the default 8x GEGLU one triples a CPU training step for no gain here
    return nn.ModuleList(BasicTransformerBlock(dim, heads, dim // heads, activation_fn="gelu", ff_inner_dim=2 * dim)
                         for _ in range(n))


class FrameDecoder(nn.Module):
    """Latent state (B, N, D) -> frame (B, 3, H, W) in [-1, 1]: attention blocks, then one patch per token."""

    def __init__(self, map_size: int, cell: int, dim: int, heads: int, depth: int) -> None:
        super().__init__()
        self.map_size, self.cell = map_size, cell
        self.norm_in = nn.LayerNorm(dim)  # h_l accumulates step updates; bring every step to one scale
        self.pos_embed = nn.Parameter(torch.randn(1, map_size ** 2, dim) * 0.02)
        self.blocks = _blocks(depth, dim, heads)
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cell * cell * 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(h) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        patches = self.head(self.norm_out(x))  # (B, N, cell*cell*3)
        n, p = self.map_size, self.cell
        return patches.view(-1, n, n, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, n * p, n * p)


class FrozenLakeNet(nn.Module):
    """Encoder + attention stack (RSR goes on its last block) + frame decoder; see the module doc."""

    def __init__(self, map_size: int = 4, cell: int = 4, dim: int = 64, heads: int = 4, encoder_blocks: int = 2,
                 decoder_blocks: int = 1, policy_hidden: int = 128) -> None:
        super().__init__()
        self.config = dict(map_size=map_size, cell=cell, dim=dim, heads=heads, encoder_blocks=encoder_blocks,
                           decoder_blocks=decoder_blocks, policy_hidden=policy_hidden)
        self.patch_embed = nn.Conv2d(3, dim, cell, stride=cell)  # one token per cell
        self.pos_embed = nn.Parameter(torch.randn(1, map_size ** 2, dim) * 0.02)
        self.transformer_blocks = _blocks(encoder_blocks + 1, dim, heads)
        self.condition = StartSummary(dim)
        self.decoder = FrameDecoder(map_size, cell, dim, heads, decoder_blocks)
        # The baseline without routing only (unused, and untouched by the optimizer, under RSR).
        self.policy = Gate(dim, dim, policy_hidden, NUM_ACTIONS)
        self.action_embed = nn.Embedding(NUM_ACTIONS, dim)

    @property
    def rsr_block(self) -> int:
        """Index of the block that carries RSR: the last one."""
        return len(self.transformer_blocks) - 1

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        """Start frames (B, 3, H, W) in [-1, 1] -> output tokens (B, N, D); plans are read from hooks."""
        x = self.patch_embed(frame).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        for block in self.transformer_blocks[:-1]:
            x = block(x)
        self.condition(x.new_zeros(x.shape[0]), x)  # RSR's conditioning hook hands c to the gate
        return self.transformer_blocks[-1](x)


@dataclass
class Rollout:
    """One plan per start frame. L latent steps; the action of step l leads from frame l to l+1."""

    latents: torch.Tensor  # (B, L, N, D) h_l
    logits: torch.Tensor  # (B, L, N, K) gate logits (the policy's without routing)
    actions: torch.Tensor  # (B, L) long, the action applied at step l (NO_ACTION when none)
    agreement: torch.Tensor  # (B, L) share of tokens whose own choice is the step's action


def majority(choice: torch.Tensor) -> torch.Tensor:
    """(B, N) per-token choices -> (B,) the most common one (ties to the lower id)."""
    return F.one_hot(choice, NUM_ACTIONS).sum(1).argmax(-1)


def rollout(net: nn.Module, rsr: RSR, frame: torch.Tensor, actions: torch.Tensor | None = None) -> Rollout:
    """Run the plan of every start frame through RSR's hook points.

    `actions` (B, L) long: teacher forcing, action l forces step l (NO_ACTION: none). None:
    the gate (or, without routing, the policy) chooses by a majority vote of its tokens.
    """
    layer = rsr.layer(rsr.layer_indices[-1])
    routed, steps = layer.gate is not None, rsr.config.steps
    if actions is not None and tuple(actions.shape) != (frame.shape[0], steps):
        raise ValueError(f"actions must have shape (batch, {steps}), got {tuple(actions.shape)}")
    seen: dict[str, list[Any]] = {"latent": [None] * steps, "logits": [None] * steps, "action": [None] * steps,
                                  "agreement": [None] * steps}

    def step_action(s: int, logits: torch.Tensor) -> torch.Tensor:
        """The action of step s (B,), recorded once, and the share of tokens that chose it."""
        choice = logits.argmax(-1)  # (B, N)
        action = actions[:, s] if actions is not None else majority(choice)
        seen["action"][s] = action
        seen["agreement"][s] = (choice == action[:, None]).float().mean(1)
        return action

    def on_latent(h, ctx):
        seen["latent"][ctx.step] = h
        if routed:
            return None
        # without routing: the policy reads h_l, and the chosen action enters as an embedding
        logits = net.policy(h, layer.cond)
        seen["logits"][ctx.step] = logits
        action = step_action(ctx.step, logits)
        return h + net.action_embed(action.clamp(min=0))[:, None] * (action >= 0)[:, None, None].to(h.dtype)

    def on_logits(logits, ctx):
        seen["logits"][ctx.step] = logits
        # Under teacher forcing the gate learns from the action cross-entropy only: the layer gets
        # a detached copy, so no straight-through gradient from the frames reaches the gate.
        return logits.detach() if actions is not None else None

    def on_expert(expert, ctx):
        action = step_action(ctx.step, seen["logits"][ctx.step]) if routed else seen["action"][ctx.step]
        if not routed:  # the one shared adapter, or none once the plan has ended
            return torch.where(action[:, None] >= 0, 0, NO_ACTION).expand_as(expert)
        return action[:, None].expand_as(expert)

    i = layer.layer_index
    points = [(hook_name(i, "latent", "*"), on_latent), (hook_name(i, "expert", "*"), on_expert)]
    if routed:
        points.insert(1, (hook_name(i, "logits", "*"), on_logits))
    with rsr.hooks.hooks(points):
        net(frame)
    return Rollout(latents=torch.stack(seen["latent"], 1), logits=torch.stack(seen["logits"], 1),
                   actions=torch.stack(seen["action"], 1), agreement=torch.stack(seen["agreement"], 1))


def decode(net: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """(B, L, N, D) latents -> (B, L, 3, H, W) frames."""
    B, L = latents.shape[:2]
    frames = net.decoder(latents.flatten(0, 1))
    return frames.view(B, L, *frames.shape[1:])

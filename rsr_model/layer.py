"""The RSR layer: a diffusers attention processor that recurses over L latent steps.

It replaces the processor of one `Attention` module (SD3's joint attention, or DiT's
self-attention) and reuses that module's own frozen projections and norms; it owns only
the experts and the gate. The rule:

    h_0 = x                                   # normalized vision tokens entering attention
    for s = 0 .. L-1:                         # recursion steps, 0-based in code and names
        logits_s = G([h_s, c]);  e_s = one expert per token
        if s < L-1:   q, k, v = dW_e(h_s)                         (adapters only)
                      h_{s+1} = h_s + vision part of Attn([q; q'], [k; k'], [v; v'])
        else:         q = Wq x + dW_e^q(h_s), likewise k, v      (frozen base enters here only)
                      joint attention, split, output projections -> layer output

q', k', v' are the frozen text projections of y, computed once and reused at every step, so
text tokens are never routed. The layer's q/k norms (if any) apply to every step's q and k,
as in the layer's own processor. Setting `exit_step = s` finishes the layer at step s
(the early-exit decode of an intermediate state).

Each layer fires the hook points of `hooks.HOOK_POINTS` (the table in the README):
the conditioning, then per recursion step the latent, gate logits and probabilities and the
chosen expert, then the attention output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import RSRConfig
from .experts import LoRAExperts
from .gate import Gate, balance_loss, expert_choice, load_share, sample_choice, straight_through_weight
from .hooks import HookContext, HookPoint, HookRegistry, hook_name


class RunState:
    """Caller-set context shared by all layers of one installed model (plain object, no weights)."""

    def __init__(self) -> None:
        self.sample_ids: torch.Tensor | None = None
        self.train_step: int | None = None
        self.branch = None
        # The training recipe's routing of this step (rsr_model/recipe.py), read only in training:
        # None (the gate's draw, Gumbel noise scaled by `temperature`), "first" (every token to expert 0:
        # upcycling), "soft" (the gate's probabilities mix every expert), "random" (uniform random expert
        # per token: the random-routing control)
        self.routing: str | None = None
        self.temperature: float = 1.0


@dataclass
class StepPoints:
    latent: HookPoint
    logits: HookPoint
    probs: HookPoint
    expert: HookPoint


class RSRAttnProcessor(nn.Module):
    def __init__(self, config: RSRConfig, layer_index: int, dim: int, cond_dim: int,
                 registry: HookRegistry, state: RunState) -> None:
        super().__init__()
        self.config, self.layer_index = config, layer_index
        self.num_experts, self.steps = config.experts, config.steps
        self.experts = LoRAExperts(self.num_experts, dim, dim, config.rank, config.scaling, config.lora_dropout)
        self.gate = Gate(dim, cond_dim, config.gate_hidden, self.num_experts) if config.has_gate else None
        self.hp_cond = registry.point(hook_name(layer_index, "cond"))
        self.hp_steps = [StepPoints(*(registry.point(hook_name(layer_index, k, s))
                                      for k in ("latent", "logits", "probs", "expert")))
                         for s in range(self.steps)]
        self.hp_out = registry.point(hook_name(layer_index, "out"))
        self.state = state
        self.cond: torch.Tensor | None = None  # (B, Dc), written by the conditioning-module forward hook
        self.timestep: torch.Tensor | None = None  # (B,), idem
        self.exit_step: int | None = None
        self.last_balance: torch.Tensor | None = None  # balance loss of the last training forward
        self.last_load: torch.Tensor | None = None  # (K,) share of tokens per expert, last training forward

    # --- hooks -------------------------------------------------------------------------------
    def _fire(self, hp: HookPoint, value, step: int | None = None):
        if not hp.fns:  # the common case: nothing attached, nothing built
            return value
        ctx = HookContext(name=hp.name, layer=self.layer_index, step=step, timestep=self.timestep,
                          sample_ids=self.state.sample_ids, train_step=self.state.train_step, branch=self.state.branch)
        return hp(value, ctx)

    # --- routing -----------------------------------------------------------------------------
    def _route(self, h: torch.Tensor, c: torch.Tensor, s: int):
        """Returns expert (B, N), straight-through weight (B, N) or None, probs (B, N, K) or None, and the
        mixture weights (B, N, K) when the recipe mixes every expert (its soft phase), else None."""
        pts = self.hp_steps[s]
        B, N, _ = h.shape
        if self.gate is None:
            if pts.logits.fns or pts.probs.fns:
                self._fire(pts.logits, h.new_zeros(B, N, 1), s)
                self._fire(pts.probs, h.new_ones(B, N, 1), s)
            expert = self._checked(self._fire(pts.expert, h.new_zeros(B, N, dtype=torch.long), s), pts)
            return expert, None, None, None
        logits = self._fire(pts.logits, self.gate(h, c), s)  # (B, N, K)
        probs = None
        if self.training or pts.probs.fns:
            probs = self._fire(pts.probs, logits.softmax(-1), s)  # (B, N, K)
        recipe = self.state.routing if self.training else None
        onehot = None
        if recipe == "first":
            expert = h.new_zeros(B, N, dtype=torch.long)
        elif recipe == "random":
            expert = torch.randint(0, self.num_experts, (B, N), device=h.device)
        elif recipe == "soft":
            expert = logits.argmax(-1)  # what hooks and the load see; the output mixes every expert
        elif self.config.routing == "expert_choice":
            expert, onehot = expert_choice(logits, self.config.ec_temperature, self.training)
        else:
            expert, onehot = sample_choice(logits, self.config.gumbel_tau, self.training, self.state.temperature)
        expert = self._checked(self._fire(pts.expert, expert, s), pts)
        weight = straight_through_weight(onehot, expert) if onehot is not None else None
        return expert, weight, probs, (probs if recipe == "soft" else None)

    def _checked(self, expert: torch.Tensor, pts: StepPoints) -> torch.Tensor:
        if pts.expert.fns and expert.numel() and (int(expert.min()) < -1 or int(expert.max()) >= self.num_experts):
            raise ValueError(f"{pts.expert.name}: expert ids must be in [-1, {self.num_experts}), "
                             f"got [{int(expert.min())}, {int(expert.max())}]")
        return expert.long()

    # --- attention ---------------------------------------------------------------------------
    @staticmethod
    def _split_heads(attn, t: torch.Tensor) -> torch.Tensor:
        B, S, _ = t.shape
        return t.view(B, S, attn.heads, -1).transpose(1, 2)  # (B, H, S, hd)

    def _text_qkv(self, attn, y: torch.Tensor):
        """Frozen text projections q', k', v' (B, H, M, hd), computed once per forward."""
        tq, tk, tv = (self._split_heads(attn, proj(y)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        return tq, tk, tv

    def _attend(self, attn, q, k, v, text):
        """Joint attention of vision (q, k, v) (B, N, D) with the text triple; returns (vision, text) outputs."""
        B, N, _ = q.shape
        q, k, v = (self._split_heads(attn, t) for t in (q, k, v))  # (B, H, N, hd)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if text is not None:
            q, k, v = (torch.cat([a, b], dim=2) for a, b in zip((q, k, v), text))  # (B, H, N+M, hd)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(B, -1, attn.heads * o.shape[-1])  # (B, N+M, D)
        return o[:, :N], (o[:, N:] if text is not None else None)

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs):
        if attention_mask is not None:
            raise ValueError("RSR attention does not support attention masks")
        if self.cond is None:
            raise RuntimeError("RSR layer has no conditioning vector: call it through the installed transformer")
        x, y = hidden_states, encoder_hidden_states  # (B, N, D), (B, M, D) or None
        c = self._fire(self.hp_cond, self.cond)  # (B, Dc)
        text = self._text_qkv(attn, y) if y is not None else None
        steps = self.steps if self.exit_step is None else min(self.exit_step, self.steps - 1) + 1
        h, balances, loads = x, [], []
        for s in range(steps):
            h = self._fire(self.hp_steps[s].latent, h, s)  # (B, N, D)
            expert, weight, probs, mix = self._route(h, c, s)
            if self.training:  # routing health for progress bars, and the balance loss
                share = load_share(expert, self.num_experts)
                loads.append(share)
                if self.gate is not None and self.state.routing not in ("first", "random"):  # the gate routes
                    balances.append((share, probs.reshape(-1, self.num_experts).mean(0)))  # f_k, P_k of step s
            # each (B, N, D): one expert per token, or in a recipe's soft phase the gate's mixture of all
            dq, dk, dv = self.experts(h, expert, weight) if mix is None else self.experts.mixture(h, mix)
            if s < steps - 1:
                hv, _ = self._attend(attn, dq, dk, dv, text)
                h = h + hv  # accumulate across steps
            else:
                hv, ht = self._attend(attn, attn.to_q(x) + dq, attn.to_k(x) + dk, attn.to_v(x) + dv, text)
        self.last_balance = balance_loss(*zip(*balances), self.config.balance_over) if balances else None
        self.last_load = torch.stack(loads).mean(0) if loads else None
        hv = attn.to_out[1](attn.to_out[0](hv))  # (B, N, D)
        hv = self._fire(self.hp_out, hv)
        if y is None:
            return hv
        if not attn.context_pre_only:
            ht = attn.to_add_out(ht)  # (B, M, D)
        return hv, ht

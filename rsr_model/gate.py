"""The gate G([h, c]) and the hard choice of one expert per vision token.

Training uses hard Gumbel-Softmax with the straight-through estimator (torch's
`F.gumbel_softmax(hard=True)`): the forward choice is argmax(logits + Gumbel noise), i.e. a
categorical sample from softmax(logits) whatever tau is; tau only shapes the gradient.
Sampling uses argmax. The gate probabilities softmax(logits) are kept apart from the choice.
`expert_choice` is the other routing rule a config may name (experts compete for tokens).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """MLP on the concatenation [h, c]; the c half is computed once per sample, not per token."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.token = nn.Linear(dim, hidden)  # W1 restricted to the token half of [h, c]
        self.cond = nn.Linear(cond_dim, hidden, bias=False)  # W1 restricted to the c half
        self.out = nn.Linear(hidden, num_experts)
        nn.init.normal_(self.out.weight, std=0.02)  # small, not zero: routing varies from the start
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (B, N, D), c (B, Dc) -> logits (B, N, K)."""
        return self.out(F.silu(self.token(h) + self.cond(c)[:, None, :]))


def sample_choice(logits: torch.Tensor, tau: float, training: bool, temperature: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick one expert per token. Returns (expert (B, N) long, straight-through one-hot (B, N, K) or None).

    `temperature` (training only) scales the Gumbel noise of the draw: 1 draws from softmax(logits) as
    the paper trains, 0 is the argmax that sampling uses; a recipe anneals it (rsr_model/recipe.py) so
    the experts end training under the routing they are sampled with. The gradient is the same
    straight-through estimate at any temperature."""
    if not training:
        return logits.argmax(-1), None
    if temperature == 1.0:  # the paper's draw, bit for bit (runs saved before annealing existed resume exactly)
        y = F.gumbel_softmax(logits, tau=tau, hard=True)  # (B, N, K): one-hot forward, soft gradient
        return y.argmax(-1), y
    gumbel = -torch.empty_like(logits).exponential_().log()  # (B, N, K) standard Gumbel noise
    expert = (logits + temperature * gumbel).argmax(-1)  # (B, N): a draw from softmax(logits / temperature)
    soft = (logits / tau).softmax(-1)
    return expert, F.one_hot(expert, logits.shape[-1]).to(soft.dtype) - soft.detach() + soft


def expert_choice(logits: torch.Tensor, temperature: float, training: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Experts compete for tokens (paper Table 4's differentiable top-k, read as expert choice).

    Each expert spreads a softmax at `temperature` over the image's tokens (B, N, K), so an expert
    claims the tokens it scores highest relative to the others; each token then goes to the expert
    that claims it most, which keeps one expert per token (what the layer and traces assume) and
    balances the load without a loss. Same rule at training and sampling (no noise); the gradient
    is straight-through the token's normalised claims."""
    claims = (logits / temperature).softmax(1)  # (B, N, K): each expert's distribution over tokens
    soft = claims / claims.sum(-1, keepdim=True)  # (B, N, K): a token's share of the experts' claims
    expert = soft.argmax(-1)  # (B, N)
    if not training:
        return expert, None
    return expert, F.one_hot(expert, logits.shape[-1]).to(soft.dtype) - soft.detach() + soft


def straight_through_weight(onehot: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Scale (B, N) with value exactly 1 and the straight-through gradient of the chosen expert.

    Written as y_e - y_e.detach() + 1 rather than y_e so that an expert forced by a hook (whose
    one-hot entry is 0) still runs at full strength.
    """
    y_e = onehot.gather(-1, expert.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, N)
    return y_e - y_e.detach() + 1.0


def load_share(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(K,) fraction of the non-ablated tokens whose hard choice is each expert (no gradient)."""
    valid = expert[expert >= 0]
    return torch.bincount(valid, minlength=num_experts).float() / max(1, valid.numel())


def balance_loss(shares: Sequence[torch.Tensor], mean_probs: Sequence[torch.Tensor],
                 over: str = "step") -> torch.Tensor:
    """Switch-Transformer balance loss K * sum_k f_k P_k of one layer's recursion.

    shares[s]: (K,) `load_share` of step s's hard choices; mean_probs[s]: (K,) mean gate
    probability of each expert at step s. `over="step"` averages the loss of each step (every
    step must use every expert evenly); `over="recursion"` pools f and P over the steps first,
    so only the whole recursion must use its experts evenly and steps may differ. Equals 1 for
    uniform routing and K when every token and all probability go to one expert.
    """
    K = mean_probs[0].shape[-1]
    if over == "recursion":
        f, P = torch.stack(list(shares)).mean(0), torch.stack(list(mean_probs)).mean(0)
        return K * (f.to(P.dtype) * P).sum()
    return torch.stack([K * (f.to(P.dtype) * P).sum() for f, P in zip(shares, mean_probs)]).mean()

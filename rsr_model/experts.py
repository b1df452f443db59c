"""A bank of K LoRA experts on the vision q, k, v projections, with sparse dispatch.

Expert k is the LoRA triple (A^q_k, B^q_k), (A^k_k, B^k_k), (A^v_k, B^v_k). The three A's of
an expert are stored side by side as one (D, 3r) matrix, so an expert's down-projection is
a single matmul; the three B's stay separate (r, D_out) blocks. B starts at zero, so a new
bank adds nothing (the model starts as the frozen base).

Dispatch is per token across the whole batch: tokens are sorted by expert, each expert runs
once on its contiguous group, and outputs return to spatial order. The adapters' work is
therefore the same for any K (one pass over the tokens); only the number of small matmuls
grows. Expert id -1 means "no adapter" for that token (used to ablate experts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _PermuteRows(torch.autograd.Function):
    """x[perm] whose backward is the inverse permutation (a gather), not index_add's scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class LoRAExperts(nn.Module):
    def __init__(self, num_experts: int, in_dim: int, out_dim: int, rank: int, scaling: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_experts, self.in_dim, self.out_dim, self.rank = num_experts, in_dim, out_dim, rank
        self.scaling = scaling
        self.A = nn.Parameter(torch.empty(num_experts, in_dim, 3 * rank))  # [A_q | A_k | A_v] per expert
        self.B = nn.Parameter(torch.zeros(num_experts, 3, rank, out_dim))  # zero: starts as identity
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # peft's default for lora_A (kaiming uniform, a=sqrt(5)) applied per (out=r, in=D) factor.
        bound = 1.0 / math.sqrt(self.in_dim)  # kaiming_uniform with a=sqrt(5) reduces to 1/sqrt(fan_in)
        with torch.no_grad():
            self.A.uniform_(-bound, bound)
            self.B.zero_()

    def forward(self, h: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, N, D), expert (B, N) long in [-1, K), weight (B, N) straight-through scale or None.

        Returns the adapter outputs dW_e(h) for q, k, v, each (B, N, D_out).
        """
        Bsz, N, D = h.shape
        x = self.dropout(h).reshape(Bsz * N, D)  # (T, D)
        keys = expert.reshape(-1) + 1  # (T,) 0 = no adapter, k+1 = expert k
        order = torch.argsort(keys, stable=True)  # tokens grouped by expert, spatial order kept inside a group
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(keys, minlength=self.num_experts + 1).tolist()
        groups = _PermuteRows.apply(x, order, inverse).split(counts)  # contiguous views, one per expert
        # The per-token scale (LoRA scaling x straight-through weight) multiplies the rank-3r
        # intermediate, not the 3*D_out output: same value and gradient, D_out/r times less work.
        if weight is None:
            scales = [self.scaling] * len(groups)
        else:
            scales = _PermuteRows.apply(weight.reshape(-1, 1) * self.scaling, order, inverse).split(counts)
        outs = [x.new_zeros(counts[0], 3 * self.out_dim)] if counts[0] else []
        for k, g in enumerate(groups[1:]):
            if g.shape[0] == 0:
                continue
            z = ((g @ self.A[k]) * scales[k + 1]).view(-1, 3, self.rank).transpose(0, 1)  # (3, n_k, r)
            outs.append(torch.bmm(z, self.B[k]).transpose(0, 1).reshape(-1, 3 * self.out_dim))  # (n_k, 3*Do)
        out_sorted = torch.cat(outs) if outs else x.new_zeros(0, 3 * self.out_dim)
        out = _PermuteRows.apply(out_sorted, inverse, order)  # (T, 3*Do), spatial order again
        dq, dk, dv = out.view(Bsz, N, 3, self.out_dim).unbind(2)
        return dq, dk, dv

    def _every_expert(self, h: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: (K, B, N, 3, D_out), before the LoRA scaling."""
        x = self.dropout(h)
        z = torch.einsum("bnd,kdr->kbnr", x, self.A)  # (K, B, N, 3r)
        z = z.unflatten(-1, (3, self.rank))  # (K, B, N, 3, r)
        return torch.einsum("kbnjr,kjro->kbnjo", z, self.B)  # (K, B, N, 3, Do)

    def forward_dense(self, h: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference: every expert on every token, then masked (what X-LoRA-style mixtures pay)."""
        mask = F.one_hot(expert.clamp(min=0), self.num_experts).to(h.dtype) * (expert >= 0).to(h.dtype)[..., None]
        out = self.mixture(h, mask)
        if weight is not None:
            out = tuple(o * weight[..., None] for o in out)
        return out

    def mixture(self, h: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Soft mixture sum_k w_k dW_k(h) of every expert, weights (B, N, K) (the gate's probabilities in a
        recipe's soft phase, rsr_model/recipe.py): the gate gets the loss's gradient directly, not a
        straight-through estimate. Returns the q, k, v outputs, each (B, N, D_out)."""
        y = self._every_expert(h)  # (K, B, N, 3, Do)
        out = torch.einsum("kbnjo,bnk->bnjo", y, weights.to(y.dtype)) * self.scaling  # (B, N, 3, Do)
        return out.unbind(2)

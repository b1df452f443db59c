"""Causal interventions on routing, as hook functions on `blocks.{i}.rsr.step.{s}.expert`.

An intervention forces every selected token to one expert (`force`) or takes the adapter
away from tokens currently routed to an expert (`ablate`: their id becomes -1, "no
adapter"). It is restricted to a token region (rows/cols of the token grid), a window of
diffusion timesteps (model timestep values, inclusive), a recursion step and layers. The
spec is plain data so it can be stored in a trace's attributes and replayed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from rsr_model.hooks import hook_name
from traces.errors import UserError


class InterventionError(UserError):
    """A malformed intervention spec; one line for users."""


@dataclass(frozen=True)
class Intervention:
    kind: str  # "force" | "ablate"
    expert: int
    layers: tuple[int, ...] | None = None  # None: every RSR layer
    step: int | None = None  # recursion step; None: all
    rows: tuple[int, int] | None = None  # token-grid rows [r0, r1); None: all
    cols: tuple[int, int] | None = None
    t_min: float | None = None  # model timestep window (inclusive); None: open
    t_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def names(self) -> list[str]:
        """Glob patterns of the expert hook points this intervention replaces."""
        step = "*" if self.step is None else self.step
        return [hook_name(layer, "expert", step) for layer in (["*"] if self.layers is None else self.layers)]

    def hook(self, n_experts: int) -> Callable:
        if not 0 <= self.expert < n_experts:
            raise InterventionError(f"expert {self.expert} outside 0..{n_experts - 1}")

        def fn(expert: torch.Tensor, ctx) -> torch.Tensor | None:
            B, N = expert.shape
            rows_mask = self._rows_mask(B, N, ctx.timestep, expert.device)
            if rows_mask is None:
                return None
            token_mask = self._token_mask(N, expert.device)  # (N,)
            mask = rows_mask[:, None] & token_mask[None, :]  # (B, N)
            if self.kind == "force":
                return torch.where(mask, torch.full_like(expert, self.expert), expert)
            return torch.where(mask & (expert == self.expert), torch.full_like(expert, -1), expert)
        return fn

    def _rows_mask(self, B: int, N: int, timestep, device) -> torch.Tensor | None:
        if self.t_min is None and self.t_max is None:
            return torch.ones(B, dtype=torch.bool, device=device)
        if timestep is None:
            return None
        t = timestep.to(device).float().reshape(-1)
        m = torch.ones_like(t, dtype=torch.bool)
        if self.t_min is not None:
            m &= t >= self.t_min
        if self.t_max is not None:
            m &= t <= self.t_max
        return m if m.any() else None

    def _token_mask(self, N: int, device) -> torch.Tensor:
        side = math.isqrt(N)
        if side * side != N and (self.rows or self.cols):
            raise InterventionError(f"token regions need a square token grid, got {N} tokens")
        r = torch.arange(N, device=device) // max(side, 1)
        c = torch.arange(N, device=device) % max(side, 1)
        m = torch.ones(N, dtype=torch.bool, device=device)
        if self.rows:
            m &= (r >= self.rows[0]) & (r < self.rows[1])
        if self.cols:
            m &= (c >= self.cols[0]) & (c < self.cols[1])
        return m


_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d*)?)?\s*:\s*(-?\d+(?:\.\d*)?)?\s*$")


def _range(text: str | None, what: str, cast=int):
    if text is None:
        return None, None
    m = _RANGE.match(text)
    if not m:
        raise InterventionError(f"{what} must look like A:B (either side may be empty), got {text!r}")
    return tuple(None if g is None else cast(float(g)) for g in m.groups())


def from_cli(rsr, force: int | None, ablate: int | None, region: str | None = None,
             t_window: str | None = None, step: int | None = None,
             layers: list[int] | None = None) -> list[Intervention]:
    """The interventions a command line asks for, checked against the installed RSR."""
    K, L = rsr.config.experts, rsr.config.steps
    if step is not None and not 0 <= step < L:
        raise InterventionError(f"--at-step {step}: the model has recursion steps 0..{L - 1}")
    missing = [i for i in (layers or []) if i not in rsr.layer_indices]
    if missing:
        raise InterventionError(f"--at-layers {missing}: RSR layers are {rsr.layer_indices}")
    out = []
    for kind, expert in (("force", force), ("ablate", ablate)):
        if expert is not None:
            if not 0 <= expert < K:
                raise InterventionError(f"--{kind}-expert {expert}: the model has experts 0..{K - 1}")
            out.append(parse(kind, expert, region, t_window, step, layers))
    return out


def parse(kind: str, expert: int, region: str | None = None, t_window: str | None = None,
          step: int | None = None, layers: list[int] | None = None) -> Intervention:
    """Build an intervention from CLI strings: region 'r0:r1,c0:c1' (token grid), t_window 'a:b'."""
    rows = cols = None
    if region:
        parts = region.split(",")
        if len(parts) != 2:
            raise InterventionError(f"--region must be ROWS,COLS like 0:4,0:8, got {region!r}")
        r0, r1 = _range(parts[0], "region rows")
        c0, c1 = _range(parts[1], "region cols")
        rows = (r0 or 0, r1 if r1 is not None else 10**9)
        cols = (c0 or 0, c1 if c1 is not None else 10**9)
    t_min, t_max = _range(t_window, "--t-window", float)
    if expert < 0:
        raise InterventionError(f"expert must be >= 0, got {expert}")
    return Intervention(kind, int(expert), tuple(layers) if layers else None, step, rows, cols, t_min, t_max)

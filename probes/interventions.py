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
from typing import Any, Sequence

import numpy as np
import torch

from cli_common.errors import UserError
from rsr_model.hooks import hook_name


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

    def hook(self, n_experts: int) -> "InterventionHook":
        """The hook function; it counts the routing decisions it changed (`.changed`)."""
        if not 0 <= self.expert < n_experts:
            raise InterventionError(f"expert {self.expert} outside 0..{n_experts - 1}")
        return InterventionHook(self)

    def check_selects(self, grid: tuple[int, int], timestep_values: Sequence[float]) -> None:
        """Refuse an intervention that can select nothing: a region outside the token grid, or a
        timestep window that none of the sampled timesteps (model timestep values) falls in."""
        for what, span, n in (("rows", self.rows, grid[0]), ("cols", self.cols, grid[1])):
            if span is not None and span[0] >= n:
                raise InterventionError(f"--region {what} {span[0]}:{span[1]} lie outside the {grid[0]}x{grid[1]} "
                                        f"token grid ({what} 0..{n - 1}); the intervention would change nothing")
        if self.t_min is not None or self.t_max is not None:
            lo = -math.inf if self.t_min is None else self.t_min
            hi = math.inf if self.t_max is None else self.t_max
            if not any(lo <= t <= hi for t in timestep_values):
                shown = ", ".join(f"{t:.0f}" for t in timestep_values)
                raise InterventionError(f"--t-window {self.t_min}:{self.t_max} contains none of the sampled "
                                        f"timesteps ({shown}); the intervention would change nothing")

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
        from .analysis.setup import token_grid

        grid = token_grid(np.arange(N))  # the model sees every token: square or unknown
        if grid is None and (self.rows or self.cols):
            raise InterventionError(f"token regions need a square token grid, got {N} tokens")
        w = grid[1] if grid else max(N, 1)
        r = torch.arange(N, device=device) // w
        c = torch.arange(N, device=device) % w
        m = torch.ones(N, dtype=torch.bool, device=device)
        if self.rows:
            m &= (r >= self.rows[0]) & (r < self.rows[1])
        if self.cols:
            m &= (c >= self.cols[0]) & (c < self.cols[1])
        return m


class InterventionHook:
    """The hook an `Intervention` installs on expert hook points. `changed` counts the routing
    decisions (sample x branch x layer x recursion step x token, over every call) it changed, so
    a trace or a causal result shows an intervention that never fired."""

    def __init__(self, intervention: Intervention) -> None:
        self.intervention = intervention
        self.changed = 0
        self.counting = True  # off for extra calls that are not part of the run (early-exit decodes)

    def __call__(self, expert: torch.Tensor, ctx) -> torch.Tensor | None:
        iv = self.intervention
        B, N = expert.shape
        rows_mask = iv._rows_mask(B, N, ctx.timestep, expert.device)
        if rows_mask is None:
            return None
        mask = rows_mask[:, None] & iv._token_mask(N, expert.device)[None, :]  # (B, N)
        if iv.kind == "force":
            new = torch.where(mask, torch.full_like(expert, iv.expert), expert)
        else:
            new = torch.where(mask & (expert == iv.expert), torch.full_like(expert, -1), expert)
        if self.counting:
            self.changed += int((new != expert).sum())
        return new


_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d*)?)?\s*:\s*(-?\d+(?:\.\d*)?)?\s*$")


def _range(text: str | None, what: str, cast=int):
    if text is None:
        return None, None
    m = _RANGE.match(text)
    if not m:
        raise InterventionError(f"{what} must look like A:B (either side may be empty), got {text!r}")
    return tuple(None if g is None else cast(float(g)) for g in m.groups())


def sampled_timesteps(task, steps: int) -> list[float]:
    """The model timestep values a sampling run of `steps` steps visits (what --t-window selects from)."""
    from rsr_model.flow import make_scheduler

    sched = make_scheduler(task.shift)
    sched.set_timesteps(steps)
    return [float(t) for t in sched.timesteps[:steps]]


def from_cli(rsr, force: int | None, ablate: int | None, region: str | None = None,
             t_window: str | None = None, step: int | None = None,
             layers: list[int] | None = None, grid: tuple[int, int] | None = None,
             timestep_values: Sequence[float] | None = None) -> list[Intervention]:
    """The interventions a command line asks for, checked against the installed RSR and, given the
    token `grid` and the `timestep_values` the run samples, refused if they would select nothing."""
    K, L = rsr.config.experts, rsr.config.steps
    if layers is not None and not layers:
        raise InterventionError("--at-layers is empty; the intervention would change nothing")
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
            if grid is not None and timestep_values is not None:
                out[-1].check_selects(grid, timestep_values)
    return out


def parse(kind: str, expert: int, region: str | None = None, t_window: str | None = None,
          step: int | None = None, layers: list[int] | None = None) -> Intervention:
    """Build an intervention from CLI strings: region 'r0:r1,c0:c1' (token grid), t_window 'a:b'."""
    rows = cols = None
    if region is not None:
        parts = region.split(",")
        if len(parts) != 2:
            raise InterventionError(f"--region must be ROWS,COLS like 0:4,0:8, got {region!r}")
        rows = _span(_range(parts[0], "region rows"), "rows", region)
        cols = _span(_range(parts[1], "region cols"), "cols", region)
    t_min, t_max = _range(t_window, "--t-window", float)
    if t_min is not None and t_max is not None and t_min > t_max:
        raise InterventionError(f"--t-window {t_window!r} is reversed (A:B with A <= B, model timesteps)")
    if expert < 0:
        raise InterventionError(f"expert must be >= 0, got {expert}")
    return Intervention(kind, int(expert), tuple(layers) if layers else None, step, rows, cols, t_min, t_max)


def _span(bounds: tuple, what: str, region: str) -> tuple[int, int]:
    """[start, stop) of a region axis; an open end means the grid's edge. Empty or negative: an error."""
    start, stop = bounds
    start = 0 if start is None else start
    stop = 10**9 if stop is None else stop
    if start < 0 or stop <= start:
        raise InterventionError(f"--region {region!r}: {what} {start}:{stop} select nothing "
                                f"(need 0 <= start < stop)")
    return start, stop

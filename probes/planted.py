"""Planted structure: was the checkpoint's routing assignment forced by its training (the expert warm start)?

The warm start (rsr_model/warm_start.py) forces every token's expert to a cell (recursion step, noise
band) and teaches the gate that assignment for the first steps of the RSR stage. A gate that keeps it
shows exactly the planted layout's MI (AMI(expert; timestep bin) and MI(expert; step) at their
ceilings); read as found structure, that is a mistake. This module says whether cells were planted,
from the checkpoint's own arguments (falling back to the preset's defaults, as training did), and how
often the gate's routing on held-out batches still equals the planted cell, beside the agreement two
independent routings with the same marginals would have (chance).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from rsr_model.hooks import hook_name


def planted_layout(ckpt: dict[str, Any], task, rsr) -> dict[str, Any] | None:
    """{"layout", "steps"} of the warm start the checkpoint's RSR stage ran, or None if none ran."""
    args = ckpt.get("args") or {}
    if rsr is None or not rsr.config.has_gate:
        return None
    layout = args.get("warm_start") or getattr(task, "warm_start", "none")
    steps = args.get("warm_start_steps")
    if steps is None:
        steps = getattr(task, "warm_start_steps", None)
    plan = (ckpt.get("plan") or {}).get("rsr", 0)
    steps = plan // 4 if steps is None else steps  # the trainer's default: the stage's first quarter
    done = (ckpt.get("progress") or {}).get("rsr", 0)
    steps = min(steps, done)
    if layout == "none" or steps <= 0:
        return None
    return {"layout": layout, "steps": int(steps)}


@torch.no_grad()
def planted_agreement(transformer, rsr, task, layout: str, batches: Sequence) -> dict[str, Any]:
    """Share of held-out tokens whose gate choice is the planted cell, overall and per (layer, step), and
    the chance agreement sum_k P(gate = k) P(cell = k) of two independent routings with those marginals."""
    from rsr_model.warm_start import WarmStart

    warm = WarmStart(rsr, layout, task.weighting, task.shift)
    K = rsr.config.experts
    hits: dict[tuple[int, int], list[int]] = {}
    gate_counts: dict[tuple[int, int], np.ndarray] = {}
    cell_counts: dict[tuple[int, int], np.ndarray] = {}

    def count(ids: torch.Tensor, ctx) -> None:
        key = (ctx.layer, ctx.step)
        cell = warm.cell(ctx.timestep, ctx.step)[:, None].expand_as(ids)
        h = hits.setdefault(key, [0, 0])
        h[0] += int((ids == cell).sum())
        h[1] += ids.numel()
        gate_counts[key] = gate_counts.get(key, 0) + np.bincount(ids.reshape(-1).numpy(), minlength=K)
        cell_counts[key] = cell_counts.get(key, 0) + np.bincount(cell.reshape(-1).numpy(), minlength=K)

    with rsr.hooks.hooks({hook_name("*", "expert", "*"): count}):
        for b in batches:
            transformer(hidden_states=b.xt, timestep=b.t, **b.cond)
    total = sum(h[1] for h in hits.values())
    chance = sum(float((gate_counts[k] / gate_counts[k].sum()) @ (cell_counts[k] / cell_counts[k].sum())) * hits[k][1]
                 for k in hits) / max(total, 1)
    return {"agreement": sum(h[0] for h in hits.values()) / max(total, 1), "chance": chance,
            "by_point": {f"{layer}.{step}": h[0] / max(h[1], 1) for (layer, step), h in sorted(hits.items())}}

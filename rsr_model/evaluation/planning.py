"""Planning figures (the paper's section 4.4: reasoning in visual latents) beside the other tables:
`evaluate --planning CKPT [CKPT ...]`.

This module is the hook, not the planner: a preset that can measure planning (the FrozenLake
preset) provides one method on its Task class,

    planning_figures(transformer, rsr, seed: int) -> {map_size (str): {"success": float,
                                                      "action_accuracy": float, "frame_accuracy": float}}

(success: share of maps whose sampled plan reaches the goal; action accuracy: share of steps
whose action matches a shortest path; frame accuracy: share of predicted frames equal to the
true next frame). `evaluate --planning` calls it for every checkpoint (e.g. RSR and the same
budget without routing) and training seed, averages over seeds and writes planning.json / .md
under --out. A checkpoint of a preset without the method is refused with one error line.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..cli import UsageError

FIGURES = ("success", "action_accuracy", "frame_accuracy")


def planning_rows(checkpoints: Sequence[Path], seeds: Sequence[int]) -> dict[str, Any]:
    from ..sample import load_model

    rows: dict[str, Any] = {}
    started = time.perf_counter()
    for ckpt in checkpoints:
        task, transformer, rsr, ck = load_model(ckpt)
        if not hasattr(task, "planning_figures"):
            raise UsageError(f"{ckpt}: preset {task.name!r} measures no planning figures "
                             f"(a preset provides them with a planning_figures method, as the FrozenLake preset does)")
        per_seed = [task.planning_figures(transformer, rsr, seed) for seed in seeds]
        sizes = sorted(per_seed[0], key=lambda s: (len(str(s)), str(s)))
        rows[f"{Path(ckpt).stem} ({ck.get('mode', '?')})"] = {
            str(size): {f: float(np.mean([r[size][f] for r in per_seed])) for f in FIGURES} for size in sizes}
    return {"seeds": list(seeds), "rows": rows, "seconds": time.perf_counter() - started}


def markdown(result: dict[str, Any]) -> str:
    sizes = list(dict.fromkeys(s for row in result["rows"].values() for s in row))
    head = ["Checkpoint"] + [f"{s}: {f.replace('_', ' ')}" for s in sizes for f in FIGURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["rows"].items():
        cells = [f"{row[s][f]:.3f}" if s in row else "—" for s in sizes for f in FIGURES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nMean over seeds {result['seeds']}.")
    return "\n".join(lines)

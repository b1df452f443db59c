"""Planning figures (the paper's section 4.4: reasoning in visual latents) beside the other tables:
`evaluate --planning CKPT [CKPT ...]`.

This module collects, it does not plan: a task that plans judges its own plans through
`Task.plan_figures` (FrozenLake: `rsr_model.tasks.frozenlake.judge` samples a plan per held-out
map, checks it and gives the rates). `evaluate --planning` runs it on every checkpoint given
(e.g. RSR and the same budget without routing, several training seeds each), groups them by
(map size, training steps, mode) - so checkpoints of different budgets are never averaged
together - and reports per group
the mean ± std over checkpoints of

    success (env)     share of held-out maps whose actions, replayed in the environment, reach the goal
    success (frames)  the same read from the agent's cell in the decoded frames
    action accuracy   share of plan steps whose action matches the shortest plan
    frame accuracy    share of plan steps whose predicted frame is right

and the mean count per checkpoint of the failure modes (into a hole, diagonal and impossible
moves in the decoded frames). Where a map size and budget has RSR and the baseline without
routing (`no_modulation`) trained with the same seeds, RSR is compared with it by an exact McNemar
test on the paired outcomes (same seed, same held-out map; success in the environment).

Results go to planning.json / planning.md under --out. A checkpoint of a preset without held-out maps is
refused with one error line.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cli_common.errors import UsageError

FIGURES = {"success_env": "success (env)", "success_frames": "success (frames)", "action_accuracy": "action accuracy",
           "frame_accuracy": "frame accuracy"}
FAILURES = {"hole": "holes", "diagonal_moves": "diagonal", "impossible_moves": "impossible"}


def check_plannable(checkpoints: Sequence[Path]) -> None:
    """Refuse, before any map is planned, a checkpoint whose preset does not plan (a text or digits
    model given among FrozenLake ones) or that has no RSR layer."""
    from rsr_model.checkpoint import load_checkpoint
    from rsr_model.tasks import TASKS
    from rsr_model.tasks.base import Task

    for ckpt in checkpoints:
        ck = load_checkpoint(ckpt)
        task = TASKS.get(ck.get("preset"))
        if task is None or task.plan_figures is Task.plan_figures:
            raise UsageError(f"{ckpt}: preset {ck.get('preset')!r} has no held-out maps to plan on "
                             f"(planning figures are for presets that plan, like frozenlake)")


def checkpoint_figures(ckpt: Path, n_maps: int) -> dict[str, Any]:
    """One checkpoint's planning rates on the first n_maps held-out maps of its preset."""
    from rsr_model.sample import load_model
    from rsr_model.tasks import TaskError

    task, net, rsr, ck = load_model(ckpt)
    try:
        rates = task.plan_figures(net, rsr, n_maps)
    except TaskError as e:
        raise UsageError(f"{ckpt}: {e}") from None
    return {"size": rates["size"], "steps": int(ck.get("step") or 0), "mode": ck.get("mode", "?"),
            "seed": (ck.get("args") or {}).get("seed"),
            **{k: rates[k] for k in FIGURES}, "failures": {k: rates["failures"][k] for k in FAILURES},
            "success_per_map": rates["success_per_map"]}


def planning_rows(checkpoints: Sequence[Path], n_maps: int = 200) -> dict[str, Any]:
    started = time.perf_counter()
    runs = [{"checkpoint": str(c), **checkpoint_figures(c, n_maps)} for c in checkpoints]
    rows = []
    for size, steps, mode in dict.fromkeys((r["size"], r["steps"], r["mode"]) for r in runs):
        group = [r for r in runs if (r["size"], r["steps"], r["mode"]) == (size, steps, mode)]
        row = {"size": size, "steps": steps, "mode": mode, "checkpoints": len(group)}
        for key in FIGURES:
            values = np.array([r[key] for r in group])
            row[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        row["failures"] = {k: float(np.mean([r["failures"][k] for r in group])) for k in FAILURES}
        rows.append(row)
    return {"maps": n_maps, "rows": rows, "rsr_vs_shared": paired_tests(runs), "runs": runs,
            "seconds": time.perf_counter() - started}


def budget_label(row: dict[str, Any]) -> str:
    """The (map size, training steps) a row or run belongs to, as shown in tables and figures."""
    steps = row.get("steps")  # absent in results written before budgets were told apart
    return row["size"] if steps is None else f"{row['size']}, {steps} steps"


def paired_tests(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per map size and budget: RSR against the baseline without routing, paired by training seed and map."""
    from .table import paired_over_seeds

    tests = {}
    for group in dict.fromkeys(budget_label(r) for r in runs):
        shared = {r["seed"]: r for r in runs if budget_label(r) == group and r["mode"] == "no_modulation"}
        pairs = [(r, shared[r["seed"]]) for r in runs
                 if budget_label(r) == group and r["mode"] == "rsr" and r["seed"] in shared]
        if pairs:
            tests[group] = paired_over_seeds([(r["seed"], r["success_per_map"], b["success_per_map"])
                                              for r, b in pairs])
    return tests


def paired_sentence(group: str, t: dict[str, Any]) -> str:
    """One paired test in words: effect, discordant plans, p, and the per-seed differences."""
    from .table import per_seed_words

    return (f"RSR − shared module ({group}, seeds {t['seeds']}): {100 * t['difference']:+.1f} points of success over "
            f"{t['pairs']} paired plans ({t['only_first']} reached only under RSR, {t['only_second']} only without "
            f"routing), exact McNemar p = {t['p_value']:.3g}{per_seed_words(t)}.")


def markdown(result: dict[str, Any]) -> str:
    from .markdown import table_lines

    rows = [[r["size"], str(r.get("steps", "?")), r["mode"], str(r["checkpoints"]),
             *(f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in FIGURES),
             *(f"{r['failures'][k]:.1f}" for k in FAILURES)] for r in result["rows"]]
    tests = [paired_sentence(group, t) for group, t in result.get("rsr_vs_shared", {}).items()]
    head = ["map", "steps", "mode", "checkpoints", *FIGURES.values(), *FAILURES.values()]
    notes = [*tests, f"Held-out maps per checkpoint: {result['maps']}; rates are mean ± std over the checkpoints "
                     f"of a row, failures the mean count per checkpoint."]
    return "\n\n".join(["\n".join(table_lines(head, rows)), *notes])  # one paragraph per note

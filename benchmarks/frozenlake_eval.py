"""Planning on held-out FrozenLake maps: RSR (four action experts, the gate choosing) against the
same model without routing (one shared adapter, the action as an embedding), same budget.

    OMP_NUM_THREADS=1 python -m benchmarks.frozenlake_eval [--sizes 4 6] [--seeds 0 1 2] [--steps 1000]
        [--modes rsr no_modulation] [--eval-maps 200] [--workdir runs/frozenlake] [--out runs/frozenlake_eval.json]

Each (size, mode, seed) trains with `python -m rsr_model train --preset frozenlake[-NxN]` and is
judged on the preset's held-out maps (rsr_model/tasks/frozenlake/judge.py): success read from the
decoded frames and by replaying the actions in gymnasium, per-step action accuracy against the
shortest plan (and the share of actions on *a* shortest path), per-step frame accuracy (gate's
plan, and teacher-forced), the failure modes, token agreement, MI(applied expert; true action)
per latent step, and the training time. One JSON per run lands in --workdir (existing ones are
reused, so several processes may share the work); the summary over seeds is printed and
written to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

PRESETS = {4: "frozenlake", 6: "frozenlake-6x6", 8: "frozenlake-8x8"}
MODES = {"rsr": "RSR (4 action experts, gate)", "no_modulation": "shared module + action embedding"}


def action_mi_per_step(plans, horizon: int) -> list[float]:
    """MI in bits between the applied action (= expert) and the true action, at every step l < horizon."""
    from probes.stats.information import mutual_information
    from rsr_model.tasks.frozenlake import maps as lake

    out = []
    for l in range(horizon):
        table = np.zeros((4, 4))
        for p in plans:
            label = lake.shortest_path(p.map)
            if l < len(label):
                table[p.actions[l], label[l]] += 1
        out.append(float(mutual_information(table) / np.log(2)) if table.sum() else float("nan"))
    return out


def run_one(size: int, mode: str, seed: int, steps: int, n_eval: int, workdir: Path) -> dict:
    from rsr_model.__main__ import main
    from rsr_model.sample import load_model
    from rsr_model.tasks.frozenlake.judge import judge, make_plans, summarize, teacher_forced_frame_accuracy

    result_path = workdir / f"{PRESETS[size]}-{mode}-s{seed}-{steps}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    ckpt = workdir / f"{PRESETS[size]}-{mode}-s{seed}-{steps}.pt"
    start = time.perf_counter()
    code = main(["train", "--preset", PRESETS[size], "--mode", mode, "--seed", str(seed), "--steps", str(steps),
                 "--out", str(ckpt), "--overwrite", "--save-every", str(steps)])
    if code != 0:
        raise SystemExit(f"training {ckpt} failed")
    train_seconds = time.perf_counter() - start
    task, net, rsr, _ = load_model(ckpt)
    maps = task.eval_maps[:n_eval]
    plans = make_plans(task, net, rsr, maps)
    result = {"size": size, "mode": mode, "seed": seed, "steps": steps, "train_seconds": round(train_seconds, 1),
              "parameters": sum(p.numel() for p in net.parameters()),
              **summarize([judge(p) for p in plans], plans),
              "frame_accuracy_teacher_forced": teacher_forced_frame_accuracy(task, net, rsr, maps),
              "mi_bits_per_step": action_mi_per_step(plans, task.horizon)}
    result_path.write_text(json.dumps(result, indent=1))
    return result


SCALARS = ("success_frames", "success_env", "action_accuracy", "action_optimal", "frame_accuracy",
           "frame_accuracy_teacher_forced", "token_agreement", "train_seconds")


def summary(results: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of every (size, mode)."""
    rows = []
    for size, mode in sorted({(r["size"], r["mode"]) for r in results}):
        group = [r for r in results if (r["size"], r["mode"]) == (size, mode)]
        row = {"size": size, "mode": mode, "seeds": [r["seed"] for r in group], "steps": group[0]["steps"]}
        for key in SCALARS:
            values = [r[key] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row[key] = [round(statistics.mean(values), 3), round(spread, 3)]
        row["failures"] = {k: sum(r["failures"][k] for r in group) / len(group) for k in group[0]["failures"]}
        # plans that stopped on a goal or hole drawn in the decoded frames the environment never reached
        row["failures"]["stopped_short"] = statistics.mean(
            round(r["maps"] * (1 - r["success_env"])) - r["failures"]["hole"] - r["failures"]["timed_out"]
            for r in group)
        row["mi_bits_first_steps"] = [round(statistics.mean(r["mi_bits_per_step"][l] for r in group), 3)
                                      for l in range(min(6, len(group[0]["mi_bits_per_step"])))]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| size | model | success (frames) | success (env) | action acc | on a shortest path | frame acc "
            "| frame acc (forced) | agreement | holes | stopped short | diagonal | impossible | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = r["failures"]
        cells = [f"{r['size']}x{r['size']}", MODES[r["mode"]]]
        cells += [f"{r[k][0]:.2f} ± {r[k][1]:.2f}" for k in SCALARS[:-1]]
        cells += [f"{f[k]:.1f}" for k in ("hole", "stopped_short", "diagonal_moves", "impossible_moves")]
        cells += [f"{r['train_seconds'][0]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4], choices=sorted(PRESETS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-maps", type=int, default=200)
    p.add_argument("--workdir", type=Path, default=Path("runs/frozenlake"))
    p.add_argument("--out", type=Path, default=Path("runs/frozenlake_eval.json"))
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    results = [run_one(size, mode, seed, a.steps, a.eval_maps, a.workdir)
               for size in a.sizes for mode in a.modes for seed in a.seeds]
    rows = summary(results)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": rows, "runs": results}, indent=1))
    print(json.dumps(rows, indent=1))
    print(table(rows))
    print("failures are counts per run (mean over seeds) on", results[0]["maps"], "held-out maps")


if __name__ == "__main__":
    main()

"""Which RSR-stage recipe makes the tiny preset's experts specialize? A measured sweep.

For each setting x seed: train the RSR stage on a fixed base checkpoint (`--stage rsr --base`),
then measure on the checkpoint
  * at sampling time (examples/prompts.txt x 4 seeds, 28 Euler steps, guidance 3, both CFG
    branches, as the demo records): mean normalised gate entropy, mean top-1 margin, adjusted
    MI of the expert with the timestep bin (4 bins) per recursion step (max over steps, with its
    permutation p), MI of the expert with the recursion step (nats, p), dead experts, and the
    project's GenEval-style scorer on the samples;
  * routing value on held-out training-distribution batches (`probes.routing_value`, scope "all"):
    1 - loss(gate)/loss(same-load random), and whether the gate beats every forced expert;
  * the final training loss (mean of the last 50 steps).

    python -m benchmarks.specialization_sweep --base runs/demo/sd3_rsr.pt --out runs/sweep \
        [--steps 400] [--seeds 0,1] [--only default,tau1_lr5e-3]

Training runs one at a time (time them alone). Results: one JSON line per run in OUT/results.jsonl
and a markdown table printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS: dict[str, list[str]] = {
    "default": [],  # the preset's current recipe (tiny: K 6, step-band warm start, balance over the recursion)
    # the tiny default before the warm start: the paper's gate recipe (tau 5, balance per step) with K 4
    "k4_paper_gate": ["--experts", "4", "--warm-start", "none", "--balance-over", "step"],
    "tau1_lr5e-3": ["--tau", "1", "--lr", "5e-3"],
    "tau1_gate10x": ["--tau", "1", "--gate-lr-scale", "10"],
    "tau0.5_gate10x": ["--tau", "0.5", "--gate-lr-scale", "10"],
    "tau1_lr3e-3_gate10x": ["--tau", "1", "--lr", "3e-3", "--gate-lr-scale", "10"],
    "tau1_gate10x_bal0.1": ["--tau", "1", "--gate-lr-scale", "10", "--balance-weight", "0.1"],
    # experts that matter first: a larger adapter learning rate (and rank), then the sharper gate
    "lr5e-3_tau0.5_gate10x": ["--lr", "5e-3", "--tau", "0.5", "--gate-lr-scale", "10"],
    "lr1e-2_tau0.5_gate10x": ["--lr", "1e-2", "--tau", "0.5", "--gate-lr-scale", "10"],
    "lr5e-3_rank32_tau0.5_gate10x": ["--lr", "5e-3", "--rank", "32", "--tau", "0.5", "--gate-lr-scale", "10"],
    # symmetry broken first: experts forced to their cells for the first quarter, then the gate is free
    "k6": ["--experts", "6"],
    "k6_warm_stepband": ["--experts", "6", "--warm-start", "step-band", "--warm-start-steps", "100",
                         "--balance-over", "step"],
    "k4_warm_band": ["--warm-start", "band", "--warm-start-steps", "100"],
    "k6_warm_stepband_pooled": ["--experts", "6", "--warm-start", "step-band", "--warm-start-steps", "100",
                                "--balance-over", "recursion"],
    "k6_warm_stepband_pooled_ema": ["--experts", "6", "--warm-start", "step-band", "--warm-start-steps", "100",
                                    "--balance-over", "recursion", "--rsr-ema-decay", "0.999"],
}


def sampling_routing(task, transformer, rsr, prompts: list[str], seeds_per_prompt: int = 4, steps: int = 28,
                     guidance: float = 3.0, n_bins: int = 4) -> dict:
    """Routing statistics and scorer accuracy of one sampling run (hooks on probs and expert)."""
    from evaluation.scorer import score
    from probes.stats import gate_entropy, mi_summary, top1_margin
    from rsr_model.hooks import hook_name
    from rsr_model.sample import generate
    from traces.bins import timestep_bins

    K, L = rsr.config.experts, rsr.config.steps
    items = [p for p in prompts for _ in range(seeds_per_prompt)]
    seeds = list(range(len(items)))
    by_time = np.zeros((L, n_bins, K), np.int64)
    ent, margin = [], []
    calls: dict[tuple[int, int], int] = {}

    def on_expert(ids, ctx):
        key = (ctx.layer, ctx.step)
        i = calls.get(key, 0)
        calls[key] = i + 1
        b = int(timestep_bins(i, n_bins, 0, steps))  # sampler position, as sampling-trace reports bin
        by_time[ctx.step, b] += np.bincount(ids.reshape(-1).numpy(), minlength=K)

    def on_probs(p, ctx):
        p = p.double().numpy()
        ent.append(float(gate_entropy(p, normalised=True).mean()))
        margin.append(float(top1_margin(p).mean()))

    with rsr.hooks.hooks({hook_name("*", "expert", "*"): on_expert, hook_name("*", "probs", "*"): on_probs}):
        x0 = generate(task, transformer, items, seeds, steps=steps, guidance=guidance)
    images = task.to_images(x0)
    correct = [score(im, cap)["correct"] for im, cap in zip(images, items)]
    t_mi = mi_summary(by_time.transpose(0, 2, 1), n_perm=199, seed=0)  # (L,) expert x bin tables
    s_mi = mi_summary(by_time.sum(1).T, n_perm=199, seed=0)  # expert x step
    load = by_time.sum(1) / by_time.sum(axis=(1, 2))[:, None]  # (L, K)
    best = int(np.nanargmax(t_mi.ami))
    return {"entropy": float(np.mean(ent)), "margin": float(np.mean(margin)),
            "ami_timestep_max": float(t_mi.ami[best]), "ami_timestep_step": best,
            "p_timestep": float(t_mi.p_value[best]), "ami_timestep": t_mi.ami.tolist(),
            "mi_step_nats": float(s_mi.mi), "p_step": float(s_mi.p_value),
            "dead_experts": int((by_time.sum(axis=(0, 1)) == 0).sum()),  # never chosen at any step
            "load": load.round(3).tolist(),
            "scorer": float(np.mean(correct))}


def evaluate(ckpt: Path, prompts: list[str]) -> dict:
    from probes.routing_value import held_out_batches, routing_value
    from rsr_model.checkpoint import load_checkpoint
    from rsr_model.sample import load_model

    task, transformer, rsr, ck = load_model(ckpt)
    torch.manual_seed(0)
    rsr_values = routing_value(transformer, rsr, held_out_batches(task, 32, 4), random_draws=2, n_boot=500)["scopes"]
    rv = rsr_values["all"]
    losses = [e["loss"] for e in load_checkpoint(ckpt)["losses"] if e["stage"] == "rsr"]
    return {**sampling_routing(task, transformer, rsr, prompts),
            "routing_value": rv["value"], "routing_value_ci95": rv["value_ci95"],
            "gate_below_every_forced": rv["gate_below_every_forced"],
            "loss_gate": rv["overall"]["gate"], "loss_random": rv["overall"]["random"],
            "loss_none": rv["overall"]["none"], "adapter_gain": 1 - rv["overall"]["gate"] / rv["overall"]["none"],
            "step_values": {k: v["value"] for k, v in rsr_values.items() if k != "all"},
            "train_loss_last50": float(np.mean(losses[-50:]))}


def train(base: Path, out: Path, steps: int, seed: int, flags: list[str]) -> float:
    cmd = [sys.executable, "-m", "rsr_model", "train", "--stage", "rsr", "--base", str(base), "--out", str(out),
           "--steps", str(steps), "--seed", str(seed), "--save-every", str(steps), "--overwrite", *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def table(rows: list[dict]) -> str:
    cols = ["setting", "seed", "entropy", "margin", "ami_timestep_max", "p_timestep", "mi_step_nats", "p_step",
            "dead_experts", "routing_value", "gate_below_every_forced", "adapter_gain", "train_loss_last50", "scorer",
            "train_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--only", default=",".join(SETTINGS))
    ap.add_argument("--prompts", type=Path, default=Path("examples/prompts.txt"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a.out.mkdir(parents=True, exist_ok=True)
    prompts = [l.strip() for l in a.prompts.read_text().splitlines() if l.strip()]
    rows = []
    for name in a.only.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            ckpt = a.out / f"{name}_s{seed}.pt"
            try:
                secs = train(a.base, ckpt, a.steps, seed, SETTINGS[name])
            except subprocess.CalledProcessError:  # e.g. the loss diverged: a result too, not a crash
                print(f"| {name} | {seed} | training failed (rerun it alone to see why) |", flush=True)
                continue
            row = {"setting": name, "seed": seed, "train_s": secs, "steps": a.steps, **evaluate(ckpt, prompts)}
            rows.append(row)
            with open(a.out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()

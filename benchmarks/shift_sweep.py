"""Which RSR-stage recipe makes tiny-shift's experts split by STYLE? A measured sweep (issue 20).

For each setting: train the RSR stage of `tiny-shift` from one base checkpoint (seed 0, the preset's
defaults plus the setting's flags), then measure it with `evaluate --shift`'s own functions
(`evaluation.shift.measure`, row "rsr") on the same held-out sets as every other setting: held-out
loss, adapter gain, the routing value (scope "all", per image and per token), gate vs best forced
expert, AMI(expert; style) (max over recursion steps, and where) and the whole model's verdict.
The measurement budget is smaller than the table's (fewer held-out samples and draws: `SWEEP`), so
the sweep ranks recipes; the table (`evaluate --shift`) is the evidence.

    python -m benchmarks.shift_sweep --base runs/shift/base400.pt --out runs/shift/sweep \
        [--steps 300] [--only default,gate10x]

Training runs one at a time (time it alone). One JSON line per setting in OUT/results.jsonl and a
markdown table at the end; a setting already in results.jsonl with the same seed, steps and base is not run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

SETTINGS: dict[str, list[str]] = {
    "default": [],  # the preset's recipe: upcycling a quarter, soft phase a quarter, annealed hard routing
    "gate10x": ["--gate-lr-scale", "10"],  # the gate learns 10x faster than the experts
    "no_upcycle": ["--upcycle-steps", "0"],  # experts from their own random A (B = 0), soft then hard
    "no_soft": ["--soft-steps", "0"],  # upcycling, then annealed hard routing at once
    "hard_only": ["--upcycle-steps", "0", "--soft-steps", "0"],  # annealed hard routing only
    "no_balance": ["--balance-weight", "0"],  # nothing pushes the load towards uniform
    "tau1": ["--tau", "1"],  # a sharper straight-through gradient for the gate
    # the two that raised AMI(style) on their own (no_balance, hard_only), together
    "hard_no_balance": ["--upcycle-steps", "0", "--soft-steps", "0", "--balance-weight", "0"],
    # paper Table 4's differentiable top-k in the expert-choice reading (docs/design.md A7 b); balances the
    # load per image by construction, so a whole image cannot go to one expert
    "expert_choice": ["--routing", "expert_choice"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shift_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="a tiny-shift base-stage checkpoint")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300, help="RSR-stage steps of every setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings")
    args = p.parse_args(argv)
    names = args.only.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")

    from evaluation import shift
    from evaluation.table import train_checkpoint
    from probes.routing_interval import bin_means
    from probes.routing_value import held_out_sets
    from rsr_model.sample import load_model

    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    # a row is reused only for the same setting, seed, steps and base (the checkpoint's own reuse is keyed the same
    # way by evaluation.table.train_checkpoint); another budget in the same folder is a new row
    kept = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["setting"], r["seed"], r["steps"], r.get("base")) for r in kept}
    sweep = shift.ShiftBudget(base_steps=0, rsr_steps=args.steps, seeds=(args.seed,), value_samples=16,
                              value_sets=1, value_draws=2, bootstrap=300)
    task, base_model, _, _ = load_model(args.base)
    sets = held_out_sets(task, sweep.value_samples, sweep.value_bins, sweep.value_sets)
    style = shift.styled_batches(task, sweep.style_samples, sweep.style_batches)
    base_losses = shift.per_sample_losses(base_model, sets)
    print(f"frozen base held-out loss {float(bin_means(base_losses).mean()):.4f}", flush=True)
    for name in names:
        if (name, args.seed, args.steps, str(args.base)) in done:
            continue
        budget = dataclasses.replace(sweep, rsr_flags=tuple(SETTINGS[name]))
        path = args.out / f"{name}_s{args.seed}_{args.steps}.pt"
        argv_ = shift.row_argv(args.base, "rsr", args.seed, budget)
        train_s = train_checkpoint(path, argv_, shift._expect(argv_, "rsr", args.steps))
        t0 = time.perf_counter()
        figures, _ = shift.measure(path, "rsr", sets, style, base_losses, budget)
        row = {"setting": name, "flags": SETTINGS[name], "seed": args.seed, "steps": args.steps, "base": str(args.base),
               "train_s": round(train_s, 1), "measure_s": round(time.perf_counter() - t0, 1),
               **{k: figures.get(k) for k in ("loss", "adapter_gain", "value", "value_ci95", "value_token",
                                               "value_token_ci95", "gate_vs_best_forced", "ami_style_max",
                                               "verdict", "routing_share", "argmax_vs_sampled")},
               "ami_at": figures["ami_style"]["at"]}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    print("| setting | flags | loss | adapter gain | value [95% CI] | per token | gate vs best forced "
          "| AMI(style) max (at) | verdict | train s |")
    print("|---" * 10 + "|")
    for r in rows:
        ci, tci = r["value_ci95"], r["value_token_ci95"]
        print(f"| {r['setting']} | {' '.join(r['flags']) or '(preset)'} | {r['loss']:.4f} | "
              f"{100 * r['adapter_gain']:+.1f}% | {100 * r['value']:+.1f}% [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] | "
              f"{100 * r['value_token']:+.1f}% [{100 * tci[0]:+.1f}, {100 * tci[1]:+.1f}] | "
              f"{100 * r['gate_vs_best_forced']:+.1f}% | {r['ami_style_max']:.2f} ({r['ami_at']}) | {r['verdict']} | "
              f"{r['train_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

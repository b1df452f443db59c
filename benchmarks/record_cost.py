"""Recording overhead, as ratios of sampling time measured in one run, against the targets below.

    python -m benchmarks.record_cost [--ckpt CKPT] [--samples 16] [--steps 28] [--reps 3]

Samples the same prompts and seeds without hooks, then with the recorder writing a trace:
  - routing only (expert ids + counts)                       target ratio <= 1.05
  - routing + gate probabilities (what the verdict's flatness needs)
  - routing + probabilities + latents of 64 tokens, no decode  target ratio <= 1.25
and reports bytes per routing record of the routing-only trace (target <= 0.4), and the bytes
the probabilities add per record (issue 19: may the recorder store them by default?).
Without --ckpt it uses the tiny preset's backbone with RSR installed and non-zero expert
weights (the cost does not depend on training). Outputs go to runs/bench/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from rsr_model.install import install_rsr
from rsr_model.recorders import SamplingRecorder, Selection, sample_table
from rsr_model.sample import generate, load_model
from rsr_model.tasks import get_task
from traces import SamplingWriter, open_trace

PROMPTS = ["two red circles left of a blue square", "a green triangle", "three yellow squares",
           "a purple circle above a white triangle"]


def model(ckpt: str | None):
    if ckpt:
        task, transformer, rsr, _ = load_model(ckpt)
        return task, transformer, rsr
    task = get_task("tiny")
    torch.manual_seed(0)
    transformer = task.build_backbone().eval()
    rsr = install_rsr(transformer, task.default_rsr())
    with torch.no_grad():
        for layer in rsr.values():
            layer.experts.B.normal_(std=0.02)
    return task, transformer, rsr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    task, transformer, rsr = model(args.ckpt)
    items = [PROMPTS[i % len(PROMPTS)] for i in range(args.samples)]
    seeds = list(range(args.samples))
    task.condition(items + [""])  # warm the text-encoder cache: all variants pay the same
    selections = {"routing": Selection(), "routing+probs": Selection(probs=True),
                  "routing+probs+latents64": Selection(probs=True, latent_tokens=64)}

    def plain() -> None:
        for s in range(0, len(items), args.batch_size):
            generate(task, transformer, items[s:s + args.batch_size], seeds[s:s + args.batch_size], steps=args.steps)

    def recorded(name: str) -> None:
        rec = SamplingRecorder(task, transformer, rsr, selections[name], steps=args.steps)
        w = SamplingWriter(out / f"record_{name}.h5", rec.layout(), sample_table(task, items, seeds), overwrite=True)
        rec.record(w, items, seeds, batch_size=args.batch_size)
        w.close()

    variants = {"none": plain, **{n: (lambda n=n: recorded(n)) for n in selections}}
    times = {k: [] for k in variants}
    plain()  # warm-up
    for _ in range(args.reps):  # interleaved, so drift hits every variant alike
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.samples} samples x {args.steps} steps, guidance 3, batch {args.batch_size}, "
          f"K={rsr.config.experts}, L={rsr.config.steps}, layers {rsr.layer_indices}; "
          f"median of {args.reps}")
    for k, v in med.items():
        print(f"  {k:<26} {v:7.2f} s   ratio {v / med['none']:.3f}")
    with open_trace(out / "record_routing.h5") as tr:
        d = tr.dataset("/routing/expert")
        records = d.size
        stored = d.id.get_storage_size()
    print(f"  routing bytes per record: {stored / records:.3f} ({stored} bytes for {records} records)")
    with open_trace(out / "record_routing+probs.h5") as tr:
        prob = tr.dataset("/routing/prob").id.get_storage_size()
    size = {k: (out / f"record_{k}.h5").stat().st_size for k in ("routing", "routing+probs")}
    print(f"  probabilities add {prob / records:.3f} bytes per routing record ({prob} bytes); "
          f"file {size['routing']} -> {size['routing+probs']} bytes ({size['routing+probs'] / size['routing']:.2f}x)")


if __name__ == "__main__":
    main()

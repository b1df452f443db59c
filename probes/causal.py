"""Probe 16: causal effect of an expert — ablate or force it through the intervention hooks and
compare with the unmodified model, same prompts, same seeds.

Two effects are measured per intervention (summaries from `probes.stats.effect_summary`):

* denoiser (local): at every sampler step, the velocity the guided denoiser predicts on the
  *baseline* trajectory's x_t, with the intervention vs without — the direct effect of the
  expert at that timestep, free of trajectory divergence (`denoiser`, `denoiser_by_timestep`);
* final image (global): the whole sampling run with the intervention vs without, compared as
  model-space x0 (`final`) and as uint8 images in [0, 255] (`final_image`, `image_mean_abs_diff`).

An intervention that never fires (e.g. a timestep window that is never sampled) gives exactly
zero: both runs are bitwise the same computation. Usage:

    python -m probes.causal --ckpt CKPT --prompts "..." [--num-samples 2] [--steps 8]
        (--ablate-expert K | --force-expert K) [--t-window A:B] [--at-step S] [--region R] [--json OUT]
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

from cli_common.command import guard_startup

guard_startup(__name__)  # before the slow imports below: Ctrl-C while they load exits 130 with one line

import numpy as np
import torch

from .interventions import Intervention
from .stats import EffectAccumulator, effect_summary


@torch.no_grad()
def before_after(task, transformer, rsr, items: Sequence, seeds: Sequence[int], interventions: Sequence[Intervention],
                 steps: int = 8, guidance: float = 3.0, capture: Any = None,
                 on_step: Callable | None = None) -> dict[str, Any]:
    """The global before/after effect: sample `items` with `seeds` without, then with
    `interventions` (applied together). The one definition behind `causal_effect` and the
    dashboard's Intervene tab. `capture` (hook-point names) records those points in both runs
    (`rsr.hooks.cache`, after the interventions act); `on_step` is the baseline run's sampler
    callback. Returns the x0 and uint8 images of both runs, the captured calls, the effect
    summaries (`final` on model-space x0, `final_image` on images in [0, 255]), the mean absolute
    differences, and per intervention the routing decisions it changed."""
    from rsr_model.sample import generate

    K = rsr.config.experts
    run_hooks = [iv.hook(K) for iv in interventions]  # fresh instances: they count the intervened run only
    runs = {}
    for name, hooks, callback in (("before", [], on_step),
                                  ("after", [(iv.names(), h) for iv, h in zip(interventions, run_hooks)], None)):
        with rsr.hooks.hooks(hooks), (rsr.hooks.cache(capture) if capture is not None else nullcontext({})) as seen:
            x0 = generate(task, transformer, items, seeds, steps, guidance, on_step=callback)
        runs[name] = (x0, task.to_images(x0), seen)
    (base, img_a, seen_a), (x, img_b, seen_b) = runs["before"], runs["after"]
    return {
        # tokens_changed: routing decisions (sample x branch x timestep x layer x step x token) the
        # intervention changed in the intervened run; 0 means it never fired and every effect is 0
        "interventions": [{**iv.to_dict(), "tokens_changed": h.changed} for iv, h in zip(interventions, run_hooks)],
        "x0_before": base, "x0_after": x, "images_before": img_a, "images_after": img_b,
        "captured_before": seen_a, "captured_after": seen_b,
        "final": effect_summary(base.numpy(), x.numpy()).to_dict(),
        "final_image": effect_summary(img_a.astype(np.float64), img_b.astype(np.float64)).to_dict(),
        "image_mean_abs_diff": float(np.abs(img_a.astype(np.float64) - img_b.astype(np.float64)).mean()),
        "x0_mean_abs_diff": float((base - x).abs().mean()),
    }


def routing_changed(ids_before: np.ndarray, ids_after: np.ndarray) -> float:
    """Share of tokens whose routing decision differs between two runs (ablated ids count as a
    decision: an ablation changes every token it reaches)."""
    return float(np.mean(np.asarray(ids_before) != np.asarray(ids_after)))


@torch.no_grad()
def causal_effect(task, transformer, rsr, items: Sequence, seeds: Sequence[int],
                  interventions: Sequence[Intervention], steps: int = 8, guidance: float = 3.0) -> dict[str, Any]:
    """Effect of `interventions` (applied together) on the denoiser output and the final image."""
    from rsr_model.flow import SamplerStep

    K = rsr.config.experts
    hooks = [(iv.names(), iv.hook(K)) for iv in interventions]
    local = EffectAccumulator()
    by_t = []

    def compare_velocity(step: SamplerStep) -> None:
        """The intervened denoiser at the baseline trajectory's x_t."""
        with rsr.hooks.hooks(hooks):
            v_int = step.denoise(step.x, step.t, step.index)
        local.update(step.v.numpy(), v_int.numpy())
        by_t.append({"index": step.index, "timestep_value": float(step.t[0]),
                     **effect_summary(step.v.numpy(), v_int.numpy()).to_dict()})

    r = before_after(task, transformer, rsr, items, seeds, interventions, steps, guidance, on_step=compare_velocity)
    return {
        "interventions": r["interventions"],
        "n_samples": len(items), "steps": steps, "guidance": guidance, "seeds": [int(s) for s in seeds],
        "denoiser": local.result().to_dict(),
        "denoiser_by_timestep": by_t,
        **{key: r[key] for key in ("final", "final_image", "image_mean_abs_diff")},
    }


def expert_effects(ckpt: str | Path, items: Sequence, seeds: Sequence[int], steps: int = 8, guidance: float = 3.0,
                   kinds: Sequence[str] = ("ablate", "force")) -> dict[str, Any]:
    """Ablate / force each expert in turn (all layers, steps, tokens, timesteps)."""
    from rsr_model.sample import load_model

    task, transformer, rsr, _ = load_model(ckpt)
    items = task.parse_items(list(items))
    out: dict[str, Any] = {}
    for kind in kinds:
        for k in range(rsr.config.experts):
            r = causal_effect(task, transformer, rsr, items, seeds, [Intervention(kind, k)], steps, guidance)
            out[f"{kind}:{k}"] = {key: r[key] for key in ("denoiser", "final", "final_image", "image_mean_abs_diff")}
    return out


def main(argv: list[str] | None = None) -> int:
    from cli_common.command import Parser, finite_float, int_at_least, positive_int, run_main
    from cli_common.errors import UsageError
    from cli_common.outputs import check_output, write_atomic

    p = Parser(prog="python -m probes.causal", description="Causal effect of ablating or forcing an expert.",
               version=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--num-samples", type=positive_int, default=1)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--steps", type=positive_int, default=8)
    p.add_argument("--guidance", type=finite_float(0, 100), default=3.0)
    p.add_argument("--force-expert", type=int_at_least(0))
    p.add_argument("--ablate-expert", type=int_at_least(0))
    p.add_argument("--region")
    p.add_argument("--t-window")
    p.add_argument("--at-step", type=int)
    p.add_argument("--json", type=Path)
    p.add_argument("--overwrite", action="store_true")

    def body() -> None:
        from rsr_model.sample import load_model

        from .analysis import jsonable
        from .interventions import from_cli, sampled_timesteps
        from .record import item_file, read_items

        a = p.parse_args(argv)
        if a.force_expert is None and a.ablate_expert is None:
            raise UsageError("give --force-expert or --ablate-expert")
        check_output(a.json, a.overwrite, flag="--json", inputs={"--ckpt": a.ckpt, "--prompts": item_file(a.prompts)})
        prompts = read_items(a.prompts)
        task, transformer, rsr, _ = load_model(a.ckpt)
        if rsr is None:
            raise UsageError(f"{a.ckpt} has no RSR layers")
        items = task.parse_items(prompts)
        rows = [it for it in items for _ in range(a.num_samples)]
        ivs = from_cli(rsr, a.force_expert, a.ablate_expert, a.region, a.t_window, a.at_step,
                       grid=task.token_grid(transformer), timestep_values=sampled_timesteps(task, a.steps))
        print(f"sampling {len(rows)} image(s) x {a.steps} step(s) with and without the intervention", file=sys.stderr)
        seeds = [a.seed + j for j in range(len(rows))]
        r = causal_effect(task, transformer, rsr, rows, seeds, ivs, a.steps, a.guidance)
        print(f"denoiser relative change {r['denoiser']['pooled_relative_change']:.4g}, "
              f"final x0 relative change {r['final']['pooled_relative_change']:.4g}, "
              f"image mean |diff| {r['image_mean_abs_diff']:.3g} / 255")
        for iv in r["interventions"]:
            print(f"{iv['kind']} expert {iv['expert']}: changed {iv['tokens_changed']} routing decision(s)"
                  + ("; it never fired, so every effect is 0" if not iv["tokens_changed"] else ""))
        if a.json:
            write_atomic(a.json, json.dumps(jsonable(r), indent=1))  # NaN -> null: valid JSON

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

"""The shifted task's table with its controls (issue 20): `evaluate --shift`.

The `tiny-shift` preset's base learns the plain shapes; its RSR stage learns the same scenes in
four colour styles named by the caption (`rsr_model.data.styles`), work the frozen base cannot do.
From ONE base checkpoint (trained here, seed 0, or `--base`), every row trains the RSR stage with
the same budget (steps, batch, learning rate) and training seed, and differs only in these flags:

    rsr         the preset's defaults: K experts of rank r, L recursion steps, the learned recipe
                (upcycling, soft phase, annealed hard routing; rsr_model/recipe.py)
    lora_r      --mode sft --rank r        one LoRA with the same ACTIVE parameters as one expert
    lora_Kr     --mode sft --rank K*r      one LoRA with the same TOTAL expert parameters
    rsr_random  --train-routing random     the RSR model trained under uniformly random routing

(r and K are the preset's `default_rsr()`.) Every checkpoint is measured on the SAME held-out data:

    held-out sets   probes.routing_value.held_out_sets (fresh styled scenes of every combination,
                    fixed seeds); loss = flow-matching MSE per sample, mean per timestep bin, bins
                    weighted equally (as the routing value weights them)
    adapter_gain    1 - L_row / L_base per bin, bins equal, with its 95% bootstrap interval; L_base is
                    the frozen base checkpoint on the same samples
    routing value   gated rows: probes.routing_value.routing_value on those sets (every scope: value per
                    image and per token with intervals, oracle gap, routing share, argmax vs sampled,
                    forced experts) and the verdict of every recursion step (probes.verdict.add_verdicts on
                    probes.calibrate.trace_evidence's report skeleton), plus the whole model's verdict
                    (scope "all")
    gate_vs_best_forced  (L_best_forced - L_gate) / L_best_forced, scope "all": the gate's routing
                    against the best single expert used for every token (> 0: routing beats any one expert)
    ami_style       AMI(chosen expert; style of the token's image) per (layer, recursion step), on styled
                    scenes with known styles (every caption kept) at training-distribution noise levels;
                    the max over steps is reported
    rsr_vs_lora_r   per seed, (L_lora_r - L_rsr) / L_lora_r per bin, bins equal, with a paired 95% interval
                    (the same held-out samples under both models)

Checkpoints are kept under OUT/checkpoints (named by row, seed and the base's content) and reused
when a later run asks for the same row with the same budget. The targets of issue 20 are judged
from the figures in `targets` (met, not met, or not measured by this command).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cli_common.errors import UsageError

from .table import base_tag, train_checkpoint

PRESET = "tiny-shift"
ROWS = ("rsr", "lora_r", "lora_Kr", "rsr_random")
GATED = ("rsr", "rsr_random")
ROW_TEXT = {"rsr": "RSR, learned recipe", "lora_r": "LoRA rank r (same active parameters)",
            "lora_Kr": "LoRA rank K·r (same total parameters)", "rsr_random": "RSR trained under random routing"}
STYLE_SEED = 3_000_017  # styled scenes for AMI(expert; style): a stream neither training nor the held-out sets use
SCORE_SEED = 3_000_019  # held-out-combination prompts and sampler seeds of the scored images
# The training flags a reused checkpoint must have been trained with. Not --base's path: a row's file name
# carries the base's content hash (table.base_tag), so a copied or moved folder is still reused.
RUN_ARGS = ("seed", "mode", "rank", "train_routing", "upcycle_steps", "upcycle_noise", "soft_steps", "anneal",
            "batch_size")


@dataclass(frozen=True)
class ShiftBudget:
    base_steps: int  # base stage, when the table trains its own base
    rsr_steps: int  # RSR stage of every row
    seeds: tuple[int, ...]  # training seeds of every row
    batch_size: int | None = None  # training batch (None: the preset's)
    rsr_flags: tuple[str, ...] = ()  # extra training flags of the learned row (the preset's recipe if none)
    value_samples: int = 32  # held-out samples per timestep bin and set
    value_bins: int = 4
    value_sets: int = 2
    value_draws: int = 8  # draws of each random routing condition
    bootstrap: int = 1000
    style_samples: int = 64  # styled scenes per batch for AMI(expert; style)
    style_batches: int = 4
    score_images: int = 216  # held-out-combination prompts sampled and scored per (row, seed): 648 pairs over 3 seeds
    sample_steps: int = 28  # sampler of the scored images (the demo's)
    guidance: float = 3.0


# The preset's own stage lengths (tiny-shift: base 600, RSR 400; its recipe's upcycling and soft phase
# take 100 steps each) and three training seeds.
DEFAULT = ShiftBudget(base_steps=600, rsr_steps=400, seeds=(0, 1, 2))
# For tests: the recipe's phases scaled down to fit a 6-step stage.
QUICK = ShiftBudget(base_steps=4, rsr_steps=6, seeds=(0,), batch_size=4, rsr_flags=("--upcycle-steps", "1",
                    "--soft-steps", "1"), value_samples=4, value_bins=1, value_sets=1, value_draws=1, bootstrap=100,
                    style_samples=8, style_batches=1, score_images=4, sample_steps=2)


# --- rows and training ------------------------------------------------------------------------

def preset_task():
    from rsr_model.tasks import get_task

    return get_task(PRESET)


def row_flags(row: str, budget: ShiftBudget, cfg=None) -> list[str]:
    """The training flags of `row` on top of the shared ones; r and K from the preset's RSR configuration."""
    cfg = cfg or preset_task().default_rsr()
    return {"rsr": list(budget.rsr_flags), "lora_r": ["--mode", "sft", "--rank", str(cfg.rank)],
            "lora_Kr": ["--mode", "sft", "--rank", str(cfg.experts * cfg.rank)],
            "rsr_random": ["--train-routing", "random"]}[row]


def _batch_flags(budget: ShiftBudget) -> list[str]:
    return ["--batch-size", str(budget.batch_size)] if budget.batch_size else []


def _expect(argv: list[str], stage: str, steps: int) -> dict[str, Any]:
    """What a reusable checkpoint of `argv` holds: its plan and the run-defining flags as parsed."""
    from rsr_model.arguments import train_args

    parsed = vars(train_args(argv))
    return {"plan": {stage: steps},
            "args": {k: str(parsed[k]) if isinstance(parsed[k], Path) else parsed[k] for k in RUN_ARGS if k in parsed}}


def train_base(out: Path, budget: ShiftBudget) -> tuple[Path, float]:
    path = out / "checkpoints" / "shift_base.pt"  # not table's base.pt: another preset, same folder
    argv = ["--preset", PRESET, "--stage", "base", "--steps", str(budget.base_steps), "--seed", "0",
            "--save-every", str(max(1, budget.base_steps // 4)), *_batch_flags(budget)]
    return path, train_checkpoint(path, argv, _expect(argv, "base", budget.base_steps))


def row_argv(base: Path, row: str, seed: int, budget: ShiftBudget) -> list[str]:
    return ["--preset", PRESET, "--stage", "rsr", "--base", str(base), "--steps", str(budget.rsr_steps),
            "--seed", str(seed), "--save-every", str(budget.rsr_steps), *_batch_flags(budget),
            *row_flags(row, budget)]


def train_row(out: Path, base: Path, row: str, seed: int, budget: ShiftBudget) -> tuple[Path, float]:
    path = out / "checkpoints" / f"shift_{row}_s{seed}_{base_tag(base)}.pt"
    argv = row_argv(base, row, seed, budget)
    return path, train_checkpoint(path, argv, _expect(argv, "rsr", budget.rsr_steps))


def check_budget(budget: ShiftBudget, base: Path | None) -> None:
    """Refuse, before any training, a budget whose learned row cannot run (its recipe's upcycling and
    soft phase must leave hard-routing steps) or a --base that is not a finished tiny-shift base stage."""
    from rsr_model.arguments import train_args
    from rsr_model.config import ConfigError
    from rsr_model.recipe import Recipe

    task = preset_task()
    parsed = train_args(row_flags("rsr", budget))
    names = ("upcycle_steps", "upcycle_noise", "soft_steps", "anneal", "train_routing")
    recipe = Recipe.of_stage({n: getattr(task, n) if getattr(parsed, n) is None else getattr(parsed, n)
                              for n in names}, budget.rsr_steps)
    try:
        recipe.check(budget.rsr_steps, task.default_rsr().has_gate)
    except ConfigError as e:
        raise UsageError(f"--steps {budget.rsr_steps}: {e}") from None
    if base is not None:
        check_base(base)


def check_base(base: Path) -> None:
    from rsr_model.checkpoint import CheckpointError, load_checkpoint

    try:
        ck = load_checkpoint(base)
    except CheckpointError as e:
        raise UsageError(f"--base {base}: {e}") from None
    if ck.get("preset") != PRESET or ck.get("rsr_config") is not None or "base" not in ck.get("plan", {}):
        raise UsageError(f"--base {base} is not a base-stage checkpoint of preset {PRESET!r} (it is a "
                         f"{ck.get('preset')!r} {'RSR-stage' if ck.get('rsr_config') else 'base-stage'} checkpoint)")


# --- held-out data ----------------------------------------------------------------------------

@dataclass
class StyledBatch:
    """Styled scenes with known styles at training-distribution noise levels (every caption kept)."""

    xt: Any  # (B, C, H, W)
    t: Any  # (B,) timestep
    cond: dict[str, Any]
    style: np.ndarray  # (B,) index into styles.STYLES


def styled_batches(task, n: int, count: int, seed: int = STYLE_SEED) -> list[StyledBatch]:
    import torch

    from rsr_model.data import styles
    from rsr_model.flow import training_pair

    out = []
    for j in range(count):
        rng = np.random.default_rng([seed, j])
        images, captions, names = styles.sample_batch(rng, n, task.size, task.eval_split)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        xt, t, _ = training_pair(torch.from_numpy(images), gen, task.weighting, task.shift)
        out.append(StyledBatch(xt, t, task.condition(captions), np.array([styles.STYLES.index(s) for s in names])))
    return out


def per_sample_losses(transformer, sets) -> np.ndarray:
    """(S, 1, bins, n) flow-matching loss of every held-out sample under the model's own routing, the
    layout of probes.routing_interval (sets, draws, bins, samples)."""
    import torch

    rows = []
    with torch.no_grad():
        for batches in sets:
            per_bin = []
            for b in batches:
                pred = transformer(hidden_states=b.xt, timestep=b.t, **b.cond).sample
                per_bin.append(((pred.float() - b.target.float()) ** 2).mean(dim=(1, 2, 3)).double().numpy())
            rows.append(np.stack(per_bin))
    return np.stack(rows)[:, None]


def relative_with_interval(a: np.ndarray, b: np.ndarray, budget: ShiftBudget, seed: int = 0) -> dict[str, Any]:
    """1 - L_a / L_b per bin, bins equal, and its 95% bootstrap interval over paired samples and sets."""
    from probes.routing_interval import Resampler, estimate, relative_gain

    S, _, bins, n = a.shape
    res = Resampler.new(S, bins, n, budget.bootstrap, seed)
    value, ci = estimate({"a": a, "b": b}, lambda m: relative_gain(m["a"], m["b"]), res)
    return {"value": value, "ci95": ci}


# --- routing figures of the gated rows --------------------------------------------------------

def style_ami(transformer, rsr, batches: Sequence[StyledBatch]) -> dict[str, Any]:
    """AMI(chosen expert; style of the token's image) per (layer, recursion step) (probes.stats.mi_summary)."""
    import torch

    from probes.stats import mi_summary
    from rsr_model.data.styles import STYLES
    from rsr_model.hooks import hook_name

    K = rsr.config.experts
    tables: dict[tuple[int, int], np.ndarray] = {}
    for batch in batches:
        def on_expert(ids, ctx, labels=batch.style) -> None:
            table = tables.setdefault((ctx.layer, ctx.step), np.zeros((K, len(STYLES)), np.int64))
            chosen = ids.numpy()
            label = np.broadcast_to(labels.reshape((-1,) + (1,) * (chosen.ndim - 1)), chosen.shape)
            keep = chosen >= 0
            np.add.at(table, (chosen[keep], label[keep]), 1)
        with torch.no_grad(), rsr.hooks.hooks({hook_name("*", "expert", "*"): on_expert}):
            transformer(hidden_states=batch.xt, timestep=batch.t, **batch.cond)
    by_step = {}
    for (layer, step), table in sorted(tables.items()):
        mi = mi_summary(table, n_perm=199, seed=0)
        by_step[f"{layer}.{step}"] = {"layer": layer, "step": step, "ami": float(mi.ami), "p_value": float(mi.p_value),
                                      "table": table.tolist()}
    best = max(by_step, key=lambda k: by_step[k]["ami"])
    return {"labels": list(STYLES), "by_step": by_step, "max": by_step[best]["ami"], "at": best}


def gated_figures(task, transformer, rsr, ckpt: dict, sets, style: Sequence[StyledBatch],
                  budget: ShiftBudget) -> dict[str, Any]:
    """Routing value (every scope), verdicts per step and overall, gate vs best forced expert, AMI(style)."""
    import torch

    from probes.calibrate import trace_evidence
    from probes.routing_value import planted_for, routing_value
    from probes.verdict import add_verdicts, step_verdict

    torch.manual_seed(0)
    value = routing_value(transformer, rsr, sets, random_draws=budget.value_draws, n_boot=budget.bootstrap)
    value["planted"] = planted_for(ckpt, task, transformer, rsr, sets[0])
    report = trace_evidence(transformer, rsr, sets[0])  # the report skeleton the verdicts are written into
    add_verdicts(report, value)
    ami = style_ami(transformer, rsr, style)
    whole = value["scopes"]["all"]
    steps = [s for layer in report["layers"].values() for s in layer["steps"].values()]
    overall_step = {"gate": {"mean_margin": float(np.mean([s["gate"]["mean_margin"] for s in steps]))},
                    "mi": {"style": {"ami": ami["max"], "p_value": ami["by_step"][ami["at"]]["p_value"]}}}
    verdict = step_verdict(overall_step, whole, whole, value["planted"])
    forced = np.asarray(whole["overall"]["forced"], float)
    gate = float(whole["overall"]["gate"])
    loss = whole["loss"]
    oracle_value = float(relative_gain_of(loss["oracle"], loss["random_image"]))
    return {
        "routing_value": value,
        "verdicts": {f"{lid}.{sid}": s["verdict"]["label"] for lid, layer in report["layers"].items()
                     for sid, s in layer["steps"].items()},
        "verdict_texts": {f"{lid}.{sid}": s["verdict"]["text"] for lid, layer in report["layers"].items()
                          for sid, s in layer["steps"].items()},
        "verdict": verdict["label"], "verdict_text": verdict["text"],
        "value": whole["value"], "value_ci95": whole["value_ci95"],
        "value_token": whole["value_token"], "value_token_ci95": whole["value_token_ci95"],
        "routing_share": whole["routing_share"], "oracle_gap": whole["oracle_gap"],
        "argmax_vs_sampled": whole["argmax_vs_sampled"],
        "oracle_value": oracle_value,
        "value_over_oracle": float(whole["value"] / oracle_value) if oracle_value > 0 else None,
        "gate_loss": gate, "forced_loss": forced.tolist(), "best_forced": int(forced.argmin()),
        "gate_vs_best_forced": float((forced.min() - gate) / forced.min()),
        "gate_margin": overall_step["gate"]["mean_margin"],
        "ami_style": ami, "ami_style_max": ami["max"],
    }


def relative_gain_of(a, b) -> float:
    from probes.routing_interval import relative_gain

    return float(relative_gain(np.asarray(a, float), np.asarray(b, float)))


# --- one checkpoint ---------------------------------------------------------------------------

def adapter_parameters(rsr) -> int:
    return int(sum(p.numel() for p in rsr.parameters())) if rsr is not None else 0


MEASURED_BY = ("value_samples", "value_bins", "value_sets", "value_draws", "bootstrap", "style_samples",
               "style_batches")  # the budget fields a row's measurement depends on


def measure(ckpt: Path, row: str, sets, style: Sequence[StyledBatch], base_losses: np.ndarray,
            budget: ShiftBudget) -> tuple[dict[str, Any], np.ndarray]:
    """A row's figures on the shared held-out data, and its per-sample losses (for the paired comparison).
    Kept beside the checkpoint (CKPT.measure.json, keyed by the checkpoint's and base losses' content and the
    measurement budget), so processes that measured seeds apart are joined into one table without
    measuring again."""
    import hashlib
    import json

    from cli_common.jsonable import jsonable
    from cli_common.outputs import sha256_file, write_atomic

    key = {"checkpoint": sha256_file(ckpt), "base_losses": hashlib.sha256(base_losses.tobytes()).hexdigest(),
           "row": row, **{k: getattr(budget, k) for k in MEASURED_BY}}
    cache = ckpt.with_name(ckpt.name + ".measure.json")
    if cache.is_file():
        try:
            kept = json.loads(cache.read_text())
            if kept.get("key") == key:
                return kept["figures"], np.asarray(kept["losses"], dtype=np.float64).reshape(kept["shape"])
        except (ValueError, KeyError):
            pass  # unreadable: measured again and rewritten
    figures, losses = _measure(ckpt, row, sets, style, base_losses, budget)
    figures = jsonable(figures)  # as the result file will hold them, so a reused row reads the same
    write_atomic(cache, json.dumps({"key": key, "figures": figures, "losses": losses.ravel().tolist(),
                                    "shape": list(losses.shape)}))
    return figures, losses


def _measure(ckpt: Path, row: str, sets, style: Sequence[StyledBatch], base_losses: np.ndarray,
             budget: ShiftBudget) -> tuple[dict[str, Any], np.ndarray]:
    from probes.routing_interval import bin_means
    from rsr_model.sample import load_model

    task, transformer, rsr, ck = load_model(ckpt)
    losses = per_sample_losses(transformer, sets)
    by_bin = bin_means(losses)
    gain = relative_with_interval(losses, base_losses, budget)
    out = {"loss": float(by_bin.mean()), "loss_by_bin": by_bin.tolist(), "adapter_gain": gain["value"],
           "adapter_gain_ci95": gain["ci95"], "adapter_parameters": adapter_parameters(rsr),
           "experts": rsr.config.experts, "rank": rsr.config.rank, "recursion_steps": rsr.config.steps}
    if row in GATED:
        out.update(gated_figures(task, transformer, rsr, ck, sets, style, budget))
    return out, losses


# --- scorer accuracy on held-out combinations ---------------------------------------------------

def score_prompts(task, n: int) -> tuple[list[str], list[int]]:
    """`n` styled captions of held-out (style, shape) combinations (split "test": pairs training never
    showed together) and their sampler seeds; the same for every row and seed, so images are paired."""
    from rsr_model.data import styles

    _, captions, _ = styles.sample_batch(np.random.default_rng(SCORE_SEED), n, task.size, "test")
    return captions, [SCORE_SEED + i for i in range(n)]


def scored(ckpt: Path, budget: ShiftBudget, batch: int = 48) -> list[bool]:
    """Per image, whether `evaluation.style_scorer` judges the checkpoint's sample of each held-out prompt
    correct. Kept beside the checkpoint (CKPT.score.json, keyed by its content and the sampling budget)."""
    import json

    from cli_common.outputs import sha256_file, write_atomic
    from rsr_model.sample import generate, load_model

    from .style_scorer import SCORER_VERSION, score_styled

    key = {"checkpoint": sha256_file(ckpt), "images": budget.score_images, "steps": budget.sample_steps,
           "guidance": budget.guidance, "seed": SCORE_SEED, "scorer": SCORER_VERSION}
    cache = ckpt.with_name(ckpt.name + ".score.json")
    if cache.is_file():
        try:
            kept = json.loads(cache.read_text())
            if kept.get("key") == key:
                return [bool(c) for c in kept["correct"]]
        except (ValueError, KeyError):
            pass
    task, transformer, _, _ = load_model(ckpt)
    prompts, seeds = score_prompts(task, budget.score_images)
    correct: list[bool] = []
    for start in range(0, len(prompts), batch):
        x0 = generate(task, transformer, prompts[start:start + batch], seeds[start:start + batch],
                      steps=budget.sample_steps, guidance=budget.guidance)
        correct += [bool(score_styled(im, p)["correct"])
                    for im, p in zip(task.to_images(x0), prompts[start:start + batch])]
    write_atomic(cache, json.dumps({"key": key, "correct": correct}))
    return correct


def paired_accuracy(runs: list[dict[str, Any]], n_boot: int = 2000) -> dict[str, Any]:
    """RSR minus LoRA rank r scorer accuracy on the same prompts and sampler seeds: per seed and pooled over
    seeds, each with a 95% bootstrap interval over the paired images."""
    by = {(r["row"], r["seed"]): np.asarray(r["correct"], float) for r in runs if "correct" in r}
    seeds = [s for (row, s) in by if row == "rsr" and ("lora_r", s) in by]
    rng = np.random.default_rng(0)

    def interval(d: np.ndarray) -> list[float]:
        means = d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=1)
        return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]

    diffs = [by["rsr", s] - by["lora_r", s] for s in seeds]
    pooled = np.concatenate(diffs) if diffs else np.zeros(0)
    return {"seeds": seeds, "pairs": int(pooled.size),
            "difference_per_seed": [float(d.mean()) for d in diffs], "ci95_per_seed": [interval(d) for d in diffs],
            "difference": float(pooled.mean()) if pooled.size else None,
            "ci95": interval(pooled) if pooled.size else None}


# --- the whole table --------------------------------------------------------------------------

SUMMARY = ("loss", "accuracy", "adapter_gain", "value", "value_token", "routing_share", "oracle_gap",
           "argmax_vs_sampled", "value_over_oracle", "gate_vs_best_forced", "ami_style_max")


def _mean_std(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row kind: mean and std over training seeds of every figure the row has."""
    rows = []
    for row in ROWS:
        group = [r for r in runs if r["row"] == row]
        if not group:
            continue
        figures = {k: _mean_std([r[k] for r in group]) for k in SUMMARY
                   if all(isinstance(r.get(k), (int, float)) for r in group)}
        rows.append({"row": row, "seeds": [r["seed"] for r in group], "figures": figures,
                     "verdicts": [r["verdict"] for r in group] if row in GATED else None})
    return rows


def paired_rsr_vs_lora(runs: list[dict[str, Any]], losses: dict[tuple[str, int], np.ndarray],
                       budget: ShiftBudget) -> dict[str, Any]:
    """Per seed: (L_lora_r - L_rsr) / L_lora_r on the same held-out samples, with its paired interval."""
    seeds = [r["seed"] for r in runs if r["row"] == "rsr" and ("lora_r", r["seed"]) in losses]
    per = [relative_with_interval(losses["rsr", s], losses["lora_r", s], budget, seed=s) for s in seeds]
    return {"seeds": seeds, "difference_per_seed": [p["value"] for p in per], "ci95_per_seed": [p["ci95"] for p in per]}


def run_shift(out: Path, budget: ShiftBudget, base: Path | None = None,
              progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """Train (or reuse) the base and every (row, seed), measure them on the same held-out data, judge the
    targets; returns (result, markdown)."""
    from probes.routing_interval import bin_means
    from probes.routing_value import held_out_sets
    from rsr_model.sample import load_model

    started = time.perf_counter()
    say = progress or (lambda _: None)
    check_budget(budget, base)
    seconds: dict[str, float] = {}
    if base is None:
        say(f"base, {budget.base_steps} steps")
        base, seconds["base_training"] = train_base(out, budget)
        base_note = f"trained here, {budget.base_steps} steps, seed 0"
    else:  # a checkpoint of a longer run is a base of the steps it has (stated: its schedule was the longer one's)
        from rsr_model.checkpoint import load_checkpoint

        ck = load_checkpoint(base)
        done, planned = ck["progress"].get("base", 0), ck["plan"]["base"]
        longer = f", a checkpoint of a {planned}-step run" if done < planned else ""
        base_note = f"given, {base} ({done} steps{longer})"
    task, base_model, _, _ = load_model(base)
    t0 = time.perf_counter()
    sets = held_out_sets(task, budget.value_samples, budget.value_bins, budget.value_sets)
    style = styled_batches(task, budget.style_samples, budget.style_batches)
    base_losses = per_sample_losses(base_model, sets)
    seconds["base_measure"] = time.perf_counter() - t0
    runs, losses = [], {}
    for seed in budget.seeds:
        for row in ROWS:
            say(f"{row} seed {seed}")
            path, train_s = train_row(out, base, row, seed, budget)
            t0 = time.perf_counter()
            figures, losses[row, seed] = measure(path, row, sets, style, base_losses, budget)
            measure_s = time.perf_counter() - t0
            say(f"{row} seed {seed}: sampling and scoring {budget.score_images} held-out prompts")
            t0 = time.perf_counter()
            correct = scored(path, budget)
            runs.append({"row": row, "seed": seed, "checkpoint": path.name, "train_flags": row_flags(row, budget),
                         **figures, "correct": correct, "accuracy": float(np.mean(correct)) if correct else None,
                         "seconds": {"train": train_s, "measure": measure_s, "score": time.perf_counter() - t0},
                         "reused": train_s == 0.0})
    seconds["total"] = time.perf_counter() - started
    result = {"preset": PRESET, "budget": asdict(budget), "base": base_note,
              "base_loss": float(bin_means(base_losses).mean()), "base_loss_by_bin": bin_means(base_losses).tolist(),
              "held_out": {"sets": budget.value_sets, "bins": budget.value_bins, "samples": budget.value_samples,
                           "split": task.eval_split},
              "runs": runs, "rows": summarise(runs), "rsr_vs_lora_r": paired_rsr_vs_lora(runs, losses, budget),
              "accuracy_rsr_vs_lora_r": paired_accuracy(runs),
              "seconds": seconds}
    result["targets"] = targets(result)
    return result, markdown(result)


# --- the targets of issue 20 ------------------------------------------------------------------

def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:+.{digits}f}%"


def _ci_pct(x: float | None, ci: Sequence[float] | None) -> str:
    if x is None:
        return "n/a"
    return _pct(x) + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci is not None else "")


def _target(figure: str, target: str, shown: list[str], ok: list[bool] | None) -> dict[str, Any]:
    """One target: per-seed figures as shown, and met only when every seed meets it (None: not measured)."""
    return {"figure": figure, "target": target, "per_seed": shown,
            "met": None if ok is None else bool(ok) and all(ok)}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 20, judged from the figures of every seed (never hard-coded)."""
    rsr = [r for r in result["runs"] if r["row"] == "rsr"]
    ctl = [r for r in result["runs"] if r["row"] == "rsr_random"]
    paired = result["rsr_vs_lora_r"]
    ratio = [r.get("value_over_oracle") for r in rsr]
    specialized_step = [any(v == "specialized" for v in r["verdicts"].values()) for r in ctl]
    return [
        _target("adapter gain, 1 - L_gate / L_base", ">= 10%", [_pct(r["adapter_gain"]) for r in rsr],
                [r["adapter_gain"] >= 0.10 for r in rsr]),
        _target("routing value, all steps, per-image null", ">= 5%, lower end > 2%",
                [_ci_pct(r["value"], r["value_ci95"]) for r in rsr],
                [r["value"] >= 0.05 and r["value_ci95"][0] > 0.02 for r in rsr]),
        _target("routing value / oracle value", ">= 0.8",
                ["n/a (oracle no better than random)" if x is None else f"{x:.2f}" for x in ratio],
                [x is not None and x >= 0.8 for x in ratio]),
        _target("AMI(expert; style), max over recursion steps", ">= 0.5, nothing planted",
                [f"{r['ami_style_max']:.2f} ({_where(r['ami_style'])})" + (", planted" if r["routing_value"].get(
                    "planted") else "") for r in rsr],
                [r["ami_style_max"] >= 0.5 and not r["routing_value"].get("planted") for r in rsr]),
        _target("gate vs best single forced expert", ">= 3% lower loss",
                [_pct(r["gate_vs_best_forced"]) for r in rsr], [r["gate_vs_best_forced"] >= 0.03 for r in rsr]),
        _target("RSR vs LoRA rank r, held-out loss", ">= 3% lower, every seed (paired interval above 0)",
                [_ci_pct(d, ci) for d, ci in zip(paired["difference_per_seed"], paired["ci95_per_seed"])],
                [d >= 0.03 and ci[0] > 0 for d, ci in zip(paired["difference_per_seed"], paired["ci95_per_seed"])]),
        _target("random-routing control", "verdict not specialized; value interval includes 0",
                [f"{r['verdict']}{' (a step specialized)' if sp else ''}, value {_ci_pct(r['value'], r['value_ci95'])}"
                 for r, sp in zip(ctl, specialized_step)],
                [r["verdict"] != "specialized" and not sp and r["value_ci95"][0] <= 0 <= r["value_ci95"][1]
                 for r, sp in zip(ctl, specialized_step)]),
        _target("verdict of the learned model (scope all)", "specialized, every seed", [r["verdict"] for r in rsr],
                [r["verdict"] == "specialized" for r in rsr]),
        _accuracy_target(result),
    ]


def _accuracy_target(result: dict[str, Any]) -> dict[str, Any]:
    acc = result.get("accuracy_rsr_vs_lora_r")
    figure, wanted = "scorer accuracy on held-out combinations", "RSR above LoRA rank r, >= 600 paired images"
    if not acc or not acc["pairs"]:  # a result written before the scorer was part of the table
        return _target(figure, wanted, ["not measured"], None)
    shown = [f"seed {s}: {_ci_pct(d, ci)}" for s, d, ci in zip(acc["seeds"], acc["difference_per_seed"],
                                                              acc["ci95_per_seed"])]
    shown.append(f"pooled over {acc['pairs']} pairs: {_ci_pct(acc['difference'], acc['ci95'])}")
    return _target(figure, wanted, shown, [acc["pairs"] >= 600 and acc["ci95"][0] > 0])


# --- markdown ---------------------------------------------------------------------------------

COLUMNS = ("row", "seed", "held-out loss", "scorer accuracy", "adapter gain [95%]", "routing value [95%]",
           "per-token value", "routing share", "oracle gap", "value / oracle", "gate vs best forced",
           "AMI(e; style) max", "verdict: all (per step)", "params", "train s", "measure s")


def _num(x: Any, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and x != x) else format(x, fmt)


def _where(ami: dict[str, Any]) -> str:
    at = ami["by_step"][ami["at"]]
    return f"block {at['layer']} step {at['step']}"


def _run_cells(r: dict[str, Any]) -> list[str]:
    gated = r["row"] in GATED
    accuracy = "—" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}% of {len(r['correct'])}"
    cells = [r["row"], str(r["seed"]), f"{r['loss']:.4f}", accuracy, _ci_pct(r["adapter_gain"], r["adapter_gain_ci95"])]
    if gated:
        steps = ", ".join(r["verdicts"].values())
        cells += [_ci_pct(r["value"], r["value_ci95"]), _pct(r["value_token"]), _num(r["routing_share"], ".2f"),
                  _pct(r["oracle_gap"]), _num(r.get("value_over_oracle"), ".2f"), _pct(r["gate_vs_best_forced"]),
                  f"{r['ami_style_max']:.2f} ({_where(r['ami_style'])})", f"{r['verdict']} ({steps})"]
    else:
        cells += ["—"] * 8
    return cells + [str(r["adapter_parameters"]), f"{r['seconds']['train']:.0f}" + (" (reused)" if r["reused"] else ""),
                    f"{r['seconds']['measure'] + r['seconds'].get('score', 0.0):.0f}"]


def _mean_cells(row: dict[str, Any]) -> list[str]:
    f = row["figures"]

    def ms(key: str, pct: bool = True, fmt: str = ".2f", sign: str = "+") -> str:
        if key not in f:
            return "—"
        m, s = f[key]["mean"], f[key]["std"]
        return f"{100 * m:{sign}.1f} ± {100 * s:.1f}%" if pct else f"{m:{fmt}} ± {s:{fmt}}"
    return [f"**{row['row']}**", "mean ± std", ms("loss", False, ".4f"), ms("accuracy", sign="-"), ms("adapter_gain"),
            ms("value"), ms("value_token"), ms("routing_share", False), ms("oracle_gap"),
            ms("value_over_oracle", False), ms("gate_vs_best_forced"), ms("ami_style_max", False),
            " / ".join(row["verdicts"]) if row["verdicts"] else "—", "", "", ""]


def markdown(result: dict[str, Any]) -> str:
    from .markdown import table_lines

    rows = [_run_cells(r) for r in result["runs"]] + [_mean_cells(row) for row in result["rows"]]
    lines = table_lines(COLUMNS, rows) + [""]
    paired = result["rsr_vs_lora_r"]
    if paired["seeds"]:
        per = "; ".join(f"seed {s}: {_ci_pct(d, ci)}" for s, d, ci in
                        zip(paired["seeds"], paired["difference_per_seed"], paired["ci95_per_seed"]))
        lines += [f"RSR vs LoRA rank r, (L_lora_r - L_rsr) / L_lora_r on the same held-out samples: {per}.", ""]
    acc = result.get("accuracy_rsr_vs_lora_r")
    if acc and acc["pairs"]:
        per = "; ".join(f"seed {s}: {_ci_pct(d, ci)}" for s, d, ci in
                        zip(acc["seeds"], acc["difference_per_seed"], acc["ci95_per_seed"]))
        lines += [f"Scorer accuracy on held-out combinations (evaluation/style_scorer.py), RSR minus LoRA rank r on "
                  f"the same prompts and sampler seeds: {per}; pooled over {acc['pairs']} pairs "
                  f"{_ci_pct(acc['difference'], acc['ci95'])}.", ""]
    lines += table_lines(["target (issue 20)", "wanted", "per seed", "met"],
                         [[t["figure"], t["target"], "; ".join(t["per_seed"]),
                           "not measured" if t["met"] is None else "met" if t["met"] else "not met"]
                          for t in result["targets"]]) + [""]
    b, h = result["budget"], result["held_out"]
    lines.append(f"Preset {result['preset']}; base {result['base']}, frozen-base held-out loss "
                 f"{result['base_loss']:.4f}. RSR stage {b['rsr_steps']} steps per row"
                 f"{' with ' + ' '.join(b['rsr_flags']) + ' on the learned row' if b['rsr_flags'] else ''}, training "
                 f"seeds {list(b['seeds'])}. Held-out: {h['sets']} set(s) x {h['bins']} timestep bin(s) x "
                 f"{h['samples']} samples (split {h['split']!r}), bins weighted equally; {b['value_draws']} "
                 f"draw(s) per random condition; AMI on {b['style_batches']} x {b['style_samples']} styled scenes; "
                 f"{b.get('score_images', 0)} held-out-combination prompts sampled per row and seed "
                 f"({b.get('sample_steps')} steps, guidance {b.get('guidance')}) and scored. "
                 f"A target is met only when every seed meets it. Wall time {result['seconds']['total']:.0f} s.")
    return "\n".join(lines)

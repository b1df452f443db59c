"""The ablation table (the paper's Table 3 in small): `evaluate --table`.

From one base checkpoint of the `tiny` preset, every row trains the RSR stage with the same
budget (steps, batch, learning rate) and differs only in mode and target blocks:

    targets   middle = block 2 of 6; multi = blocks 1, 2, 3 (the paper's 4, 8, 12 of 24, scaled)
    modes     sft (K=1, L=1), no_recursion (K, L=1), no_modulation (K=1, L), rsr (K, L)

each with several training seeds. Every checkpoint samples the same images (the held-apart
prompt set, the same number of images per category, fixed sampler seeds), the scorer judges
them, and the table shows per category the mean accuracy over training seeds ± their standard
deviation, the overall score (mean of the six categories, as GenEval's), and the routing
figures of `routing.py`. RSR is compared with SFT by an exact McNemar test on the paired
images (same target, training seed, prompt and sampler seed).

Checkpoints are kept under OUT/checkpoints and reused when a later run asks for the same row
with the same budget, so an interrupted table resumes where it stopped.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rsr_model.data.shapes import CATEGORIES

from .prompts import PlannedImage, plan

MODES = ("sft", "no_recursion", "no_modulation", "rsr")
TARGETS = {"middle": [2], "multi": [1, 2, 3]}
PRESET = "tiny"


@dataclass(frozen=True)
class Budget:
    base_steps: int  # base stage, when the table trains its own base
    rsr_steps: int  # RSR stage of every row
    seeds: tuple[int, ...]  # training seeds of every row
    images_per_category: int
    sample_steps: int = 28
    guidance: float = 3.0
    batch_size: int | None = None  # training batch (None: the preset's)
    value_samples: int = 32  # routing value: held-out samples per timestep bin
    value_bins: int = 4
    value_draws: int = 2
    targets: tuple[str, ...] = ("middle", "multi")


# The default: the preset's own 1800 base steps (trained once, reused by later tables) and 16
# RSR rows of 150 steps; measured at 68 min on a 2-core machine with another job beside it
# (docs/evaluation.md, "Measured tables").
DEFAULT = Budget(base_steps=1800, rsr_steps=150, seeds=(0, 1), images_per_category=16, sample_steps=20)
QUICK = Budget(base_steps=2, rsr_steps=2, seeds=(0, 1), images_per_category=2, sample_steps=2, batch_size=4,
               value_samples=2, value_bins=1, value_draws=1, targets=("middle",))


@dataclass
class RowRun:
    """One checkpoint's evaluation: per-image correctness in plan order, and its routing figures."""

    name: str
    target: str
    mode: str
    seed: int | None
    correct: list[bool]
    routing: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# --- training ---------------------------------------------------------------------------------

def _train_args(argv: list[str]):
    from rsr_model.arguments import train_args  # the command line's own defaults for every training flag

    return train_args(argv)


def _complete(path: Path, expect: dict[str, Any]) -> bool:
    """A finished checkpoint whose plan and arguments match `expect` (reused instead of retrained)."""
    from rsr_model.checkpoint import CheckpointError, load_checkpoint

    if not path.exists():
        return False
    try:
        ck = load_checkpoint(path)
    except CheckpointError:
        return False
    args = ck.get("args") or {}
    done = all(ck["progress"].get(s, 0) >= n for s, n in ck["plan"].items())
    return done and ck["plan"] == expect["plan"] and all(args.get(k) == v for k, v in expect["args"].items())


def train_checkpoint(path: Path, argv: list[str], expect: dict[str, Any]) -> float:
    """Train (unless an identical finished checkpoint is there); returns the seconds spent."""
    from rsr_model.train import Trainer

    if _complete(path, expect):
        return 0.0
    start = time.perf_counter()
    args = _train_args([*argv, "--out", str(path), "--overwrite"])
    Trainer(args).run()
    return time.perf_counter() - start


def _batch_flags(budget: Budget) -> list[str]:
    return ["--batch-size", str(budget.batch_size)] if budget.batch_size else []


def train_base(out: Path, budget: Budget) -> tuple[Path, float]:
    path = out / "checkpoints" / "base.pt"
    argv = ["--preset", PRESET, "--stage", "base", "--steps", str(budget.base_steps), "--seed", "0",
            "--save-every", str(max(1, budget.base_steps // 4)), *_batch_flags(budget)]
    return path, train_checkpoint(path, argv, {"plan": {"base": budget.base_steps}, "args": {"seed": 0}})


def base_tag(base: Path) -> str:
    """The base checkpoint named by its content ("base-" and 12 hex digits of its sha256): a cached
    RSR-stage checkpoint is reused only for the very base it was trained on, whatever its path."""
    from cli_common.outputs import sha256_file

    return f"base-{sha256_file(base)[:12]}"


def train_row(out: Path, base: Path, target: str, mode: str, seed: int, budget: Budget) -> tuple[Path, float]:
    path = out / "checkpoints" / f"{target}_{mode}_s{seed}_{base_tag(base)}.pt"
    layers = ",".join(map(str, TARGETS[target]))
    argv = ["--preset", PRESET, "--stage", "rsr", "--base", str(base), "--mode", mode, "--target-layers", layers,
            "--steps", str(budget.rsr_steps), "--seed", str(seed), "--save-every", str(budget.rsr_steps),
            *_batch_flags(budget)]
    expect = {"plan": {"rsr": budget.rsr_steps},
              "args": {"seed": seed, "mode": mode, "target_layers": TARGETS[target], "base": str(base)}}
    return path, train_checkpoint(path, argv, expect)


# --- sampling and scoring ---------------------------------------------------------------------

def sample_and_score(ckpt: Path, planned: Sequence[PlannedImage], budget: Budget,
                     batch: int = 48) -> tuple[list[bool], dict[str, Any]]:
    """Per-image correctness of a checkpoint on the plan, and its routing figures (RSR with a gate)."""
    import contextlib

    from rsr_model.sample import generate, load_model

    from .routing import SamplingRouting, routing_value_figures
    from .scorer import score

    task, transformer, rsr, ckpt_dict = load_model(ckpt)
    recorder = SamplingRouting(rsr) if rsr is not None and rsr.config.has_gate else None
    hooks = rsr.hooks.hooks(recorder.hooks()) if recorder else contextlib.nullcontext()
    correct = []
    with hooks:
        for start in range(0, len(planned), batch):
            chunk = planned[start:start + batch]
            x0 = generate(task, transformer, [p.prompt for p in chunk], [p.seed for p in chunk],
                          steps=budget.sample_steps, guidance=budget.guidance)
            correct += [bool(score(im, p.prompt)["correct"]) for im, p in zip(task.to_images(x0), chunk)]
    routing = {}
    if recorder is not None:
        figures = recorder.figures()
        routing = {**figures, **routing_value_figures(task, transformer, rsr, budget.value_samples, budget.value_bins,
                                                      budget.value_draws, figures, ckpt_dict)}
    return correct, routing


# --- aggregation ------------------------------------------------------------------------------

def category_scores(correct: Sequence[bool], planned: Sequence[PlannedImage]) -> dict[str, float]:
    """Accuracy per category and overall (the mean of the six categories, as GenEval's)."""
    hits = np.asarray(correct, dtype=float)
    cats = np.asarray([p.category for p in planned])
    scores = {c: float(hits[cats == c].mean()) for c in CATEGORIES}
    scores["overall"] = float(np.mean([scores[c] for c in CATEGORIES]))
    return scores


def mcnemar(better: Sequence[bool], worse: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test on paired outcomes: images right under one model and wrong under the other."""
    from scipy.stats import binomtest

    a, b = np.asarray(better, bool), np.asarray(worse, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"pairs": int(a.size), "only_first": only_a, "only_second": only_b, "p_value": float(p),
            "difference": float(a.mean() - b.mean()) if a.size else 0.0}


def paired_over_seeds(pairs: Sequence[tuple[Any, Sequence[bool], Sequence[bool]]]) -> dict[str, Any]:
    """(seed, outcomes of the first model, of the second) per training seed -> one exact McNemar
    test over all pooled items, plus each seed's own difference: the test takes items (images,
    maps) as the unit with the seeds fixed, the per-seed differences show whether seeds agree."""
    return {"seeds": [seed for seed, _, _ in pairs],
            "difference_per_seed": [float(np.mean(a) - np.mean(b)) if len(a) else 0.0 for _, a, b in pairs],
            **mcnemar([x for _, a, _ in pairs for x in a], [x for _, _, b in pairs for x in b])}


def per_seed_words(t: dict[str, Any]) -> str:
    """'; per seed -1.0, +2.5 points' (empty for results written before it was recorded)."""
    d = t.get("difference_per_seed") or []
    return f"; per seed {', '.join(f'{100 * x:+.1f}' for x in d)} points" if d else ""


def paired_sentence(target: str, t: dict[str, Any]) -> str:
    """One RSR vs SFT test in words (table.md and the dashboard's evidence say the same)."""
    return (f"RSR − SFT ({target}): {100 * t['difference']:+.1f} points over {t['pairs']} paired images; "
            f"discordant pairs: {t['only_first']} right only under RSR, {t['only_second']} only under SFT; "
            f"exact McNemar p = {t['p_value']:.3g}{per_seed_words(t)}.")


def summarise(runs: list[RowRun], planned: Sequence[PlannedImage]) -> dict[str, Any]:
    """Rows (target, mode): mean and std over training seeds of every category score and routing figure."""
    rows = []
    for key in dict.fromkeys((r.target, r.mode) for r in runs):
        group = [r for r in runs if (r.target, r.mode) == key]
        per_seed = [category_scores(r.correct, planned) for r in group]
        row = {"target": key[0], "mode": key[1], "seeds": [r.seed for r in group], "scores": {}}
        for col in (*CATEGORIES, "overall"):
            values = np.array([s[col] for s in per_seed]) * 100
            row["scores"][col] = {"mean": float(values.mean()),
                                  "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        numeric = {k for r in group for k, v in r.routing.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row["routing"] = {k: float(np.mean([r.routing[k] for r in group if k in r.routing])) for k in sorted(numeric)}
        if any("verdict" in r.routing for r in group):  # one label per training seed (probes.verdict)
            row["verdicts"] = [r.routing.get("verdict") for r in group]
        rows.append(row)
    tests = {}
    for target in dict.fromkeys(r.target for r in runs):
        pick = lambda mode: [r for r in runs if r.target == target and r.mode == mode]
        rsr, sft = pick("rsr"), pick("sft")
        if rsr and sft:
            paired = {r.seed: r for r in sft}
            both = [(r, paired[r.seed]) for r in rsr if r.seed in paired]
            tests[target] = paired_over_seeds([(r.seed, r.correct, s.correct) for r, s in both])
    return {"rows": rows, "rsr_vs_sft": tests}


# --- markdown ---------------------------------------------------------------------------------

COLUMNS = {"single_object": "Single", "two_object": "Two", "counting": "Count", "colors": "Colors",
           "position": "Position", "color_attr": "Attr", "overall": "Overall"}  # the paper's column order
ROUTING_COLUMNS = {"gate_entropy": "H(gate)/log K", "gate_margin": "margin", "ami_timestep": "AMI(e;t)",
                   "ami_step": "AMI(e;s)", "routing_value": "routing value", "routing_share": "routing share",
                   "oracle_gap": "oracle gap"}


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    from .markdown import table_lines

    rows = []
    for row in summary["rows"]:
        cells = [row["target"], row["mode"]]
        for col in COLUMNS:
            s = row["scores"][col]
            cells.append(f"{s['mean']:.1f} ± {s['std']:.1f}" if len(row["seeds"]) > 1 else f"{s['mean']:.1f}")
        cells += [f"{row['routing'][k]:.3f}" if k in row["routing"] else "—" for k in ROUTING_COLUMNS]
        cells.append(" / ".join(str(v) for v in row["verdicts"]) if row.get("verdicts") else "—")
        rows.append(cells)
    lines = table_lines(["Target", "Method", *COLUMNS.values(), *ROUTING_COLUMNS.values(), "verdict"], rows) + [""]
    for target, t in summary["rsr_vs_sft"].items():
        lines += [paired_sentence(target, t), ""]  # a paragraph each
    b = meta["budget"]
    lines.append(f"Budget: base {meta['base']}; RSR stage {b['rsr_steps']} steps per row, training seeds "
                 f"{list(b['seeds'])}; {b['images_per_category']} images per category, {b['sample_steps']} sampler "
                 f"steps, guidance {b['guidance']}. Scores in %, mean ± std over training seeds. "
                 f"Wall time {meta['seconds']['total']:.0f} s.")
    return "\n".join(lines)


# --- the whole table --------------------------------------------------------------------------

def run_table(out: Path, budget: Budget, base: Path | None = None,
              progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """Train (or reuse) every row, sample, score and summarise; returns (result, markdown)."""
    started = time.perf_counter()
    say = progress or (lambda _: None)
    planned = plan(budget.images_per_category)
    seconds: dict[str, float] = {}
    if base is None:
        say("base")
        base, seconds["base_training"] = train_base(out, budget)
        base_note = f"trained here, {budget.base_steps} steps"
    else:
        base_note = f"given, {base}"
    base_correct, _ = sample_and_score(base, planned, budget)
    runs: list[RowRun] = [RowRun("base", "—", "base", None, base_correct)]
    for target in budget.targets:
        for mode in MODES:
            for seed in budget.seeds:
                say(f"{target} {mode} seed {seed}")
                path, train_s = train_row(out, base, target, mode, seed, budget)
                t0 = time.perf_counter()
                correct, routing = sample_and_score(path, planned, budget)
                runs.append(RowRun(path.stem, target, mode, seed, correct, routing,
                                   {"train": train_s, "evaluate": time.perf_counter() - t0}))
    seconds["total"] = time.perf_counter() - started
    summary = summarise(runs, planned)
    base_scores = category_scores(base_correct, planned)
    meta = {"budget": asdict(budget), "base": f"{base_note}; scores {100 * base_scores['overall']:.1f} overall",
            "base_checkpoint": str(base), "base_scores": base_scores, "seconds": seconds, "preset": PRESET,
            "targets": {t: TARGETS[t] for t in budget.targets}}
    result = {**meta, **summary, "plan": [asdict(p) for p in planned],
              "runs": [asdict(r) for r in runs]}
    return result, markdown(summary, meta)

"""`python -m rsr_model evaluate ...`: one subcommand, one action flag per evaluation.

    evaluate --scorer-check [--scenes 500] [--resolutions 24,32]      is the judge right?
    evaluate --prompts-out FILE                                        the held-apart prompt set
    evaluate --export geneval|dpg --ckpt C --prompts FILE --out DIR    folders for the official evaluators
    evaluate --table [--quick] [--base CKPT] [--steps N]               ablation table (paper Table 3 in small)
    evaluate --class-conditioned [--quick]                             dit-digits FD / precision / recall (Table 1)
    evaluate --planning CKPT [CKPT ...]                                planning figures (FrozenLake preset)
    evaluate --shift [--quick] [--base CKPT] [--seeds 0 1 2]           tiny-shift: learned RSR and its controls

The scorer check, the tables, the class-conditioned table and the planning figures print a markdown
table and write NAME.json and NAME.md under --out (default runs/evaluate); checkpoints they
train go to --out/checkpoints and are reused by a later run with the same budget.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli_common.command import finite_float, positive_int
from cli_common.errors import UsageError
from cli_common.outputs import check_output, same_file


def unique_ints(low: int):
    """argparse type: integers >= low like 0,1,2 (or "0 1 2"), each once, at least one. A repeated
    seed or resolution would count one run twice (a mean of copies, a std of 0)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
        if any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"expected integers >= {low}, got {text}")
        refuse_repeats(values, "")
        return values
    parse.__name__ = "integers"
    return parse


def refuse_repeats(values: list, flag: str) -> None:
    """A list flag names each value once (also across `--seeds 0 0,1`, where each part was parsed alone)."""
    repeated = [str(v) for v in dict.fromkeys(v for v in values if values.count(v) > 1)]
    if repeated:
        what = f"{flag} names" if flag else "names"
        message = f"{what} {', '.join(repeated)} more than once; give each once"
        raise UsageError(message) if flag else argparse.ArgumentTypeError(message)


# The flags each action reads, besides the action itself. Any other flag given is refused before
# any work: a flag that would be ignored (a --seeds on the scorer check, --guidance on planning)
# must not look as if it had shaped the result.
APPLIES = {
    "scorer_check": {"out", "overwrite", "scenes", "resolutions"},
    "prompts_out": {"overwrite"},
    "export": {"out", "overwrite", "ckpt", "prompts", "samples_per_prompt", "sample_steps", "guidance"},
    "table": {"out", "overwrite", "seeds", "quick", "base", "base_steps", "steps", "images_per_category",
              "sample_steps", "guidance", "targets"},
    "class_conditioned": {"out", "overwrite", "seeds", "quick", "base", "base_steps", "steps", "samples_per_class",
                          "sample_steps", "guidance"},
    "planning": {"out", "overwrite"},
    "shift": {"out", "overwrite", "seeds", "quick", "base", "base_steps", "steps"},
}
ACTIONS = tuple(APPLIES)
DEFAULT_OUT = Path("runs/evaluate")


def action_of(args) -> str:
    return next(a for a in ACTIONS if getattr(args, a, None) not in (None, False))


def check_applicable(args) -> None:
    """Refuse a flag the chosen action does not read (table APPLIES); the options' defaults are
    None (or False), so a value there means the user gave the flag."""
    action = action_of(args)
    for dest in sorted(set().union(*APPLIES.values()) - APPLIES[action]):
        if getattr(args, dest, None) not in (None, False):
            used = [a for a in ACTIONS if dest in APPLIES[a]]
            raise UsageError(f"--{dest.replace('_', '-')} does not apply to --{action.replace('_', '-')} "
                             f"(only to {', '.join('--' + a.replace('_', '-') for a in used)})")


def add_parser(sub) -> argparse.ArgumentParser:
    """The `evaluate` subcommand on the project's subparsers."""
    e = sub.add_parser("evaluate", help="score checkpoints: scorer check, ablation table, exports",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    act = e.add_mutually_exclusive_group(required=True)
    act.add_argument("--scorer-check", action="store_true", help="score rendered ground truth and wrong scenes")
    act.add_argument("--prompts-out", type=Path, metavar="FILE", help="write the evaluation prompt set (one per line)")
    act.add_argument("--export", choices=["geneval", "dpg"], help="sample a prompt file into a benchmark's layout")
    act.add_argument("--table", action="store_true", help="train the ablations from one base and score them")
    act.add_argument("--class-conditioned", action="store_true", help="dit-digits with and without RSR")
    act.add_argument("--planning", type=Path, nargs="+", metavar="CKPT",
                     help="planning figures of FrozenLake checkpoints (several seeds and modes)")
    act.add_argument("--shift", action="store_true",
                     help="tiny-shift: the learned RSR model beside LoRA rank r, LoRA rank K*r and random routing")
    e.add_argument("--out", type=Path, help=f"output folder (default {DEFAULT_OUT})")
    e.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    e.add_argument("--scenes", type=positive_int, help="scorer check: scenes per category and resolution (default 500)")
    e.add_argument("--seeds", type=unique_ints(0), nargs="+",
                   help="table / class-conditioned / shift: training seeds (0 1 2 or 0,1,2)")
    e.add_argument("--resolutions", type=unique_ints(8), help="scorer check: image sides (default 24,32)")
    e.add_argument("--ckpt", type=Path, help="export: the checkpoint to sample")
    e.add_argument("--prompts", type=Path, help="export: one prompt per line (default: the evaluation set)")
    e.add_argument("--samples-per-prompt", type=positive_int, help="images per prompt (default 4)")
    e.add_argument("--sample-steps", type=positive_int, help="sampler steps (default: export 28, else the budget's)")
    e.add_argument("--guidance", type=finite_float(0, 100),
                   help="guidance scale (default: export 3.0, else the budget's)")
    e.add_argument("--quick", action="store_true",
                   help="table / class-conditioned / shift: a budget for tests (minutes)")
    e.add_argument("--base", type=Path, help="table / class-conditioned / shift: an existing base-stage checkpoint")
    e.add_argument("--base-steps", type=positive_int,
                   help="table / class-conditioned / shift: base-stage steps when training one")
    e.add_argument("--steps", type=positive_int,
                   help="table / class-conditioned / shift: RSR-stage steps of every row")
    e.add_argument("--images-per-category", type=positive_int, help="table: images sampled per GenEval category")
    e.add_argument("--samples-per-class", type=positive_int, help="class-conditioned: samples per digit")
    e.add_argument("--targets", choices=["middle", "multi", "both"], help="table: which target blocks (default both)")
    return e


def input_paths(args) -> dict[str, Path | None]:
    """Every file an action reads, by flag: no output may be one of them."""
    inputs: dict[str, Path | None] = {flag: getattr(args, flag[2:], None) for flag in ("--ckpt", "--prompts", "--base")}
    for i, ckpt in enumerate(getattr(args, "planning", None) or []):
        inputs[f"--planning ({i + 1})"] = ckpt
    return inputs


def check_free(out: Path, name: str, overwrite: bool, inputs: dict | None = None) -> list[Path]:
    """out/name.json and out/name.md, judged before any work: writable, not an input, and not
    existing unless --overwrite (`cli_common.outputs.check_output`)."""
    paths = [out / f"{name}.json", out / f"{name}.md"]
    check_output(out, overwrite, flag="--out", folder=True, inputs=inputs)
    for path in paths:
        check_output(path, overwrite, flag="--out", inputs=inputs)
    return paths


def write_result(out: Path, name: str, result: dict[str, Any], markdown: str, overwrite: bool) -> list[Path]:
    """out/name.json and out/name.md, refusing to replace existing files without --overwrite."""
    from cli_common.outputs import write_atomic
    from probes.analysis import jsonable

    paths = check_free(out, name, overwrite)
    write_atomic(paths[0], json.dumps(jsonable(result), indent=1))
    write_atomic(paths[1], markdown + "\n")
    return paths


def _progress(total: int, desc: str):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def run_scorer_check(args) -> None:
    from .check import check_table, scorer_check

    resolutions, scenes = args.resolutions or [24, 32], args.scenes or 500
    check_free(args.out, "scorer_check", args.overwrite)
    with _progress(len(resolutions) * 6, "scorer check") as bar:
        result = scorer_check(resolutions, scenes, progress=lambda: bar.update(1))
    markdown = check_table(result)
    print(markdown)
    for path in write_result(args.out, "scorer_check", result, markdown, args.overwrite):
        print(f"wrote {path}")


def run_prompts_out(args) -> None:
    """The prompt set as text (one per line, category by category) and as GenEval metadata beside it."""
    from cli_common.outputs import write_atomic

    from .prompts import evaluation_prompts, geneval_metadata

    text, meta = args.prompts_out, args.prompts_out.with_suffix(".jsonl")
    if same_file(text, meta):
        raise UsageError(f"--prompts-out {text} ends in .jsonl: the prompts and their metadata would be one file")
    for path in (text, meta):
        check_output(path, args.overwrite, flag="--prompts-out")
    every = [p for ps in evaluation_prompts().values() for p in ps]
    write_atomic(text, "".join(p + "\n" for p in every))
    write_atomic(meta, "".join(json.dumps(geneval_metadata(p)) + "\n" for p in every))
    print(f"wrote {text} and {meta} ({len(every)} prompts)")


def _empty_out(out: Path, overwrite: bool) -> None:
    """Exports own their folder (evaluators list every file in it): refuse a non-empty one unless --overwrite."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"{out} exists and is not an empty folder; pass --overwrite to write into it")


def run_export(args) -> None:
    from rsr_model.sample import load_model

    from .export import ExportItem, export, read_items
    from .prompts import evaluation_prompts, geneval_metadata

    if args.ckpt is None:
        raise UsageError("--export needs --ckpt CKPT")
    samples = args.samples_per_prompt or 4
    check_output(args.out, args.overwrite, flag="--out", folder=True, inputs=input_paths(args))
    if args.prompts is not None:
        items = read_items(args.prompts, args.export)
    else:  # the held-apart evaluation set
        every = [p for ps in evaluation_prompts().values() for p in ps]
        items = [ExportItem(f"{i:05d}" if args.export == "geneval" else str(i), p,
                            geneval_metadata(p) if args.export == "geneval" else None) for i, p in enumerate(every)]
    _empty_out(args.out, args.overwrite)
    task, transformer, _, _ = load_model(args.ckpt)
    with _progress(len(items), f"export {args.export}") as bar:
        export(task, transformer, items, args.out, args.export, samples, steps=args.sample_steps or 28,
               guidance=3.0 if args.guidance is None else args.guidance, progress=bar.update)
    print(f"wrote {len(items)} prompt(s) x {samples} sample(s) to {args.out} ({args.export} layout)")


def _budget(args, default, quick):
    """The preset budget (--quick or the default) with the flags given on top."""
    import dataclasses

    budget = quick if args.quick else default
    targets = None if args.targets is None else ("middle", "multi") if args.targets == "both" else (args.targets,)
    seeds = tuple(s for part in args.seeds for s in part) if args.seeds else None  # "0 1" and "0,1" alike
    if seeds:
        refuse_repeats(list(seeds), "--seeds")
    changes = {"base_steps": args.base_steps, "rsr_steps": args.steps, "seeds": seeds,
               "sample_steps": args.sample_steps, "guidance": args.guidance, "targets": targets,
               "images_per_category": args.images_per_category, "samples_per_class": args.samples_per_class}
    # every flag given is a field of this budget (check_applicable refused the others)
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(budget, **changes)


def _run_budgeted(args, name: str, default, quick, runner, check=None) -> None:
    """Check the inputs before any training (`check(budget, base)`: the runner's own), run, print the
    markdown, write name.json / name.md."""
    budget = _budget(args, default, quick)
    if args.base is not None and not args.base.is_file():
        raise UsageError(f"base checkpoint not found: {args.base}")
    if check is not None:
        check(budget, args.base)
    check_free(args.out, name, args.overwrite, input_paths(args))
    check_output(args.out / "checkpoints", True, flag="--out", folder=True, inputs=input_paths(args))
    result, markdown = runner(args.out, budget, args.base, progress=lambda what: print(f"[{name}] {what}", flush=True))
    print(markdown)
    for path in write_result(args.out, name, result, markdown, overwrite=True):
        print(f"wrote {path}")


def run_table(args) -> None:
    from .table import DEFAULT, QUICK
    from .table import run_table as table

    _run_budgeted(args, "table", DEFAULT, QUICK, table)


def run_class_conditioned(args) -> None:
    from .digits_quality import DEFAULT, QUICK
    from .digits_quality import run_class_conditioned as class_conditioned

    _run_budgeted(args, "class_conditioned", DEFAULT, QUICK, class_conditioned)


def run_shift(args) -> None:
    from .shift import DEFAULT, QUICK, check_budget
    from .shift import run_shift as shift

    if args.base is not None and args.base_steps is not None:
        raise UsageError("--base-steps does not apply with --base (the base is given, not trained here)")
    _run_budgeted(args, "shift", DEFAULT, QUICK, shift, check=check_budget)


def run_planning(args) -> None:
    from cli_common.outputs import sha256_file

    from .planning import check_plannable, markdown, planning_rows

    seen: dict[str, Path] = {}
    for ckpt in args.planning:
        if not ckpt.is_file():
            raise UsageError(f"checkpoint not found: {ckpt}")
        digest = sha256_file(ckpt)  # by content: a path given twice, a link or a copy would count one run twice
        if digest in seen:
            raise UsageError(f"--planning: {ckpt} is the same checkpoint as {seen[digest]} (sha256 {digest[:12]}); "
                             f"give each checkpoint once")
        seen[digest] = ckpt
    check_free(args.out, "planning", args.overwrite, input_paths(args))
    check_plannable(args.planning)  # every checkpoint can plan, before the first one's 200 maps
    result = planning_rows(args.planning)
    text = markdown(result)
    print(text)
    for path in write_result(args.out, "planning", result, text, args.overwrite):
        print(f"wrote {path}")


def run(args) -> None:
    """Dispatch the action flag of `evaluate`, after refusing flags the action does not read."""
    check_applicable(args)
    if args.out is None:
        args.out = DEFAULT_OUT
    if args.scorer_check:
        return run_scorer_check(args)
    if args.prompts_out:
        return run_prompts_out(args)
    if args.export:
        return run_export(args)
    if args.table:
        return run_table(args)
    if args.class_conditioned:
        return run_class_conditioned(args)
    if args.shift:
        return run_shift(args)
    return run_planning(args)

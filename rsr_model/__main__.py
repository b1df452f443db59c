"""Command line: `python -m rsr_model train|sample ...`.

Bad input ends with a one-line `error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


from cli_common.command import Parser, finite_float, guard_startup, positive_int, read_lines, run_main
from cli_common.errors import UsageError
from cli_common.outputs import check_free_space, check_output, same_file

guard_startup(__name__)

if TYPE_CHECKING:
    from .tasks.base import Model

MAX_IMAGES = 1024  # one `sample` call draws all its images at once and tiles them into one PNG
SAMPLE_DEFAULTS = {"num_samples": 1, "seed": 0, "steps": 28, "guidance": 3.0}


def build_parser() -> argparse.ArgumentParser:
    from .arguments import add_train_arguments
    from .tasks.inputs import add_task_arguments

    p = Parser(prog="python -m rsr_model", description="Train and sample RSR diffusion models.", version=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a preset and write a checkpoint",
                       description="Train a preset. With no --stage, two-stage presets train the base, then RSR.")
    add_train_arguments(t)

    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument("--ckpt", type=Path, default=Path("sd3_rsr.pt"))
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    s.add_argument("--prompts-file", type=Path, help="one prompt (or class label) per line")
    s.add_argument("--label", action="append", default=[], help="class label (class-conditioned presets)")
    add_task_arguments(s, "sample")  # a task's own item flags, e.g. FrozenLake's --map
    # (defaults in SAMPLE_DEFAULTS: unset here, so a task whose sampler has no use for one can refuse it)
    s.add_argument("--num-samples", type=positive_int, help="images per prompt (default: 1)")
    s.add_argument("--seed", type=int, help="(default: 0)")
    s.add_argument("--steps", type=positive_int, help="sampler steps (default: 28)")
    s.add_argument("--guidance", type=finite_float(0, 100),
                   help="classifier-free guidance scale, 1 = off (default: 3)")
    s.add_argument("--out", type=Path, default=Path("out.png"))
    s.add_argument("--overwrite", action="store_true")

    from evaluation import cli as evaluation_cli
    from evaluation import lora_export
    evaluation_cli.add_parser(sub)
    lora_export.add_parser(sub)
    return p


def read_items(args) -> list[str]:
    items = list(args.prompt) + list(args.label)
    if args.prompts_file:
        items += read_lines(args.prompts_file)
    return items


def check_image_count(n_items: int, num_samples: int) -> None:
    if n_items * num_samples > MAX_IMAGES:
        raise UsageError(f"{n_items} prompt(s) x --num-samples {num_samples} is more than {MAX_IMAGES} "
                         f"images; sample in several calls")


def checkpoint_bytes(trainer) -> int:
    """Rough size of one checkpoint: weights plus EMA, raw weights and two Adam moments."""
    return 5 * sum(p.numel() * p.element_size() for p in trainer.transformer.parameters())


def check_trace_path(args) -> None:
    """--trace is a new file, and none of the run's others: not an input, not the checkpoint, not its log."""
    if args.trace is None:
        return
    out = args.out if args.out is not None else Path("sd3_rsr.pt")
    for what, path in (("--out", out), ("the loss log", out.with_suffix(out.suffix + ".log.csv"))):
        if same_file(args.trace, path):
            raise UsageError(f"--trace {args.trace} is also {what}; the trace needs a file of its own")
    check_output(args.trace, args.overwrite, flag="--trace",
                 inputs={"--base": args.base, "--pretrained": args.pretrained, "--data": args.data})


def cmd_train(args) -> None:
    from .train import Trainer

    check_trace_path(args)
    if args.trace:
        # The CLI is where the pieces are composed; the training library itself knows nothing of traces.
        from traces import TraceMeta

        from .recorders import TrainingRecorder
    if args.report_to:
        from probes.tracking import check_trackers

        check_trackers(args.report_to)
    trainer = Trainer(args)  # checks --out and every flag before it builds the model; holds --out until it ends
    a = trainer.args  # the flags with their defaults filled in
    try:
        check_free_space(a.out, checkpoint_bytes(trainer), "the checkpoint")
        if a.trace and not trainer.accelerator.is_main_process:
            a.trace = None  # several processes: the main one records its batches' routing (docs/scale.md)
        if a.trace:
            warm = trainer.warm_start_plan()
            meta = TraceMeta(model_config={"preset": trainer.task.name}, rsr_config=trainer.rsr_cfg.to_dict(),
                             seeds=[a.seed], extra={"trace_every": a.trace_every, "warm_start": warm,
                                                    "routing": "the expert ids the model used (during the warm "
                                                               "start: the forced cells)"})
            recorder = TrainingRecorder(a.trace, a.trace_every, trainer.task, meta,
                                        token_stride=a.trace_token_stride, probs=a.trace_probs,
                                        overwrite=a.overwrite)
            trainer.callbacks.append(recorder)
        tracker = add_tracker(trainer, a)
    except BaseException:
        trainer.close()
        raise
    try:
        out = trainer.run()
    except BaseException:
        if a.trace:
            recorder.abort()  # the trace keeps every flushed step and stays marked incomplete
        raise
    if a.trace:
        recorder.close()
    if tracker is not None:
        tracker.close()  # its event files are complete
    if trainer.accelerator.is_main_process:
        print(f"checkpoint: {out}" + (f"; training trace: {a.trace}" if a.trace else ""))


def add_tracker(trainer, args):
    """--report-to: the experiment tracker callback (probes.tracking), after any recorder; None without."""
    if not args.report_to:
        return None
    from probes.tracking import TrainingTracker

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "report_to"}
    tracker = TrainingTracker(trainer.accelerator, args.report_every, config=config)
    trainer.callbacks.append(tracker)
    return tracker


def cmd_sample(args: argparse.Namespace) -> None:
    """Load the checkpoint, then sample as its task does: images by default, plans for FrozenLake."""
    from .sample import load_model
    from .tasks.inputs import check_items, check_some_items

    check_output(args.out, args.overwrite, inputs={"--ckpt": args.ckpt, "--prompts-file": args.prompts_file})
    check_some_items(args, "sample")
    check_image_count(len(read_items(args)), args.num_samples or SAMPLE_DEFAULTS["num_samples"])  # before a slow load
    model = load_model(args.ckpt)
    check_items(model[0], args, "sample")  # also refuses the flags the task's own sampler would ignore
    for name, value in SAMPLE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    own = model[0].commands()
    (own.sample if own else sample_images)(args, model)


def sample_images(args: argparse.Namespace, model: Model) -> None:
    """The diffusion sampler's `sample`: num-samples images per prompt or label, tiled into one PNG."""
    from .sample import generate, image_grid, save_png

    items = read_items(args)
    task, transformer, _, _ = model
    parsed = task.parse_items(items)
    rows = [it for it in parsed for _ in range(args.num_samples)]
    seeds = [args.seed + j for j in range(len(rows))]
    x0 = generate(task, transformer, rows, seeds, steps=args.steps, guidance=args.guidance)
    save_png(image_grid(task.to_images(x0), cols=args.num_samples if len(parsed) > 1 else None), args.out)
    print(f"wrote {args.out} ({len(rows)} image(s), seeds {seeds[0]}..{seeds[-1]})")


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = build_parser().parse_args(argv)
        from evaluation import cli as evaluation_cli
        from evaluation import lora_export

        commands = {"train": cmd_train, "sample": cmd_sample, "evaluate": evaluation_cli.run,
                    "export-lora": lora_export.run}
        commands[args.command](args)

    return run_main(body, interrupted="interrupted; the last checkpoint written is intact")


if __name__ == "__main__":
    sys.exit(main())

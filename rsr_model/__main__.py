"""Command line: `python -m rsr_model train|sample ...`.

Bad input ends with a one-line `error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


from .cli import Parser, UsageError, read_lines, run_main


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,8,12, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .config import MODES
    from .tasks import TASKS

    p = Parser(prog="python -m rsr_model", description="Train and sample RSR diffusion models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a preset and write a checkpoint",
                       description="Train a preset. With no --stage, two-stage presets train the base, then RSR.")
    t.add_argument("--preset", default="tiny", choices=sorted(TASKS))
    t.add_argument("--stage", choices=["base", "rsr"], default=None)
    t.add_argument("--base", type=Path, help="base-stage checkpoint (with --stage rsr)")
    t.add_argument("--steps", type=positive_int, help="optimizer steps per stage (default: the preset's)")
    t.add_argument("--out", type=Path, default=Path("sd3_rsr.pt"))
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=positive_int)
    t.add_argument("--lr", type=float)
    t.add_argument("--save-every", type=positive_int, default=200)
    t.add_argument("--ema-decay", type=float, default=0.999, help="EMA of base weights (0 = off)")
    t.add_argument("--mode", choices=MODES)
    t.add_argument("--experts", type=int, help="K")
    t.add_argument("--latent-steps", type=int, help="L")
    t.add_argument("--rank", type=int)
    t.add_argument("--target-layers", type=int_list)
    t.add_argument("--tau", type=float, help="Gumbel-Softmax temperature")
    t.add_argument("--balance-weight", type=float)
    t.add_argument("--gate-lr-scale", type=float, help="gate learning rate / experts' (RSR stage; default: the preset's)")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    t.add_argument("--pretrained", type=Path, help="local diffusers SD3 folder (preset sd3)")
    t.add_argument("--data", type=Path, help="image-caption folder with metadata.jsonl (preset sd3)")
    t.add_argument("--trace", type=Path, help="also write a training trace (HDF5) of the RSR stage here")
    t.add_argument("--trace-every", type=positive_int, default=50, help="record routing every N steps")
    t.add_argument("--trace-token-stride", type=positive_int, default=1)
    t.add_argument("--trace-probs", action="store_true", help="store gate probabilities in the training trace")

    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument("--ckpt", type=Path, default=Path("sd3_rsr.pt"))
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    s.add_argument("--prompts-file", type=Path, help="one prompt (or class label) per line")
    s.add_argument("--label", action="append", default=[], help="class label (class-conditioned presets)")
    s.add_argument("--num-samples", type=positive_int, default=1, help="images per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=positive_int, default=28)
    s.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--out", type=Path, default=Path("out.png"))
    s.add_argument("--overwrite", action="store_true")

    from .evaluation import cli as evaluation_cli, lora_export
    evaluation_cli.add_parser(sub)
    lora_export.add_parser(sub)
    return p


def read_items(args) -> list[str]:
    items = list(args.prompt) + list(args.label)
    if args.prompts_file:
        items += read_lines(args.prompts_file)
    if not items:
        raise UsageError("give at least one --prompt, --label or --prompts-file")
    return items


def cmd_train(args) -> None:
    from .train import Trainer

    if args.trace:
        if args.trace.exists() and not args.overwrite:
            raise UsageError(f"{args.trace} exists; give a new --trace path (e.g. for a resumed run) "
                             f"or pass --overwrite to replace it")
        # The CLI is where the pieces are composed; the training library itself knows nothing of traces.
        from traces import TraceMeta

        from .recorders import TrainingRecorder
    trainer = Trainer(args)
    if args.trace:
        meta = TraceMeta(model_config={"preset": trainer.task.name}, rsr_config=trainer.rsr_cfg.to_dict(),
                         seeds=[args.seed], extra={"trace_every": args.trace_every})
        recorder = TrainingRecorder(args.trace, args.trace_every, trainer.task, meta,
                                    token_stride=args.trace_token_stride, probs=args.trace_probs,
                                    overwrite=args.overwrite)
        trainer.callbacks.append(recorder)
    try:
        out = trainer.run()
    finally:
        if args.trace:
            recorder.close()
    print(f"checkpoint: {out}" + (f"; training trace: {args.trace}" if args.trace else ""))


def cmd_sample(args) -> None:
    from .sample import generate, image_grid, load_model, save_png

    if args.out.exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it")
    items = read_items(args)
    task, transformer, _, _ = load_model(args.ckpt)
    parsed = task.parse_items(items)
    rows = [it for it in parsed for _ in range(args.num_samples)]
    seeds = [args.seed + j for j in range(len(rows))]
    x0 = generate(task, transformer, rows, seeds, steps=args.steps, guidance=args.guidance)
    save_png(image_grid(task.to_images(x0), cols=args.num_samples if len(parsed) > 1 else None), args.out)
    print(f"wrote {args.out} ({len(rows)} image(s), seeds {seeds[0]}..{seeds[-1]})")


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = build_parser().parse_args(argv)
        from .evaluation import cli as evaluation_cli, lora_export

        commands = {"train": cmd_train, "sample": cmd_sample, "evaluate": evaluation_cli.run,
                    "export-lora": lora_export.run}
        commands[args.command](args)

    return run_main(body, interrupted="interrupted; the last checkpoint written is intact")


if __name__ == "__main__":
    sys.exit(main())

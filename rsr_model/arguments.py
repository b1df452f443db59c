"""The training command's flags, as data a library may read: `python -m rsr_model train` adds them
to its parser, and `evaluation.table` parses a training run's argv with the same defaults
(`train_args`), so the two can never disagree and no library module imports a `__main__`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli_common.command import Parser, finite_float, int_at_least, positive_int


def int_list(s: str) -> list[int]:
    """argparse type: integers like 4,8,12 (or 4 8 12)."""
    try:
        return [int(x) for x in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,8,12, got {s!r}") from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of `python -m rsr_model train`."""
    from .config import MODES
    from .tasks import TASKS

    p.add_argument("--preset", default="tiny", choices=sorted(TASKS))
    p.add_argument("--stage", choices=["base", "rsr"], default=None)
    p.add_argument("--base", type=Path, help="base-stage checkpoint (with --stage rsr)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps per stage (default: the preset's)")
    p.add_argument("--out", type=Path, default=Path("sd3_rsr.pt"))
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=finite_float(0, low_open=True))
    p.add_argument("--save-every", type=positive_int, default=200)
    p.add_argument("--ema-decay", type=finite_float(0, 1, high_open=True), default=0.999,
                   help="EMA of base weights (0 = off)")
    p.add_argument("--rsr-ema-decay", type=finite_float(0, 1, high_open=True),
                   help="EMA of the experts and gate in the RSR stage, 0 = off (default: the preset's)")
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--experts", type=int, help="K")
    p.add_argument("--latent-steps", type=int, help="L")
    p.add_argument("--rank", type=int)
    p.add_argument("--target-layers", type=int_list)
    p.add_argument("--tau", type=finite_float(0, low_open=True), help="Gumbel-Softmax temperature")
    p.add_argument("--balance-weight", type=finite_float(0))
    p.add_argument("--balance-over", choices=["step", "recursion"],
                   help="balance each recursion step's routing (step) or only the whole recursion's (recursion)")
    p.add_argument("--gate-lr-scale", type=finite_float(0, low_open=True),
                   help="gate learning rate / experts' (RSR stage; default: the preset's)")
    p.add_argument("--warm-start", choices=["none", "band", "step-band"],
                   help="expert warm start: force experts to timestep-band (and recursion-step) cells and teach "
                        "the gate them for --warm-start-steps, then free the gate (default: the preset's)")
    p.add_argument("--warm-start-steps", type=int_at_least(0),
                   help="length of the warm start in RSR steps (default: the first quarter of the RSR stage)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--pretrained", type=Path, help="local diffusers SD3 folder (preset sd3)")
    p.add_argument("--data", type=Path, help="image-caption folder with metadata.jsonl (preset sd3)")
    p.add_argument("--trace", type=Path, help="also write a training trace (HDF5) of the RSR stage here")
    p.add_argument("--trace-every", type=positive_int, default=50, help="record routing every N steps")
    p.add_argument("--trace-token-stride", type=positive_int, default=1)
    p.add_argument("--trace-probs", action="store_true", help="store gate probabilities in the training trace")
    add_cluster_arguments(p)


# `accelerate` knows these names; which are usable depends on what is installed (--report-to checks).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio", "swanlab")


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for runs of several processes and experiment tracking (docs/scale.md)."""
    g = p.add_argument_group("several processes and experiment tracking")
    g.add_argument("--report-to", action="append", choices=TRACKERS + ("all",),
                   help="log loss, balance, gate entropy and margin, per-expert load and MI(expert; timestep bin) "
                        "to this accelerate tracker (repeatable; tensorboard: pip install 'thinking-pixel[track]')")
    g.add_argument("--logging-dir", type=Path, help="where trackers write (default: OUT.logs beside the checkpoint)")
    g.add_argument("--report-every", type=positive_int, default=10,
                   help="gate statistics every N steps (loss and balance: every step)")
    g.add_argument("--check-replicas", action="store_true",
                   help="at the end of each stage, print a digest of every rank's weights and batches; "
                        "stop if the weights differ")


def train_args(argv: list[str]) -> argparse.Namespace:
    """`argv` (the flags after `train`) parsed with the command line's own defaults."""
    p = Parser(prog="python -m rsr_model train")
    add_train_arguments(p)
    return p.parse_args(argv)

"""The training command's flags, as data a library may read: `python -m rsr_model train` adds them
to its parser, and `evaluation.table` parses a training run's argv with the same defaults
(`train_args`), so the two can never disagree and no library module imports a `__main__`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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

    p.add_argument("--preset", choices=sorted(TASKS), help="training preset (default: tiny; with --resume: the run's)")
    p.add_argument("--stage", choices=["base", "rsr"], default=None)
    p.add_argument("--base", type=Path, help="base-stage checkpoint (only with --stage rsr)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps per stage (default: the preset's)")
    p.add_argument("--out", type=Path, help="checkpoint (default: sd3_rsr.pt); one run at a time per --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out with its own settings (a flag given must equal the run's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, help="(default: 0)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=finite_float(0, low_open=True))
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N steps (default: 200)")
    p.add_argument("--ema-decay", type=finite_float(0, 1, high_open=True),
                   help="EMA of the base stage's weights, 0 = off (default: 0.999)")
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
    p.add_argument("--routing", choices=["token", "expert_choice"],
                   help="token: each token draws its expert (paper); expert_choice: experts compete for tokens "
                        "(Table 4's differentiable top-k, temperature 0.1), at training and sampling")
    p.add_argument("--upcycle-steps", type=int_at_least(0),
                   help="recipe: train expert 0 alone for N RSR steps, then copy it into every expert "
                        "(default: the preset's)")
    p.add_argument("--upcycle-noise", type=finite_float(0),
                   help="noise added to each upcycled copy, x the factor's spread (default: 0.01)")
    p.add_argument("--soft-steps", type=int_at_least(0),
                   help="recipe: N RSR steps of a soft mixture of every expert by the gate's probabilities, "
                        "before hard routing (default: the preset's)")
    p.add_argument("--anneal", action=argparse.BooleanOptionalAction, default=None,
                   help="recipe: anneal the hard draw's Gumbel noise from 1 to 0 (argmax, as sampled) over the "
                        "hard-routing steps (default: the preset's)")
    p.add_argument("--train-routing", choices=["gate", "random"],
                   help="random: the control trained with a uniformly random expert per token throughout")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="(default: no; fp16 needs a CUDA GPU)")
    p.add_argument("--pretrained", type=Path, help="local diffusers SD3 folder (preset sd3)")
    p.add_argument("--data", type=Path, help="image-caption folder with metadata.jsonl (preset sd3)")
    p.add_argument("--trace", type=Path, help="also write a training trace (HDF5) of the RSR stage here (a new run "
                   "only: a trace covers a run from its first step, so --resume refuses it)")
    p.add_argument("--trace-every", type=positive_int, help="record routing every N steps (default: 50)")
    p.add_argument("--trace-token-stride", type=positive_int, help="(default: 1)")
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
    g.add_argument("--report-every", type=positive_int,
                   help="gate statistics every N steps (loss and balance: every step)")
    g.add_argument("--check-replicas", action="store_true",
                   help="at the end of each stage, print a digest of every rank's weights and batches; "
                        "stop if the weights differ")


def train_args(argv: list[str]) -> argparse.Namespace:
    """`argv` (the flags after `train`) parsed with the command line's own defaults."""
    p = Parser(prog="python -m rsr_model train")
    add_train_arguments(p)
    return p.parse_args(argv)


# --- what was given, and the defaults of the rest ---------------------------------------------------

# The flags above whose default is not None: the parser leaves them unset (None), so that a run can
# tell a flag given from a default (a resumed run takes what was not given from the run it continues,
# and a flag that does not apply is refused only when given). `fill_defaults` sets the rest.
DEFAULTS: dict[str, Any] = {"preset": "tiny", "out": Path("sd3_rsr.pt"), "seed": 0, "save_every": 200,
                            "ema_decay": 0.999, "mixed_precision": "no", "trace_every": 50, "trace_token_stride": 1,
                            "report_every": 10}

# Flags that do not define the run (where it is written, how often it is saved, what watches it):
# the only ones a resumed run may change.
SESSION_FLAGS = ("command", "out", "resume", "overwrite", "save_every", "mixed_precision", "trace", "trace_every",
                 "trace_token_stride", "trace_probs", "report_to", "logging_dir", "report_every", "check_replicas")
PATH_FLAGS = ("base", "pretrained", "data", "out", "trace")


def given_flags(args: argparse.Namespace) -> set[str]:
    """The flags given on the command line (a parsed `train` namespace, before `fill_defaults`)."""
    return {k for k, v in vars(args).items() if k != "command" and v is not None and v is not False}


def fill_defaults(args: argparse.Namespace) -> None:
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value: Any, limit: int = 60) -> str:
    """A value as a message echoes it: long ones cut (a message is one line a person reads)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# --- which flags apply: one table, checked before any work ----------------------------------------


@dataclass
class RunPlan:
    """What a training run will do; whether a flag applies depends on nothing else."""

    task: Any  # rsr_model.tasks.Task
    stages: list[str]
    plan: dict[str, int]  # steps per stage
    cfg: Any  # the RSRConfig the RSR stage runs
    args: argparse.Namespace
    given: set[str]
    cuda: bool

    @property
    def warm_layout(self) -> str:
        return self.args.warm_start or self.task.warm_start

    def setting(self, name: str) -> Any:
        """A recipe flag as the run will use it: the command line's, else the preset's."""
        value = getattr(self.args, name, None)
        return getattr(self.task, name) if value is None else value


Rule = tuple[tuple[str, ...], Callable[[RunPlan], bool], Callable[[RunPlan], str]]

RSR_STAGE_FLAGS = ("mode", "experts", "latent_steps", "rank", "target_layers", "tau", "balance_weight",
                   "balance_over", "gate_lr_scale", "warm_start", "warm_start_steps", "rsr_ema_decay", "routing",
                   "upcycle_steps", "upcycle_noise", "soft_steps", "anneal", "train_routing", "trace",
                   "trace_every", "trace_token_stride", "trace_probs")

# flags -> (does it apply to this run?, why not). A task adds its own first (`Task.flag_rules`).
RULES: list[Rule] = [
    (("base",), lambda p: p.args.stage == "rsr" and p.task.two_stage,
     lambda p: "applies only with --stage rsr of a two-stage preset (the base checkpoint the RSR stage starts "
               "from); without --stage both stages train from scratch"),
    (RSR_STAGE_FLAGS, lambda p: "rsr" in p.stages,
     lambda p: "applies to the RSR stage, and --stage base trains only the base"),
    (("ema_decay",), lambda p: "base" in p.stages,
     lambda p: "averages the base stage's weights, and this run has no base stage (the RSR stage's is "
               "--rsr-ema-decay)"),
    (("experts",), lambda p: p.cfg.mode in ("rsr", "no_recursion"),
     lambda p: f"does not apply to --mode {p.cfg.mode}, which runs one expert"),
    (("latent_steps",), lambda p: p.cfg.mode in ("rsr", "no_modulation"),
     lambda p: f"does not apply to --mode {p.cfg.mode}, which runs one latent step"),
    (("tau", "gate_lr_scale", "balance_over"), lambda p: p.cfg.has_gate,
     lambda p: f"tunes the gate, and this run has none (mode {p.cfg.mode} with {p.cfg.experts} expert)"),
    (("warm_start",), lambda p: p.args.warm_start == "none" or p.cfg.has_gate,
     lambda p: f"needs a gate to teach, and this run has none (mode {p.cfg.mode} with {p.cfg.experts} expert)"),
    (("warm_start_steps",), lambda p: p.warm_layout != "none" and p.cfg.has_gate,
     lambda p: "sets the length of a warm start, and this run has none"),
    (("warm_start_steps",), lambda p: p.args.warm_start_steps < p.plan.get("rsr", 0),
     lambda p: f"is not below the RSR stage's {p.plan.get('rsr')} steps: the gate would never be freed"),
    (("routing", "upcycle_steps", "soft_steps", "anneal", "train_routing"), lambda p: p.cfg.has_gate,
     lambda p: f"chooses between experts, and this run has none to choose (mode {p.cfg.mode} with "
               f"{p.cfg.experts} expert)"),
    (("upcycle_noise",), lambda p: p.setting("upcycle_steps") != 0 and p.setting("train_routing") != "random",
     lambda p: "sets the noise of upcycled experts, and this run does not upcycle (--upcycle-steps)"),
    (("upcycle_steps", "soft_steps", "anneal", "train_routing"), lambda p: p.warm_layout == "none",
     lambda p: f"a learned routing recipe does not combine with the warm start {p.warm_layout!r}, which plants "
               f"the routing (--warm-start none)"),
    (("balance_weight", "balance_over"), lambda p: p.cfg.experts > 3,
     lambda p: f"the balance loss is added only with more than 3 experts (paper section 4.1), and this run "
               f"has {p.cfg.experts}"),
    (("mixed_precision",), lambda p: p.args.mixed_precision != "fp16" or p.cuda,
     lambda p: "fp16 needs a CUDA GPU; on this machine the run would be float32 (use bf16 or no)"),
    (("trace_every", "trace_token_stride", "trace_probs"), lambda p: p.args.trace is not None,
     lambda p: "applies only with --trace"),
    (("trace",), lambda p: not p.args.resume,
     lambda p: "a training trace covers a run from its first step, so a resumed run cannot write one "
               "(trace a new run, or record a sampling trace with probes.record)"),
    (("pretrained", "data"), lambda p: p.task.takes_folders,
     lambda p: f"applies to presets built from local folders (sd3), not {p.task.name!r}"),
]


def check_applicable(plan: RunPlan) -> None:
    """Refuse the first flag given that does not apply to this run (before any model is built)."""
    from cli_common.errors import UsageError

    for names, applies, reason in [*plan.task.flag_rules(), *RULES]:
        for name in names:
            if name in plan.given and not applies(plan):
                value = getattr(plan.args, name)
                value = "" if value is True else " " + shown(",".join(map(str, value)) if isinstance(value, list)
                                                             else value)
                raise UsageError(f"{flag(name)}{value}: {reason(plan)}")

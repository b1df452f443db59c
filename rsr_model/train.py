"""Training: the base backbone first (tiny presets), then RSR on the frozen base, as in the paper.

    python -m rsr_model train [--preset tiny] [--stage base|rsr] [--steps N] [--out sd3_rsr.pt]
    accelerate launch -m rsr_model train ...        # several GPUs / mixed precision

Every random draw of step s (data, noise, timesteps, Gumbel noise, dropout) comes from
generators seeded by (seed, stage, s), so `--resume` from a checkpoint reaches the same
weights as an uninterrupted run. The checkpoint (see checkpoint.py) is written atomically
every `--save-every` steps and at the end of each stage.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cli_common.errors import UserError
from cli_common.outputs import check_output, same_file, write_atomic

from .arguments import (
    DEFAULTS,
    PATH_FLAGS,
    SESSION_FLAGS,
    RunPlan,
    check_applicable,
    fill_defaults,
    flag,
    given_flags,
    shown,
)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, RSRConfig
from .install import RSR, arch_of, install_rsr
from .ranks import BatchDigest, launcher_rank, peer_stopped, replica_line
from .recipe import Recipe, upcycle
from .run_lock import RunLock
from .tasks import Task, TaskError, get_task
from .warm_start import WarmStart, check_layout

STAGES = ("base", "rsr")
# RSR-stage recipe flags (default: the preset's); a resumed run keeps the values it started with,
# and a run saved before a flag existed resumes without it (the value here)
RECIPE_FLAGS = {"gate_lr_scale": 1.0, "warm_start": "none", "warm_start_steps": 0, "rsr_ema_decay": 0.0,
                "upcycle_steps": 0, "upcycle_noise": 0.01, "soft_steps": 0, "anneal": False, "train_routing": "gate"}


class TrainingError(UserError):
    """Training stopped (e.g. the loss diverged); one line for users."""


@dataclass
class StepInfo:
    """What a training callback sees after each optimizer step (recording hooks in here)."""

    stage: str
    step: int
    loss: float
    balance: float | None
    transformer: nn.Module
    rsr: RSR | None
    extra: dict = field(default_factory=dict)


@dataclass
class _StageRun:
    """What one stage's loop works with (built by `Trainer._setup_stage`)."""

    model: nn.Module  # the transformer as accelerate prepared it
    opt: torch.optim.Optimizer
    sched: Any
    params: list  # the trainable parameters (and the EMA's)
    rsr: RSR | None  # None in the base stage
    recipe: Recipe | None  # the RSR stage's routing phases (recipe.py); None in the base stage
    warm: WarmStart | None
    warm_steps: int
    batch_size: int
    start: int
    total: int


def stage_seed(seed: int, stage: str, step: int) -> int:
    return (seed * 1_000_003 + STAGES.index(stage) * 100_003 + step) % (2**63 - 1)


def rsr_config_from_args(task: Task, args: Any) -> RSRConfig:
    cfg = task.default_rsr()
    changes = {k: v for k, v in dict(mode=args.mode, num_experts=args.experts, latent_steps=args.latent_steps,
                                       rank=args.rank, target_layers=args.target_layers, gumbel_tau=args.tau,
                                       balance_weight=args.balance_weight,
                                       balance_over=getattr(args, "balance_over", None),
                                       routing=getattr(args, "routing", None)).items() if v is not None}
    return RSRConfig.from_dict({**cfg.to_dict(), **changes})


def check_targets(transformer: nn.Module, cfg: RSRConfig) -> None:
    """Fail before any training if RSR cannot go where the config says."""
    spec = arch_of(transformer)
    blocks = getattr(transformer, spec.blocks)
    bad = [i for i in cfg.target_layers if i >= len(blocks)]
    if bad:
        raise ConfigError(f"target layer(s) {bad} beyond the model's depth ({len(blocks)} blocks: "
                          f"0..{len(blocks) - 1})")
    # A LoRA factor of rank above the layer's width adds nothing but memory (a huge rank would fail
    # to allocate mid-run, with a traceback, after the base stage)
    width = min(getattr(blocks[i], spec.attention).to_q.in_features for i in cfg.target_layers)
    if cfg.rank > width:
        raise ConfigError(f"--rank {cfg.rank} exceeds the width {width} of the RSR layer's attention "
                          f"(a LoRA factor has rank at most its width)")


def build_from_checkpoint(task: Task, ckpt: dict[str, Any]) -> tuple[nn.Module, RSR | None]:
    """Rebuild backbone (+ RSR) from a checkpoint dict; raises CheckpointError on mismatch."""
    try:
        transformer = task.build_backbone(ckpt.get("backbone"))
    except TaskError as e:  # e.g. a checkpoint of another architecture
        raise CheckpointError(str(e)) from None
    try:
        if ckpt.get("base_state") is not None:
            transformer.load_state_dict(ckpt["base_state"], strict=True)
        rsr = None
        if ckpt.get("rsr_config") is not None:
            rsr = install_rsr(transformer, RSRConfig.from_dict(ckpt["rsr_config"]))
            if ckpt.get("rsr_state") is not None:
                rsr.load_state_dict(ckpt["rsr_state"], strict=True)
    except (RuntimeError, KeyError, ConfigError) as e:
        raise CheckpointError(f"checkpoint weights do not fit the model: {str(e).splitlines()[0][:160]}") from None
    return transformer, rsr


def base_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own weights, without the RSR processors registered inside it."""
    # clone: on CPU .cpu() is the live tensor, and the EMA swap below writes into it in place
    return {k: v.detach().cpu().clone() for k, v in transformer.state_dict().items() if ".processor." not in k}


class Trainer:
    def __init__(self, args: Any, callbacks: list[Callable[[StepInfo], None]] | None = None) -> None:
        from accelerate import Accelerator

        # A copy: the run fills in defaults (or, resumed, the run's own settings) without touching the caller's
        self.given = given_flags(args)
        self.args = args = argparse.Namespace(**vars(args))
        self.callbacks = callbacks or []
        self.out = Path(args.out if args.out is not None else DEFAULTS["out"])
        # Output paths first, before any model is built or step runs (resume rewrites --out in place).
        check_output(self.out, overwrite=args.overwrite or args.resume, inputs=self.inputs)
        check_output(self.log_path, overwrite=True, flag="loss log", inputs=self.inputs)
        # One run per --out, until this one ends; under a launcher the run is all its processes, so the
        # first process holds the lock for them (RANK is set by torchrun / accelerate before we start).
        self._lock: RunLock | None = RunLock(self.out) if launcher_rank() == 0 else None
        try:
            self.ckpt = load_checkpoint(self.out) if args.resume else {}
            if args.resume and args.preset is None:
                args.preset = self.ckpt.get("preset")
            fill_defaults(args)
            self.task = get_task(args.preset, pretrained=args.pretrained, data=args.data)
            if args.resume:
                self._keep_run()
            self.losses: list[dict[str, Any]] = []
            self._prepare()  # every check before the accelerator starts (it cannot be changed once started)
            self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available(),
                                           **tracker_options(args, self.out))
        except BaseException:
            self.close()
            raise

    @property
    def inputs(self) -> dict[str, Any]:
        """The files this run reads, which no output of it may be."""
        a = self.args
        return {"--base": a.base, "--pretrained": a.pretrained, "--data": a.data}

    def close(self) -> None:
        """Give up --out (the run lock); the run itself is over or never started."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- set-up -----------------------------------------------------------------------------
    def _prepare(self) -> None:
        a, task = self.args, self.task
        if a.resume:
            if self.ckpt.get("preset") != task.name:
                raise CheckpointError(f"{self.out} was trained with preset {self.ckpt.get('preset')!r}, "
                                      f"not {task.name!r}")
            self.plan, self.progress = self.ckpt["plan"], dict(self.ckpt["progress"])
            self.rsr_cfg = RSRConfig.from_dict(self.ckpt["rsr_plan"])
            self._check_applicable(list(self.plan))  # what a resumed run may still change (e.g. --trace)
            self.transformer, self.rsr = build_from_checkpoint(task, self.ckpt)
            base_unfinished = self.progress.get("base", 0) < self.plan.get("base", 0)
            if base_unfinished and self.ckpt.get("train_state") is not None:
                # continue from the raw weights; the EMA ones (base_state) are for sampling
                self.transformer.load_state_dict(self.ckpt["train_state"], strict=True)
            rsr_unfinished = self.progress.get("rsr", 0) < self.plan.get("rsr", 0)
            if rsr_unfinished and self.rsr is not None and self.ckpt.get("rsr_train_state") is not None:
                self.rsr.load_state_dict(self.ckpt["rsr_train_state"], strict=True)  # raw, as for the base
            self.losses = list(self.ckpt.get("losses", []))
            return
        if self.out.exists() and not a.overwrite:
            raise CheckpointError(f"{self.out} exists; pass --resume to continue it or --overwrite to replace it")
        if a.stage == "base" and not task.two_stage:
            raise ConfigError(f"preset {task.name!r} {task.one_stage}; it has no base stage")
        stages = [a.stage] if a.stage else (list(STAGES) if task.two_stage else ["rsr"])
        self.rsr_cfg = rsr_config_from_args(task, a)
        self.plan = {s: (a.steps if a.steps is not None else task.default_steps[s]) for s in stages}
        self.progress = {s: 0 for s in stages}
        self._check_applicable(stages)
        self.rsr = None
        if a.stage == "rsr" and task.two_stage:
            if not a.base:
                raise ConfigError("--stage rsr needs --base CKPT (a checkpoint of the base stage)")
            self.transformer = self._base_backbone(a.base)
        else:
            torch.manual_seed(a.seed)  # the backbone's initial weights
            self.transformer = task.build_backbone(None)
        check_targets(self.transformer, self.rsr_cfg)
        if "rsr" in stages and self.rsr_cfg.has_gate:
            check_layout(a.warm_start or task.warm_start, self.rsr_cfg.experts, self.rsr_cfg.steps)
        if "rsr" in stages:
            self.recipe().check(self.plan["rsr"], self.rsr_cfg.has_gate)

    def _check_applicable(self, stages: list[str]) -> None:
        check_applicable(RunPlan(self.task, stages, self.plan, self.rsr_cfg, self.args, self.given,
                                 torch.cuda.is_available()))

    def _base_backbone(self, path: Path) -> nn.Module:
        """The backbone of a base-stage checkpoint (--stage rsr --base): an RSR one is refused, since
        its experts would be dropped without a word."""
        base = load_checkpoint(path)
        if base.get("preset") != self.task.name:
            raise CheckpointError(f"{path} is a {base.get('preset')!r} checkpoint, not {self.task.name!r}")
        if base.get("rsr_config") is not None:
            raise CheckpointError(f"--base {path} is an RSR-stage checkpoint (its experts would be discarded); "
                                  f"give the base-stage checkpoint it was trained from")
        transformer, _ = build_from_checkpoint(self.task, base)
        return transformer

    def _keep_run(self) -> None:
        """A resumed run is the run saved in --out: every run-defining flag given must equal the run's own
        value (else refused), and the ones not given take it, so nothing is silently taken or ignored."""
        a, saved = self.args, self.ckpt.get("args") or {}
        for name in vars(a):
            if name in SESSION_FLAGS or name == "preset":
                continue
            value = saved.get(name, RECIPE_FLAGS.get(name))
            if name not in self.given:
                setattr(a, name, Path(value) if name in PATH_FLAGS and value is not None else value)
            elif not self._same_as_run(name, getattr(a, name), value):
                raise ConfigError(f"{flag(name)} {shown(getattr(a, name))} differs from the run being resumed "
                                  f"({shown(self._run_value(name, value))}); a resumed run keeps its own settings: "
                                  f"drop {flag(name)}")

    def _run_value(self, name: str, saved: Any) -> Any:
        """What the resumed run actually uses for a flag it saved as `saved` (None: the preset's)."""
        cfg = self.ckpt.get("rsr_plan") or {}
        fields = {"mode": "mode", "experts": "num_experts", "latent_steps": "latent_steps", "rank": "rank",
                  "target_layers": "target_layers", "tau": "gumbel_tau", "balance_weight": "balance_weight",
                  "balance_over": "balance_over", "routing": "routing"}
        if name in fields and fields[name] in cfg:
            return cfg[fields[name]]
        if saved is not None:
            return saved
        plan = self.ckpt.get("plan") or {}
        if name == "steps":
            return sorted(set(plan.values()))[0] if len(set(plan.values())) == 1 else plan
        if name == "lr":
            lrs = {self.task.lr[s] for s in plan}
            return lrs.pop() if len(lrs) == 1 else self.task.lr
        if name == "batch_size":
            return self.task.batch_size
        if name == "warm_start_steps" and getattr(self.task, name) is None:
            return plan.get("rsr", 0) // 4
        return getattr(self.task, name, None)

    def _same_as_run(self, name: str, given: Any, saved: Any) -> bool:
        value = self._run_value(name, saved)
        if name in PATH_FLAGS:
            return value is not None and same_file(given, value)
        return given == value

    def _record(self, stage: str, opt, sched) -> dict[str, Any]:
        t = self.accelerator.unwrap_model(self.transformer)
        train_state = rsr_train_state = ema_state = None
        keeps_base = self.task.two_stage or self.task.trains_base_with_rsr
        base = base_state_dict(t) if keeps_base else None
        rsr = self._rsr_state()
        if self._ema is not None:  # sampling uses the EMA weights; resuming needs the raw ones too
            params = self._ema_params
            train_state, rsr_train_state = (base, None) if stage == "base" else (None, rsr)
            ema_state = self._ema.state_dict()
            self._ema.store(params)
            self._ema.copy_to(params)
            base, rsr = (base_state_dict(t) if keeps_base else None), self._rsr_state()
            self._ema.restore(params)
        return {
            "preset": self.task.name, "stage": stage, "mode": self.rsr_cfg.mode,
            "backbone": self.task.backbone_record(t),
            "pretrained": str(Path(self.args.pretrained).resolve()) if getattr(self.args, "pretrained", None) else None,
            "base_state": base, "train_state": train_state, "ema": ema_state,
            "rsr_config": self.rsr.config.to_dict() if self.rsr is not None else None,
            "rsr_state": rsr, "rsr_train_state": rsr_train_state,
            "rsr_plan": self.rsr_cfg.to_dict(),
            "text_encoder": self.task.encoder_identity(),
            "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "plan": self.plan, "progress": dict(self.progress), "step": self.progress[stage],
            "rng": {"torch": torch.get_rng_state()},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "losses": self.losses,
        }

    def _rsr_state(self) -> dict[str, torch.Tensor] | None:
        # clone: on CPU .cpu() is the live tensor, and the EMA swap writes into it in place
        return {k: v.detach().cpu().clone() for k, v in self.rsr.state_dict().items()} if self.rsr is not None else None

    # --- loop -------------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            for stage in self.plan:
                if self.progress[stage] < self.plan[stage]:
                    self._run_stage(stage)
        finally:
            self.close()
        return self.out

    def _param_groups(self, stage: str, params: list, lr: float) -> list[dict]:
        """One group, or in the RSR stage the gate apart: a flat gate only learns from expert
        differences, so its learning rate may be scaled (--gate-lr-scale)."""
        scale = self._setting("gate_lr_scale")
        if stage != "rsr" or scale == 1.0:
            return [{"params": params}]
        gate = {id(p) for layer in self.rsr.values() if layer.gate is not None for p in layer.gate.parameters()}
        return [{"params": [p for p in params if id(p) not in gate]},
                {"params": [p for p in params if id(p) in gate], "lr": lr * scale}]

    def _setting(self, name: str) -> Any:
        """A recipe flag: the command line's (or the resumed run's), else the preset's."""
        value = getattr(self.args, name, None)
        return getattr(self.task, name) if value is None else value

    def warm_start_plan(self) -> dict[str, Any] | None:
        """The RSR stage's expert warm start, {"layout", "steps"}, or None when the run has none."""
        if "rsr" not in self.plan or not self.rsr_cfg.has_gate:
            return None
        layout, steps = self._setting("warm_start"), self._setting("warm_start_steps")
        steps = self.plan["rsr"] // 4 if steps is None else steps  # preset default: the stage's first quarter
        return None if layout == "none" or steps == 0 else {"layout": layout, "steps": steps}

    def recipe(self) -> Recipe:
        """The RSR stage's routing recipe (upcycling, soft phase, annealing, random-routing control). The
        preset's recipe is for its gated model: a run without a gate (sft, no_modulation) has none, and the
        random-routing control takes only what its command line gives (Recipe.check refuses a learned phase).
        A phase the preset leaves at None lasts a quarter of the stage."""
        names = ("upcycle_steps", "upcycle_noise", "soft_steps", "anneal", "train_routing")
        if not self.rsr_cfg.has_gate:
            return Recipe()
        if self._setting("train_routing") == "random":
            return Recipe(**{name: value for name in names if (value := getattr(self.args, name, None)) is not None})
        return Recipe.of_stage({name: self._setting(name) for name in names}, self.plan.get("rsr", 0))

    def _warm_start(self, stage: str) -> tuple[WarmStart | None, int]:
        """The expert warm start of the RSR stage (warm_start.py) and its length in steps."""
        warm = self.warm_start_plan() if stage == "rsr" else None
        if warm is None:
            return None, 0
        return WarmStart(self.rsr, warm["layout"], self.task.weighting, self.task.shift), warm["steps"]

    def _run_stage(self, stage: str) -> None:
        """One stage, as one flat loop in labelled phases (in the manner of nanoGPT's train.py)."""
        from tqdm import tqdm

        acc = self.accelerator
        run = self._setup_stage(stage)
        bar = tqdm(total=run.total, initial=run.start, desc=f"{self.task.name}:{stage}",
                   disable=not acc.is_main_process, dynamic_ncols=True, file=sys.stderr)
        log = self._log_writer()
        last_good = run.start  # the step of the newest checkpoint, for the divergence message
        self._batches = BatchDigest()
        try:
            for step in range(run.start, run.total):
                for cb in self.callbacks:  # e.g. a recorder attaching hooks for this step only
                    if hasattr(cb, "before"):
                        cb.before(stage, step + 1, acc.unwrap_model(run.model), run.rsr)
                fm, bal = self._train_step(run, stage, step, last_good)
                fm, bal = self._mean_over_ranks(fm), (self._mean_over_ranks(bal) if bal is not None else None)
                self.progress[stage] = step + 1

                # --- log, checkpoint, callbacks -----------------------------------------------
                entry = self._log_entry(stage, step, fm, bal, run.rsr)
                log.writerow(_log_row(entry))
                bar.update(1)
                bar.set_postfix(loss=f"{fm.item():.4f}", **({"bal": f"{bal.item():.3f}",
                                                              "load": "/".join(f"{x:.2f}" for x in entry["load"])}
                                                             if bal is not None else {}))
                if (step + 1) % self.args.save_every == 0 or step + 1 == run.total:
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        self._flush_log()  # first: once a checkpoint exists, the log on disk covers its steps
                        save_checkpoint(self._record(stage, run.opt, run.sched), self.out)
                    last_good = step + 1
                for cb in self.callbacks:
                    cb(StepInfo(stage, step + 1, fm.item(), entry["balance"], acc.unwrap_model(run.model), run.rsr))
        except RuntimeError as e:
            if not peer_stopped(e):
                raise
            raise TrainingError(f"another process of this run stopped at {stage} step {self.progress[stage]}; this "
                                f"one stops too. Last checkpoint: {self.out} ({stage} step {last_good})") from None
        finally:
            bar.close()
        self._end_stage(run)
        if getattr(self.args, "check_replicas", False):
            self._check_replicas(stage)

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks (each draws its own batch): what the log and callbacks see."""
        acc = self.accelerator
        return acc.reduce(x.detach().clone(), reduction="mean") if acc.num_processes > 1 else x

    def _check_replicas(self, stage: str) -> None:
        """--check-replicas: one line on the main process; ranks whose weights differ stop the run."""
        line, same = replica_line(self.accelerator, stage, self.transformer, self._batches)
        if self.accelerator.is_main_process:
            print(line, flush=True)
        if not same:
            raise TrainingError(f"the ranks' weights differ after the {stage} stage (see the replicas line)")

    def _setup_stage(self, stage: str) -> "_StageRun":
        """Model, trainable parameters, EMA, optimizer and schedule of a stage (restored on --resume)."""
        a, task, acc = self.args, self.task, self.accelerator
        if stage == "rsr" and self.rsr is None:
            torch.manual_seed(a.seed + 1)  # the experts' and gate's initial weights
            self.rsr = install_rsr(self.transformer, self.rsr_cfg)
        whole = stage == "base" or task.trains_base_with_rsr
        if whole:
            self.transformer.requires_grad_(True)
        params = [p for p in (self.transformer.parameters() if whole else self.rsr.parameters()) if p.requires_grad]
        self._ema, self._ema_params = None, params
        decay = a.ema_decay if stage == "base" else self._setting("rsr_ema_decay")
        if decay > 0:
            from diffusers.training_utils import EMAModel

            # Sampling quality of small diffusion models depends a lot on weight averaging; in the
            # RSR stage the average also removes the adapters' step-to-step noise.
            self._ema = EMAModel(params, decay=decay, use_ema_warmup=True)
            if self.progress[stage] and self.ckpt.get("stage") == stage and self.ckpt.get("ema") is not None:
                self._ema.load_state_dict(self.ckpt["ema"])
        lr = a.lr if a.lr is not None else task.lr[stage]
        opt = torch.optim.AdamW(self._param_groups(stage, params, lr), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        warmup = max(1, min(50, self.plan[stage] // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        start = self.progress[stage]
        if start and self.ckpt.get("stage") == stage:
            opt.load_state_dict(self.ckpt["optimizer"])
            sched.load_state_dict(self.ckpt["lr_scheduler"])
        model, opt = acc.prepare(self.transformer, opt)
        model.train()
        warm, warm_steps = self._warm_start(stage)
        recipe = self.recipe() if stage == "rsr" else None
        return _StageRun(model, opt, sched, params, self.rsr if stage == "rsr" else None, recipe, warm, warm_steps,
                         a.batch_size or task.batch_size, start, self.plan[stage])

    def _train_step(self, run: "_StageRun", stage: str, step: int, last_good: int):
        """One optimizer step; returns (flow-matching loss, balance loss or None)."""
        acc, rsr = self.accelerator, run.rsr

        # --- batch: every random draw of this step comes from (seed, stage, step) -------------
        seed = stage_seed(self.args.seed + acc.process_index, stage, step)
        torch.manual_seed(seed)  # Gumbel noise, dropout, DiT's label dropout
        x0, cond = self.task.stage_batch(stage, np.random.default_rng(seed), run.batch_size)
        x0, cond = x0.to(acc.device), {k: v.to(acc.device) for k, v in cond.items()}
        if getattr(self.args, "check_replicas", False):
            self._batches.update(x0)  # ranks must draw different batches (a host copy: only when asked)

        # --- routing of this step (the recipe's phase) ------------------------------------------
        if run.recipe is not None:
            if run.recipe.upcycles_at(step):  # expert 0 becomes every expert, then the gate routes
                upcycle(rsr, run.opt, run.recipe.upcycle_noise, seed)
            phase = run.recipe.phase(step, run.total)
            rsr.state.routing, rsr.state.temperature = phase.routing, phase.temperature

        # --- forward and loss -------------------------------------------------------------------
        warming = run.warm is not None and step < run.warm_steps  # experts forced to their cells, gate taught them
        with acc.autocast(), (run.warm.forcing() if warming else contextlib.nullcontext()):
            fm = self.task.training_loss(run.model, rsr, x0, cond, seed)  # flow matching unless the preset has its own
            bal = rsr.balance_loss() if rsr is not None else None
            loss = fm + (rsr.config.balance_weight * bal if bal is not None and rsr.config.experts > 3 else 0.0)
            if warming:
                loss = loss + run.warm.gate_loss()
        if not torch.isfinite(loss):
            raise self._diverged(loss.item(), stage, step, last_good)

        # --- backward and optimizer step --------------------------------------------------------
        run.opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        run.opt.step()
        run.sched.step()
        if self._ema is not None:
            self._ema.step(run.params)
        return fm, bal

    def _log_entry(self, stage: str, step: int, fm: torch.Tensor, bal: torch.Tensor | None,
                   rsr: RSR | None) -> dict[str, Any]:
        entry = {"stage": stage, "step": step + 1, "loss": round(fm.item(), 6),
                 "balance": round(bal.item(), 4) if bal is not None else None}
        if rsr is not None:  # the share of tokens per expert the model used: in the warm start, the forced cells
            entry["load"] = [round(x, 3) for x in self._load_share()]
        self.losses.append(entry)
        return entry

    def _end_stage(self, run: "_StageRun") -> None:
        self._log_file.flush()
        if run.rsr is not None:  # sampling routes by the gate (argmax), whatever the last phase was
            run.rsr.state.routing, run.rsr.state.temperature = None, 1.0
        self.transformer = self.accelerator.unwrap_model(run.model)
        if self._ema is not None:  # the RSR stage freezes the averaged base; sampling uses averaged experts
            self._ema.copy_to(self._ema_params)
            self._ema = None

    def _diverged(self, loss: float, stage: str, step: int, last_good: int) -> TrainingError:
        if self.out.exists():
            return TrainingError(f"loss became {loss} at {stage} step {step}; stopped. "
                                 f"Last good checkpoint: {self.out} ({stage} step {last_good})")
        return TrainingError(f"loss became {loss} at {stage} step {step}; stopped before any checkpoint was written")

    def _load_share(self) -> list[float]:
        loads = [l.last_load for l in self.rsr.values() if l.last_load is not None]
        return torch.stack(loads).mean(0).tolist() if loads else []

    @property
    def log_path(self) -> Path:
        return self.out.with_suffix(self.out.suffix + ".log.csv")

    def _log_writer(self):
        """The loss CSV beside the checkpoint. A resumed run rewrites it from the checkpoint's own
        loss history (steps 1..N, one header), so rows from after the checkpoint, from a run that
        died between checkpoints, never linger and none are missing. `load_share` is the share of
        tokens each expert received, as the model routed them (during an expert warm start, the forced
        cells, which a training trace stores too), not the gate's own draw."""
        if not hasattr(self, "_log_file") and not self.accelerator.is_main_process:
            # one loss log per run: the main process writes it (the losses are means over ranks)
            self._log_file = open(os.devnull, "a", newline="")
            self._csv = csv.writer(self._log_file)
        if not hasattr(self, "_log_file"):
            text = io.StringIO()
            history = csv.writer(text)
            history.writerow(["stage", "step", "loss", "balance", "load_share"])
            history.writerows(_log_row(e) for e in self.losses)
            write_atomic(self.log_path, text.getvalue())
            self._log_file = open(self.log_path, "a", newline="")
            self._csv = csv.writer(self._log_file)
        return self._csv

    def _flush_log(self) -> None:
        self._log_file.flush()
        os.fsync(self._log_file.fileno())


def tracker_options(args: Any, out: Path) -> dict[str, Any]:
    """Accelerator keywords of --report-to (experiment trackers, as diffusers' --report_to):
    nothing without it; the event files go to --logging-dir (default: beside the checkpoint)."""
    report_to = getattr(args, "report_to", None)
    if not report_to:
        return {}
    logging_dir = getattr(args, "logging_dir", None) or out.with_name(out.name + ".logs")
    return {"log_with": report_to, "project_dir": str(logging_dir)}


def _log_row(entry: dict[str, Any]) -> list:
    return [entry["stage"], entry["step"], entry["loss"], entry["balance"] if entry["balance"] is not None else "",
            " ".join(map(str, entry.get("load", [])))]


def train(args: Any, callbacks: list[Callable[[StepInfo], None]] | None = None) -> Path:
    return Trainer(args, callbacks).run()

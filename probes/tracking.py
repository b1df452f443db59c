"""Experiment tracking of a training run (`python -m rsr_model train --report-to tensorboard`).

A trainer callback that logs to the trackers accelerate holds (`Accelerator(log_with=...)`), as
diffusers' training scripts do with `--report_to`. Tags, per stage (`base/...`, `rsr/...`, the
x axis is the stage's optimizer step):

* every step: `loss` (flow matching, mean over ranks), `balance` (RSR stage);
* every `--report-every` steps of the RSR stage, on the main process's batch:
  `gate_entropy` (normalised: 0 one-hot, 1 uniform) and `gate_margin` (top-1 minus top-2
  probability), means over layers, recursion steps and tokens; `load/expert_k` (share of routing
  decisions); `mi_expert_timestep_bin` (plug-in MI in nats between the chosen expert and the
  timestep bin, noisiest bin first).

It lives in `probes`, not in `rsr_model`, because the quantities are the report's own one
definitions (`probes.stats`, `traces.bins`), and `rsr_model` may not import `probes`;
`rsr_model/__main__.py`, a command, composes it into the trainer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from traces.bins import timestep_bins

from .stats import counts_from_ids, gate_entropy, mutual_information, top1_margin

N_TIMESTEP_BINS = 4  # as the report's default MI(expert; timestep bin)


def check_trackers(names: list[str]) -> None:
    """Refuse (one line) a tracker that is not installed, before any model is built."""
    from accelerate.tracking import _available_trackers

    from cli_common.errors import UsageError

    have = {getattr(t, "value", str(t)) for t in _available_trackers}
    missing = [n for n in names if n != "all" and n not in have]
    if missing:
        hint = " (pip install 'thinking-pixel[track]')" if "tensorboard" in missing else ""
        raise UsageError(f"--report-to {', '.join(missing)}: not installed{hint}; installed: "
                         f"{', '.join(sorted(have)) or 'none'}")


def routing_stats(probs: np.ndarray, expert: np.ndarray, timestep: np.ndarray, n_experts: int) -> dict[str, float]:
    """Gate statistics of one batch: probs (M, B, N, K), expert (M, B, N) for M (layer, step)
    pairs, timestep (B,) model timestep values in [0, 1000]."""
    out = {"gate_entropy": float(np.mean(gate_entropy(probs, normalised=True))),
           "gate_margin": float(np.mean(top1_margin(probs)))}
    counts = counts_from_ids(expert.reshape(-1), n_experts)
    share = counts / max(counts.sum(), 1)
    out.update({f"load/expert_{k}": float(share[k]) for k in range(n_experts)})
    bins = timestep_bins(1000.0 - np.asarray(timestep, dtype=np.float64), N_TIMESTEP_BINS, 0, 1000)  # noisiest: 0
    rows = np.broadcast_to(bins[None, :, None], expert.shape).reshape(-1)
    table = counts_from_ids(expert.reshape(-1), n_experts, groups=[rows], group_shape=[N_TIMESTEP_BINS])
    out["mi_expert_timestep_bin"] = float(mutual_information(table))  # (bin, expert) table
    return out


class TrainingTracker:
    """Trainer callback: hooks the gate on reported steps (`before`), logs after the optimizer step."""

    def __init__(self, accelerator, every: int, config: dict[str, Any] | None = None,
                 project: str = "rsr_model") -> None:
        self.acc, self.every = accelerator, every
        self._handles: list = []
        self._probs: list = []
        self._expert: list = []
        self._t = None
        self.acc.init_trackers(project, config=_scalars(config or {}))

    def before(self, stage: str, step: int, transformer, rsr) -> None:
        if rsr is None or step % self.every or not self.acc.is_main_process:
            return
        self._probs, self._expert = [], []

        def on_probs(v, ctx):
            self._probs.append(v.detach().float().cpu().numpy())

        def on_expert(e, ctx):
            self._expert.append(e.detach().cpu().numpy())
            self._t = ctx.timestep.detach().float().cpu().numpy()

        self._handles = rsr.hooks.add("*.probs", on_probs) + rsr.hooks.add("*.expert", on_expert)

    def __call__(self, info) -> None:
        values = {"loss": info.loss}
        if info.balance is not None:
            values["balance"] = info.balance
        if self._handles:
            for h in self._handles:
                h.remove()
            self._handles = []
            if self._expert and self._probs:
                values.update(routing_stats(np.stack(self._probs), np.stack(self._expert), self._t,
                                            info.rsr.config.experts))
        self.acc.log({f"{info.stage}/{k}": v for k, v in values.items()}, step=info.step)

    def close(self) -> None:
        self.acc.end_training()


def _scalars(config: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as trackers take them (TensorBoard's hparams: numbers, strings, booleans)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items() if v is not None}

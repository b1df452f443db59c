"""Routing value: does the gate's choice of expert matter for the model's own objective?

Routing statistics (shares, MI) describe which expert the argmax picked; they cannot say
whether that choice mattered. This probe measures it on held-out batches of the task's own
data: the flow-matching loss per timestep bin under

    gate       the gate's own routing (argmax, as when sampling)
    random     experts drawn independently per token from the gate's own load share of that
               layer and step over all held-out bins: the same load, the token-to-expert
               assignment (and its dependence on timestep) destroyed (several draws)
    forced k   expert k for every token
    none       no adapter (expert id -1)

Each intervention acts on one recursion step at a time (the other steps keep the gate's
routing), and on all steps together (scope "all"). The headline figure per scope is

    value = 1 - loss(gate) / loss(random)      (> 0: the gate's assignment lowers the loss)

with a 95% bootstrap interval over held-out samples (paired: the same x_t, t and noise under
every condition). Beside it, `adapter_gain = 1 - loss(gate) / loss(none)`: in scope "all" how
much the adapters lower the loss against the frozen base at all. A step's routing can matter a
lot (the later steps were trained on its output) while the adapters together change nothing;
only both figures together say the experts do useful, specialized work. Timestep bins are
equal-width bins of sigma = t / 1000, bin 0 the noisiest (`traces.bins`), as in the probes of
sampling traces (training-trace reports order their bins the other way: compare bins by `t_min` /
`t_max`, not by index).

    python -m probes.routing_value --ckpt CKPT [--samples 64] [--bins 4] [--random-draws 3] [--json OUT]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cli_common.command import guard_startup

guard_startup(__name__)  # before torch: Ctrl-C while it loads exits 130 with one line

import numpy as np
import torch

from rsr_model.hooks import hook_name
from traces.bins import timestep_bin_edges

ROUTING_VALUE_SCHEMA = "rsr-routing-value"
ROUTING_VALUE_VERSION = 1
HELD_OUT_SEED = 2_000_003  # far from the training streams (seeded per stage and step)


@dataclass
class HeldOutBatch:
    """One timestep bin's batch: noisy inputs, timesteps, conditioning and velocity targets."""

    xt: torch.Tensor  # (B, C, H, W)
    t: torch.Tensor  # (B,) timestep = sigma * 1000
    cond: dict[str, torch.Tensor]
    target: torch.Tensor  # (B, C, H, W)


def bin_edges(n_bins: int) -> np.ndarray:
    """Sigma edges of the bins, noisiest first: bin b is sigma between edges[b+1] and edges[b], the
    bin `traces.bins.timestep_bins(1000 - t, n_bins, 0, 1000)` puts a timestep t = 1000 sigma in
    (as the evaluation's routing figures do; that rule gives an edge itself to the noisier bin,
    while `held_out_batches` may draw the lower edge, a set of probability zero)."""
    return 1.0 - timestep_bin_edges(n_bins, 0.0, 1.0)


def held_out_batches(task, n_samples: int, n_bins: int, seed: int = HELD_OUT_SEED) -> list[HeldOutBatch]:
    """Held-out batches of the task's own data, one per timestep bin, sigma uniform in the bin.
    They are drawn as training batches are (caption dropout included), from a stream training
    never uses; the embedded data are generated, so a scene may still repeat one seen in training."""
    edges = bin_edges(n_bins)
    out = []
    for b in range(n_bins):
        rng = np.random.default_rng([seed, b])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        x0, cond = task.batch(rng, n_samples)
        sigma = edges[b + 1] + (edges[b] - edges[b + 1]) * torch.rand(n_samples, generator=gen, dtype=torch.float64)
        sigma = sigma.to(x0.dtype)
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        s = sigma.view(-1, 1, 1, 1)
        out.append(HeldOutBatch((1 - s) * x0 + s * noise, sigma * 1000, cond, noise - x0))
    return out


def _forced(expert: int) -> Callable:
    return lambda ids, ctx: torch.full_like(ids, expert)


def _drawn_from(load: dict[tuple[int, int], torch.Tensor], gen: torch.Generator) -> Callable:
    """Replace the choice by i.i.d. draws from the (layer, step)'s load share (K,)."""
    def fn(ids: torch.Tensor, ctx) -> torch.Tensor:
        share = load[(ctx.layer, ctx.step)]
        return torch.multinomial(share, ids.numel(), replacement=True, generator=gen).view_as(ids)
    return fn


@torch.no_grad()
def gate_load(transformer, rsr, batches: Sequence[HeldOutBatch]) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, step) -> (K,) share of the gate's choices over all `batches` (the null's load)."""
    K = rsr.config.experts
    counts: dict[tuple[int, int], torch.Tensor] = {}

    def count(ids: torch.Tensor, ctx) -> None:
        key = (ctx.layer, ctx.step)
        counts[key] = counts.get(key, torch.zeros(K)) + torch.bincount(ids[ids >= 0].reshape(-1), minlength=K)

    with rsr.hooks.hooks({hook_name("*", "expert", "*"): count}):
        for b in batches:
            transformer(hidden_states=b.xt, timestep=b.t, **b.cond)
    return {k: c / c.sum() for k, c in counts.items()}


@torch.no_grad()
def _losses(transformer, batch: HeldOutBatch, rsr, pattern: str | None, fn: Callable | None) -> np.ndarray:
    """(B,) per-sample flow-matching loss with `fn` on the expert hook points matching `pattern`."""
    hooks = [(pattern, fn)] if fn is not None else []
    with rsr.hooks.hooks(hooks):
        pred = transformer(hidden_states=batch.xt, timestep=batch.t, **batch.cond).sample
    return ((pred.float() - batch.target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim))).double().numpy()


def _relative_gain(gate: np.ndarray, random: np.ndarray, axis=None) -> np.ndarray:
    """1 - sum(gate)/sum(random); 0 where random routing has no loss to reduce."""
    g, r = gate.sum(axis), random.sum(axis)
    return np.where(r > 0, 1.0 - g / np.where(r > 0, r, 1.0), 0.0)


def _bootstrap_value(gate: np.ndarray, random: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple:
    """95% interval of 1 - sum(gate)/sum(random), (bins, n) arrays, resampling samples within each
    bin (paired; every bin keeps its weight, as in the estimate)."""
    bins, n = gate.shape
    idx = rng.integers(0, n, size=(n_boot, bins, n))
    rows = np.arange(bins)[None, :, None]
    vals = _relative_gain(gate[rows, idx].reshape(n_boot, -1), random[rows, idx].reshape(n_boot, -1), axis=1)
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def _scope_result(gate: np.ndarray, random: np.ndarray, forced: np.ndarray, none: np.ndarray,
                  n_boot: int, seed: int) -> dict[str, Any]:
    """Summaries of one scope. Arrays: gate (bins, n), random (draws, bins, n), forced (K, bins, n), none (bins, n)."""
    random_mean = random.mean(0)  # (bins, n): average over shuffles, per sample
    lo, hi = _bootstrap_value(gate, random_mean, n_boot, np.random.default_rng(seed))
    forced_loss = forced.mean(2)  # (K, bins)
    return {
        "loss": {
            "gate": gate.mean(1), "random": random_mean.mean(1), "random_draw_std": random.mean(2).std(0),
            "forced": forced_loss, "none": none.mean(1),
        },
        "overall": {"gate": gate.mean(), "random": random_mean.mean(), "forced": forced_loss.mean(1),
                    "none": none.mean()},
        "value": float(_relative_gain(gate, random_mean)),
        "value_ci95": [lo, hi],
        "value_by_bin": _relative_gain(gate, random_mean, axis=1),
        "adapter_gain": float(_relative_gain(gate, none)),
        "best_forced_by_bin": forced_loss.argmin(0),
        "gate_below_every_forced": bool(gate.mean() < forced_loss.mean(1).min()),
        "gate_below_every_forced_by_bin": gate.mean(1) < forced_loss.min(0),
    }


def routing_value(transformer, rsr, batches: Sequence[HeldOutBatch], random_draws: int = 3,
                  n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The loss table of every scope (each recursion step alone, then "all") on `batches`, one per bin."""
    if random_draws < 1:
        raise ValueError("random_draws must be >= 1")
    K, L = rsr.config.experts, rsr.config.steps
    scopes = [(str(s), hook_name("*", "expert", s)) for s in range(L)] + [("all", hook_name("*", "expert", "*"))]
    if len(rsr.layer_indices) > 1:  # each layer's own routing too: a verdict must not borrow another layer's value
        scopes += [(f"{i}.{s}", hook_name(i, "expert", s)) for i in rsr.layer_indices for s in range(L)]
    gate = np.stack([_losses(transformer, b, rsr, None, None) for b in batches])  # (bins, n)
    load = gate_load(transformer, rsr, batches)
    out: dict[str, Any] = {}
    for si, (name, pattern) in enumerate(scopes):
        gen = torch.Generator().manual_seed(seed * 1009 + si)
        random = np.stack([np.stack([_losses(transformer, b, rsr, pattern, _drawn_from(load, gen)) for b in batches])
                           for _ in range(random_draws)])
        forced = np.stack([np.stack([_losses(transformer, b, rsr, pattern, _forced(k)) for b in batches])
                           for k in range(K)])
        none = np.stack([_losses(transformer, b, rsr, pattern, _forced(-1)) for b in batches])
        out[name] = _scope_result(gate, random, forced, none, n_boot, seed + si)
    edges = bin_edges(len(batches))
    return {
        "schema": ROUTING_VALUE_SCHEMA, "schema_version": ROUTING_VALUE_VERSION,
        "experts": K, "steps": L, "layers": rsr.layer_indices,
        "timestep_bins": [{"bin": b, "t_max": float(edges[b] * 1000), "t_min": float(edges[b + 1] * 1000)}
                          for b in range(len(batches))],
        "samples_per_bin": int(batches[0].xt.shape[0]) if batches else 0,
        "random_draws": random_draws, "bootstrap": n_boot,
        "scopes": out,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A plain-text table: per scope, the overall losses, the value with its interval, best forced expert per bin."""
    K = result["experts"]
    head = f"{'scope':>6} {'gate':>9} {'random':>9} " + " ".join(f"{'e' + str(k):>9}" for k in range(K)) \
        + f" {'none':>9}  value [95% CI]        best forced by bin"
    lines = [head]
    for name, r in result["scopes"].items():
        o = r["overall"]
        lo, hi = r["value_ci95"]
        lines.append(f"{name:>6} {o['gate']:9.5f} {o['random']:9.5f} " + " ".join(f"{v:9.5f}" for v in o["forced"])
                     + f" {o['none']:9.5f}  {r['value']:+.4f} [{lo:+.4f}, {hi:+.4f}]  "
                     + " ".join(str(int(k)) for k in r["best_forced_by_bin"]))
    whole = result["scopes"].get("all")
    if whole is not None:
        lines.append(f"adapters, all steps: loss {whole['overall']['gate']:.5f} with the gate's routing, "
                     f"{whole['overall']['none']:.5f} without any (the frozen base): "
                     f"{100 * whole['adapter_gain']:+.2f}% gain")
    return lines


def check_result(value: Any, where: str) -> dict[str, Any]:
    """A routing-value result as `main` writes it, or UserError (one line) saying what is wrong:
    another schema or version, no `checkpoint_sha256` (it would decide any checkpoint's verdicts),
    or a scope without the numbers a verdict reads (a hand-edited or truncated file)."""
    import math

    from cli_common.errors import UserError

    def bad(what: str) -> UserError:
        return UserError(f"{where}: {what}; measure it again with python -m probes.routing_value")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(value, dict) or value.get("schema") != ROUTING_VALUE_SCHEMA:
        raise bad("not a probes.routing_value result")
    if value.get("schema_version") != ROUTING_VALUE_VERSION:
        raise bad(f"schema_version {value.get('schema_version')!r}, this toolkit reads {ROUTING_VALUE_VERSION}")
    sha = value.get("checkpoint_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise bad("no checkpoint_sha256 (the checkpoint it was measured on cannot be checked)")
    scopes = value.get("scopes")
    if not isinstance(scopes, dict) or not scopes or not isinstance(value.get("layers"), list):
        raise bad("no scopes or layers")
    for name, scope in scopes.items():
        ci = scope.get("value_ci95") if isinstance(scope, dict) else None
        if not (isinstance(ci, list) and len(ci) == 2 and all(number(x) for x in ci) and number(scope.get("value"))
                and isinstance(scope.get("gate_below_every_forced"), bool)
                and (scope.get("adapter_gain") is None or number(scope.get("adapter_gain")))):
            raise bad(f"scope {name!r} lacks a finite value, value_ci95 [low, high], adapter_gain or "
                      f"gate_below_every_forced")
    return value


def main(argv: list[str] | None = None) -> int:
    from cli_common.command import Parser, int_at_least, run_main
    from cli_common.errors import UsageError
    from cli_common.outputs import check_output, sha256_file, write_atomic

    p = Parser(prog="python -m probes.routing_value", description=__doc__.splitlines()[0], version=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--samples", type=int_at_least(2), default=64, help="held-out samples per timestep bin")
    p.add_argument("--bins", type=int_at_least(1), default=4, help="timestep bins (equal widths of sigma)")
    p.add_argument("--random-draws", type=int_at_least(1), default=3, help="shuffles of the gate's routing per scope")
    p.add_argument("--seed", type=int_at_least(0), default=HELD_OUT_SEED, help="held-out data stream")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--overwrite", action="store_true")

    def body() -> None:
        from probes.analysis import jsonable
        from rsr_model.sample import load_model

        a = p.parse_args(argv)
        check_output(a.json, a.overwrite, flag="--json", inputs={"--ckpt": a.ckpt})
        task, transformer, rsr, ckpt = load_model(a.ckpt)
        if rsr is None:
            raise UsageError(f"{a.ckpt} has no RSR layers (a base-stage checkpoint)")
        if task.commands() is not None:  # a task with its own sampler (FrozenLake plans): no flow-matching loss
            raise UsageError(f"{a.ckpt} is a {task.name} checkpoint; the routing value measures a diffusion "
                             f"model's flow-matching loss (judge plans with python -m rsr_model evaluate --planning)")
        print(f"measuring the flow-matching loss on {a.samples} held-out sample(s) x {a.bins} timestep bin(s)",
              file=sys.stderr)
        torch.manual_seed(0)
        result = routing_value(transformer, rsr, held_out_batches(task, a.samples, a.bins, a.seed),
                               a.random_draws)
        result["checkpoint"] = str(a.ckpt)
        result["checkpoint_sha256"] = sha256_file(a.ckpt)
        print("\n".join(summary_lines(result)))
        if a.json is not None:
            write_atomic(a.json, json.dumps(jsonable(result), indent=1))
            print(f"wrote {a.json}")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())

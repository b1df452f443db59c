"""Routing value: does the gate's choice of expert matter for the model's own objective?

Routing statistics (shares, MI) describe which expert the argmax picked; they cannot say
whether that choice mattered. This probe measures it on held-out batches of the task's own
data: the flow-matching loss per timestep bin under these routings (`probes.routing_conditions`):

    gate          the gate's own routing (argmax, as when sampling)
    sampled       drawn from the gate's probabilities (as training routes: hard Gumbel)
    random_image  one expert per image per (layer, step), drawn from the gate's own load share of
                  that (layer, step) over the held-out set: the same load, the assignment destroyed
    random_token  the same, drawn per token (mixes experts inside an image; schema 1's null)
    forced k      expert k for every token;  none: no adapter (the frozen base)
    oracle        per timestep bin, the best of: one forced expert at every point of the scope, or each
                  point's own best forced expert (chosen with the other points on the gate's routing);
                  chosen on the other half of the samples (cross-fitted), so selection does not flatter it

Each condition acts on one recursion step at a time, the other steps replaying the ids the gate
chose on the unperturbed pass (so later steps cannot react to the perturbation), and on all steps
together (scope "all"). Per step, `random_token_free` is schema 1's condition (later steps left to
the gate), kept to show what replay changes. Figures per scope, bins weighted equally, each with a
95% interval over held-out sets, samples and random draws (`probes.routing_interval`):

    value              1 - L(gate)/L(random_image)   (> 0: the gate's assignment lowers the loss)
    value_token        1 - L(gate)/L(random_token)
    value_no_replay    1 - L(gate)/L(random_token_free)   (per-step scopes: schema 1's figure)
    adapter_gain       1 - L(gate)/L(none)           (scope "all": what the adapters do at all)
    routing_share      (L(random_image) - L(gate)) / (L(none) - L(gate)): the part of the adapters'
                       gain that depends on the routing
    oracle_gap         1 - L(oracle)/L(gate)         (> 0: a fixed expert per bin and step beats the gate)
    argmax_vs_sampled  1 - L(gate)/L(sampled)        (> 0: argmax routing beats the training's sampling)

A step's routing can matter a lot (the later steps were trained on its output) while the adapters
together change nothing; only value and adapter gain together say the experts do useful, specialized
work. Timestep bins are equal-width bins of sigma = t / 1000, bin 0 the noisiest (`traces.bins`), as
in the probes of sampling traces (training-trace reports order their bins the other way: compare bins
by `t_min` / `t_max`, not by index). Schema version 2 (probes/REPORT.md, "Routing value") adds the
conditions and figures above and weights bins equally; version 1 files are still read by the verdict.

    python -m probes.routing_value --ckpt CKPT [--samples 32] [--bins 4] [--random-draws 8]
                                   [--held-out-sets 2] [--json OUT]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cli_common.command import guard_startup

guard_startup(__name__)  # before torch: Ctrl-C while it loads exits 130 with one line

import numpy as np
import torch

from rsr_model.hooks import hook_name
from traces.bins import timestep_bin_edges

from .routing_conditions import (
    Key,
    Sampled,
    Scope,
    forced,
    oracle,
    random_image,
    random_token,
    router,
    scopes,
    single_point_scope,
)
from .routing_interval import Resampler, bin_means, estimate, relative_gain, routing_share

ROUTING_VALUE_SCHEMA = "rsr-routing-value"
ROUTING_VALUE_VERSION = 2  # 2: sampled, per-image, replay, oracle; figures with intervals; bins equal
READABLE_VERSIONS = (1, 2)  # a version-1 result is still read; its verdicts can never be "specialized"
DEFAULT_DRAWS = 8
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


def held_out_sets(task, n_samples: int, n_bins: int, n_sets: int,
                  seed: int = HELD_OUT_SEED) -> list[list[HeldOutBatch]]:
    """`n_sets` independent held-out sets (streams seed, seed + 1, ...): the interval's set level."""
    return [held_out_batches(task, n_samples, n_bins, seed + j) for j in range(n_sets)]


def _forward_loss(transformer, rsr, batch: HeldOutBatch, expert_fn: Callable | None,
                  probs_fn: Callable | None = None) -> np.ndarray:
    """(B,) per-sample flow-matching loss with `expert_fn` on every expert hook point."""
    hooks = []
    if expert_fn is not None:
        hooks.append((hook_name("*", "expert", "*"), expert_fn))
    if probs_fn is not None:
        hooks.append((hook_name("*", "probs", "*"), probs_fn))
    with torch.no_grad(), rsr.hooks.hooks(hooks):
        pred = transformer(hidden_states=batch.xt, timestep=batch.t, **batch.cond).sample
    return ((pred.float() - batch.target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim))).double().numpy()


def _clean_pass(transformer, rsr, batch: HeldOutBatch) -> tuple[np.ndarray, dict[Key, torch.Tensor]]:
    """The gate's own routing: per-sample loss and the ids it chose at every (layer, step)."""
    ids: dict[Key, torch.Tensor] = {}

    def keep(value: torch.Tensor, ctx) -> None:
        ids[(ctx.layer, ctx.step)] = value.clone()

    return _forward_loss(transformer, rsr, batch, keep), ids


def gate_load(clean: Sequence[dict[Key, torch.Tensor]], experts: int) -> dict[Key, torch.Tensor]:
    """(layer, step) -> (K,) share of the gate's choices over the clean passes of a held-out set."""
    counts: dict[Key, torch.Tensor] = {}
    for ids in clean:
        for key, v in ids.items():
            counts[key] = counts.get(key, torch.zeros(experts)) + torch.bincount(v[v >= 0].reshape(-1),
                                                                               minlength=experts)
    return {k: c / c.sum() if c.sum() > 0 else torch.full((experts,), 1.0 / experts) for k, c in counts.items()}


def _draws(transformer, rsr, batches, clean, scope: Scope, make: Callable, draws: int) -> np.ndarray:
    """(draws, bins, n) losses of a random condition; `make()` gives a fresh perturbation per draw."""
    out = []
    for _ in range(draws):
        rows = []
        for b, batch in enumerate(batches):
            perturb = make()
            probs_fn = perturb.keep if isinstance(perturb, Sampled) else None
            rows.append(_forward_loss(transformer, rsr, batch, router(scope, perturb, clean[b]), probs_fn))
        out.append(np.stack(rows))
    return np.stack(out)


def _fixed(transformer, rsr, batches, clean, scope: Scope, perturb_of: Callable[[int], Callable]) -> np.ndarray:
    """(1, bins, n) losses of a deterministic condition; `perturb_of(bin)` is its perturbation."""
    return np.stack([_forward_loss(transformer, rsr, batch, router(scope, perturb_of(b), clean[b]))
                     for b, batch in enumerate(batches)])[None]


def _halves(n: int) -> np.ndarray:
    return np.arange(n) % 2  # even / odd sample index: the two halves of cross-fitting


def _crossfit_pick(losses: np.ndarray) -> np.ndarray:
    """(bins, n) index of the candidate each sample gets: per bin, the candidate with the lowest mean loss
    on the OTHER half of the samples (cross-fitted: a choice is never scored on the data that made it).
    `losses`: (C, bins, n)."""
    half = _halves(losses.shape[2])
    pick = np.empty(losses.shape[1:], dtype=np.int64)
    for h in (0, 1):
        other = half == 1 - h if (half == 1 - h).any() else np.ones_like(half, bool)
        pick[:, half == h] = losses[:, :, other].mean(2).argmin(0)[:, None]
    return pick


def _crossfit_min(candidates: np.ndarray) -> np.ndarray:
    """(1, bins, n) losses of the cross-fitted best candidate (C, bins, n) per bin."""
    pick = _crossfit_pick(candidates)
    return np.take_along_axis(candidates, pick[None], axis=0)


def _per_point_choice(forced: dict[str, np.ndarray], scope: Scope, keys: list[Key],
                      layers: list[int]) -> list[dict[Key, torch.Tensor]]:
    """Per bin, (layer, step) -> (n,) the cross-fitted best forced expert of that bin at that point alone
    (the other points on the gate's routing): a coordinate-wise choice, not a search over K^points.
    `forced[name]`: (K, bins, n) of one held-out set, for the single-point scopes."""
    picks = {key: _crossfit_pick(forced[single_point_scope(key, layers)]) for key in keys if scope.covers(key)}
    bins = next(iter(picks.values())).shape[0]
    return [{key: torch.as_tensor(p[b], dtype=torch.long) for key, p in picks.items()} for b in range(bins)]


def _measure_set(transformer, rsr, batches: Sequence[HeldOutBatch], draws: int, seed: int) -> dict[str, dict]:
    """Scope name -> condition -> losses (D, bins, n) on one held-out set (forced: (K, bins, n))."""
    K, layers = rsr.config.experts, rsr.layer_indices
    clean_runs = [_clean_pass(transformer, rsr, b) for b in batches]
    gate = np.stack([loss for loss, _ in clean_runs])[None]
    clean = [ids for _, ids in clean_runs]
    keys = sorted(clean[0])
    load = gate_load(clean, K)
    out: dict[str, dict] = {}
    forced_by_scope: dict[str, np.ndarray] = {}
    for si, scope in enumerate(scopes(layers, rsr.config.steps)):
        gen = torch.Generator().manual_seed(seed * 1009 + si)
        run = lambda make: _draws(transformer, rsr, batches, clean, scope, make, draws)
        c = {"gate": gate,
             "sampled": run(lambda: Sampled(gen)),
             "random_token": run(lambda: random_token(load, gen)),
             "random_image": run(lambda: random_image(load, gen))}
        if scope.replay:  # the schema-1 figure: later steps left to the gate
            free = Scope(scope.name, scope.points, False)
            c["random_token_free"] = _draws(transformer, rsr, batches, clean, free,
                                            lambda: random_token(load, gen), draws)
        c["forced"] = np.concatenate([_fixed(transformer, rsr, batches, clean, scope, lambda b, k=k: forced(k))
                                      for k in range(K)])
        c["none"] = _fixed(transformer, rsr, batches, clean, scope, lambda b: forced(-1))
        forced_by_scope[scope.name] = c["forced"]
        candidates = c["forced"]  # one expert at every point of the scope, per bin
        if scope.points is None or len(scope.points) > 1:  # and each point's own best expert, per bin
            choice = _per_point_choice(forced_by_scope, scope, keys, layers)
            candidates = np.concatenate([candidates, _fixed(transformer, rsr, batches, clean, scope,
                                                            lambda b: oracle(choice[b]))])
        c["oracle"] = _crossfit_min(candidates)
        out[scope.name] = c
    return out


RANDOM = ("random_image", "random_token")  # the nulls; the first is the headline value's


def _figures(c: dict[str, np.ndarray], res: Resampler) -> dict[str, Any]:
    """The figures of one scope, each with its interval. `c`: condition -> (S, D, bins, n)."""
    fig: dict[str, Any] = {}

    def put(name: str, figure: Callable, needs: tuple[str, ...]) -> None:
        if all(k in c for k in needs):
            fig[name], fig[name + "_ci95"] = estimate({k: c[k] for k in needs}, figure, res)

    put("value", lambda m: relative_gain(m["gate"], m["random_image"]), ("gate", "random_image"))
    put("value_token", lambda m: relative_gain(m["gate"], m["random_token"]), ("gate", "random_token"))
    put("value_no_replay", lambda m: relative_gain(m["gate"], m["random_token_free"]), ("gate", "random_token_free"))
    put("adapter_gain", lambda m: relative_gain(m["gate"], m["none"]), ("gate", "none"))
    put("routing_share", lambda m: routing_share(m["gate"], m["random_image"], m["none"]),
        ("gate", "random_image", "none"))
    put("routing_share_token", lambda m: routing_share(m["gate"], m["random_token"], m["none"]),
        ("gate", "random_token", "none"))
    put("oracle_gap", lambda m: relative_gain(m["oracle"], m["gate"]), ("gate", "oracle"))
    put("argmax_vs_sampled", lambda m: relative_gain(m["gate"], m["sampled"]), ("gate", "sampled"))
    return fig


def _scope_result(c: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, Any]:
    """Loss table and figures of one scope; `c`: condition -> (S, D, bins, n), forced (S, K, bins, n)."""
    S, _, bins, n = c["gate"].shape
    forced = c.pop("forced")
    res = Resampler.new(S, bins, n, n_boot, seed)
    fig = _figures(c, res)
    loss = {k: bin_means(v) for k, v in c.items()}
    forced_loss = forced.mean(axis=(0, 3))  # (K, bins)
    gate = loss["gate"]
    out = {
        "loss": {**loss, "forced": forced_loss,
                 "random_draw_std": {k: c[k].mean(axis=3).std(axis=1).mean(0) for k in RANDOM if k in c}},
        "overall": {**{k: float(v.mean()) for k, v in loss.items()}, "forced": forced_loss.mean(1)},
        **fig,
        "value_by_bin": 1.0 - gate / np.where(loss["random_image"] > 0, loss["random_image"], 1.0),
        "best_forced_by_bin": forced_loss.argmin(0),
        "gate_below_every_forced": bool(gate.mean() < forced_loss.mean(1).min()),
        "gate_below_every_forced_by_bin": gate < forced_loss.min(0),
    }
    out["overall"]["random"] = out["overall"]["random_image"]  # schema 1's key: the headline null
    return out


def routing_value(transformer, rsr, batches: Sequence[HeldOutBatch] | Sequence[Sequence[HeldOutBatch]],
                  random_draws: int = DEFAULT_DRAWS, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The loss table and figures of every scope (each recursion step alone, then "all"). `batches`: one
    held-out set (a batch per timestep bin) or several sets of the same bins (independent streams)."""
    if random_draws < 1:
        raise ValueError("random_draws must be >= 1")
    sets = [list(batches)] if not batches or isinstance(batches[0], HeldOutBatch) else [list(s) for s in batches]
    if not sets[0] or any(len(s) != len(sets[0]) for s in sets):
        raise ValueError("routing_value needs held-out sets with one batch per timestep bin, the same bins in each")
    start = time.perf_counter()
    was_training = transformer.training
    transformer.eval()
    try:
        per_set = [_measure_set(transformer, rsr, s, random_draws, seed * 7919 + j) for j, s in enumerate(sets)]
    finally:
        transformer.train(was_training)
    scope_names = list(per_set[0])
    out = {name: _scope_result({k: np.stack([m[name][k] for m in per_set]) for k in per_set[0][name]},
                               n_boot, seed + si) for si, name in enumerate(scope_names)}
    edges = bin_edges(len(sets[0]))
    K, L = rsr.config.experts, rsr.config.steps
    return {
        "schema": ROUTING_VALUE_SCHEMA, "schema_version": ROUTING_VALUE_VERSION,
        "experts": K, "steps": L, "layers": rsr.layer_indices,
        "timestep_bins": [{"bin": b, "t_max": float(edges[b] * 1000), "t_min": float(edges[b + 1] * 1000)}
                          for b in range(len(sets[0]))],
        "samples_per_bin": int(sets[0][0].xt.shape[0]), "held_out_sets": len(sets),
        "random_draws": random_draws, "bootstrap": n_boot, "bin_weighting": "equal",
        "elapsed_s": round(time.perf_counter() - start, 2),
        "scopes": out,
    }


def planted_for(ckpt: dict[str, Any], task, transformer, rsr, batches: Sequence[HeldOutBatch]) -> dict | None:
    """The warm start the checkpoint was trained with and the routing's agreement with its cells (None: none)."""
    from .planted import planted_agreement, planted_layout

    planted = planted_layout(ckpt, task, rsr)
    if planted is not None:
        planted.update(planted_agreement(transformer, rsr, task, planted["layout"], batches))
    return planted


def _ci(r: dict[str, Any], key: str) -> str:
    if r.get(key) is None:
        return "-"
    lo, hi = r.get(key + "_ci95") or [float("nan")] * 2
    return f"{r[key]:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Plain-text tables: per scope the overall losses (bins weighted equally), then the figures with
    their intervals and the best forced expert per bin."""
    K = result["experts"]
    conds = ["gate", "sampled", "random_image", "random_token", "random_token_free", "oracle"]
    head = f"{'scope':>6} " + " ".join(f"{c.replace('random_', 'rnd_').replace('_free', '_fr'):>10}" for c in conds) \
        + " " + " ".join(f"{'e' + str(k):>9}" for k in range(K)) + f" {'none':>9}"
    lines = ["losses (mean over bins, each bin weighted equally):", head]
    for name, r in result["scopes"].items():
        o = r["overall"]
        lines.append(f"{name:>6} " + " ".join(f"{o[c]:10.5f}" if c in o else f"{'-':>10}" for c in conds) + " "
                     + " ".join(f"{v:9.5f}" for v in o["forced"]) + f" {o['none']:9.5f}")
    figures = ("value", "value_token", "value_no_replay", "routing_share", "oracle_gap", "argmax_vs_sampled",
               "adapter_gain")
    lines.append("figures [95% interval over held-out sets, samples and draws]; best forced expert by bin:")
    for name, r in result["scopes"].items():
        lines.append(f"{name:>6} " + "  ".join(f"{f} {_ci(r, f)}" for f in figures if r.get(f) is not None)
                     + "  best " + " ".join(str(int(k)) for k in r["best_forced_by_bin"]))
    whole = result["scopes"].get("all")
    if whole is not None:
        lines.append(f"adapters, all steps: loss {whole['overall']['gate']:.5f} with the gate's routing, "
                     f"{whole['overall']['none']:.5f} without any (the frozen base): "
                     f"{100 * whole['adapter_gain']:+.2f}% gain")
    planted = result.get("planted")
    if planted:
        lines.append(f"planted: warm start '{planted['layout']}' for the first {planted['steps']} RSR steps; "
                     f"the gate's routing agrees with the planted cells on {100 * planted['agreement']:.1f}% of "
                     f"held-out tokens (chance {100 * planted['chance']:.1f}%)")
    if "elapsed_s" in result:
        lines.append(f"measured in {result['elapsed_s']:.1f} s ({result.get('held_out_sets', 1)} held-out set(s), "
                     f"{result['random_draws']} draws per random condition)")
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
    if value.get("schema_version") not in READABLE_VERSIONS:
        raise bad(f"schema_version {value.get('schema_version')!r}, this toolkit reads "
                  f"{', '.join(map(str, READABLE_VERSIONS))}")
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
    p.add_argument("--samples", type=int_at_least(2), default=32, help="held-out samples per timestep bin and set")
    p.add_argument("--bins", type=int_at_least(1), default=4, help="timestep bins (equal widths of sigma)")
    p.add_argument("--random-draws", type=int_at_least(1), default=DEFAULT_DRAWS,
                   help="draws of each random condition per scope")
    p.add_argument("--held-out-sets", type=int_at_least(1), default=2,
                   help="independent held-out sets (streams --seed, --seed + 1, ...): the interval spans them")
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
        print(f"measuring the flow-matching loss on {a.held_out_sets} set(s) x {a.samples} held-out sample(s) x "
              f"{a.bins} timestep bin(s)",
              file=sys.stderr)
        torch.manual_seed(0)
        sets = held_out_sets(task, a.samples, a.bins, a.held_out_sets, a.seed)
        result = routing_value(transformer, rsr, sets, a.random_draws)
        result["planted"] = planted_for(ckpt, task, transformer, rsr, sets[0])
        result["checkpoint"] = str(a.ckpt)
        result["checkpoint_sha256"] = sha256_file(a.ckpt)
        print("\n".join(summary_lines(result)))
        if a.json is not None:
            write_atomic(a.json, json.dumps(jsonable(result), indent=1))
            print(f"wrote {a.json}")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())

"""Calibration: the verdict on models whose truth is known, as a confusion table.

    python -m probes.calibrate [--cases all|cheap] [--draws 4] [--samples 12] [--sets 2] [--json OUT]

Every model is the tiny SD3 backbone (3 blocks, 16x16 latents) with RSR on block 1 (the `tiny` RSR
configuration: K=4 experts, L=3 recursion steps), built by hand so that the answer is known before
the instrument runs. Held-out batches are one per timestep bin (sigma uniform in the bin, 4 bins);
their targets are the output of a TEACHER routing of the same model, so "the right routing" is
defined exactly. The gate is then taught a RULE (cross-entropy on its logits, the experts fixed):
`band` (bin b -> expert b), `step` (recursion step s -> expert s) or `shifted` (bin b -> expert
(b + 2) mod K). The expected verdict of every recursion step is stated here, in advance; it should
hold BY CONSTRUCTION, not only in expectation over random experts (but see planted_wrong below):

    case               what it is                                          expected verdict (every step)
    band_experts       distinct experts; targets made with expert b in      specialized
                       band b at every step; the gate taught `band`
    identical_experts  every expert a copy of one; targets made with it;    chance
                       the gate taught `band` (sharp, structured)
    planted_random     distinct random experts; targets from the frozen     chance (text: planted)
                       base; the gate taught `step`: structure without
                       value, exactly (MI(expert; step) at its ceiling)
    planted_wrong      ONE recursion step (L = 1); two kinds of expert:     harmful
                       1 a copy of 0 (P), 3 of 2 (Q); targets made with
                       expert b in band b (P in bins 0-1, Q in 2-3); the
                       gate taught `shifted` (bins 0-1 -> Q, 2-3 -> P):
                       always the wrong kind, where random routing of the
                       same load (half P, half Q) is the gate's own kind
                       or the right one
    flat_gate          band_experts' experts and targets, the gate's         flat_gate
                       weights scaled to 1e-3 (near-uniform probabilities)
    random_trained     experts from a common start (expert 0's A in every   chance
                       expert, B zero), trained (Adam) under per-token
                       random routing on band_experts' targets, so they
                       differ only by the tokens each saw; the gate taught
                       `band`

Why `step` for planted_random, not `band`: the same-load nulls draw per (layer, step) from that
point's load (`routing_value.gate_load`). Under the step rule the load of step s is all expert s, so
every random routing IS the gate's routing, and the value is 0 exactly (interval [0, 0]) whatever
the experts. An arbitrary assignment of bands to DISTINCT random experts is not: random experts hurt
by different amounts at different noise levels, so L(band, expert) has an interaction and one
draw's assignment has a value of arbitrary sign (zero only in expectation over the experts). The
first calibration used the band rule here and measured exactly that (-9.0% [-18.1, -1.9] at step 1,
"harmful"; docs/specialization.md keeps that table as a finding). For the same reason random_trained
starts every expert from one point: with distinct random starts (the first calibration) the experts
kept part of their random differences and the band routing measured +0.3% [0.1, 0.5] ("small").

Why two kinds in planted_wrong, not band_experts' four distinct experts with bin b -> expert b + 1
(the first version of this case): with four distinct experts "wrong" is three different things, and
the same interaction makes the shifted assignment's wrong experts better or worse than the average
wrong one; measured (12 x 4 x 2, 4 draws): chance, harmful, chance, whole routing -5.5% [-24.4,
+11.2]. With two kinds, a same-load random routing at a point is either the gate's own (wrong) kind
or the right one, so for the whole routing (scope "all") it can only help: an image that draws the
right kind at every step has loss 0. Why one recursion step: what construction does NOT give is the
sign at ONE of several steps with the other steps replayed on the gate's (wrong) routing: being right
at step s alone, the others wrong, need not lower the loss. With L = 3 (the second version of this
case) it measured about 0 at steps 0 and 1 (chance, chance, harmful), and slightly POSITIVE with
smaller experts (B ~ N(0, 0.05) or N(0, 0.1): small, small, harmful): the instrument measured each
step's marginal value correctly; "harmful at every step" was not a truth of that model.
With L = 1 a step's routing is the whole routing, and "harmful" holds by construction against the
per-image null (docs/specialization.md keeps both earlier versions' tables).

"cheap" runs every case but random_trained (no training beyond the gate); the test suite runs a
cheaper subset (tests/test_calibrate.py); the whole table and its wall time are in
docs/specialization.md. A wrong verdict is a fault of a rule or of a case's construction, never of a
threshold: change the rule (probes/verdict.py) or the case and say which and why, never the
thresholds, to make a row pass.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cli_common.command import guard_startup

guard_startup(__name__)  # before torch: Ctrl-C while it loads exits 130 with one line

import numpy as np
import torch

from .routing_value import HeldOutBatch, bin_edges, routing_value
from .verdict import add_verdicts

N_BINS = 4
GATE_STEPS = 120  # optimiser steps of teaching the gate its rule
EXPECTED = {"band_experts": "specialized", "identical_experts": "chance", "planted_random": "chance",
            "planted_wrong": "harmful", "flat_gate": "flat_gate", "random_trained": "chance"}
CHEAP = ("band_experts", "identical_experts", "planted_random", "planted_wrong", "flat_gate")
Rule = Callable[[torch.Tensor, int], torch.Tensor]  # (sigma (B,), recursion step) -> (B,) expert


def random_inputs(n: int, gen: torch.Generator, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of the tiny backbone's inputs at noise levels `sigma` (random latents and text)."""
    return dict(hidden_states=torch.randn(n, 3, 16, 16, generator=gen),
                encoder_hidden_states=torch.randn(n, 8, 384, generator=gen),
                pooled_projections=torch.randn(n, 384, generator=gen), timestep=sigma * 1000)


def band(sigma: torch.Tensor) -> torch.Tensor:
    """Timestep bin of sigma, noisiest first (the bins of `probes.routing_value`)."""
    return torch.clamp((N_BINS * (1 - sigma)).long(), 0, N_BINS - 1)


RULES: dict[str, Rule] = {
    "band": lambda sigma, step: band(sigma),  # bin b -> expert b (the teacher of band_experts)
    "step": lambda sigma, step: torch.full_like(band(sigma), step),  # recursion step s -> expert s
    "shifted": lambda sigma, step: (band(sigma) + N_BINS // 2) % N_BINS,  # bin b -> expert b + 2 (planted_wrong)
}


def base_model(seed: int = 0, latent_steps: int | None = None):
    """The tiny backbone with RSR on block 1 and distinct random experts (B ~ N(0, 0.3)); `latent_steps`
    overrides the tiny configuration's L = 3 (planted_wrong uses 1)."""
    from rsr_model import install_rsr, rsr_config
    from rsr_model.backbones import tiny_sd3

    torch.manual_seed(seed)
    model = tiny_sd3(num_layers=3, sample_size=16, pos_embed_max_size=16).eval()
    steps = {} if latent_steps is None else {"latent_steps": latent_steps}
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[1], **steps))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in rsr.values():
            layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=g) * 0.3)
    return model, rsr


def teach_gate(model, rsr, rule: Rule, steps: int = GATE_STEPS) -> None:
    """Supervise every recursion step's gate logits with `rule` (cross-entropy per token); the experts stay."""
    params = [p for n, p in rsr.named_parameters() if ".gate." in n]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        sigma = torch.rand(16, generator=gen)
        terms = []

        def on_logits(lg: torch.Tensor, ctx) -> None:
            target = rule(sigma, ctx.step).repeat_interleave(lg.shape[1])
            terms.append(torch.nn.functional.cross_entropy(lg.flatten(0, 1), target))

        with rsr.hooks.hooks({"*.logits": on_logits}):
            model(**random_inputs(16, gen, sigma))
        opt.zero_grad()
        sum(terms).backward()
        opt.step()


def teach_gate_band_rule(model, rsr, steps: int = GATE_STEPS) -> None:
    """`teach_gate` with the band rule (bin b -> expert b)."""
    teach_gate(model, rsr, RULES["band"], steps)


def held_out(model, rsr, teacher: Callable[[int, int], int], n: int, seed: int) -> list[HeldOutBatch]:
    """One batch per bin; targets are the model's output with expert `teacher(bin, step)` for every token at
    each recursion step (-1: no adapter, the frozen base)."""
    gen = torch.Generator().manual_seed(seed)
    edges = bin_edges(N_BINS)
    out = []
    for b in range(N_BINS):
        sigma = edges[b + 1] + (edges[b] - edges[b + 1]) * torch.rand(n, generator=gen)
        inp = random_inputs(n, gen, sigma)
        route = lambda ids, ctx, b=b: torch.full_like(ids, teacher(b, ctx.step))
        with torch.no_grad(), rsr.hooks.hooks({"*.expert": route}):
            target = model(**inp).sample
        cond = {k: inp[k] for k in ("encoder_hidden_states", "pooled_projections")}
        out.append(HeldOutBatch(inp["hidden_states"], inp["timestep"], cond, target))
    return out


@torch.no_grad()
def trace_evidence(model, rsr, batches: list[HeldOutBatch]) -> dict[str, Any]:
    """A report-like skeleton measured on `batches`: per (layer, step) the gate's mean top-1 margin and the MI
    of the chosen expert with the timestep bin (`probes.stats.mi_summary`), as a trace report holds them;
    per layer the MI of the chosen expert with the recursion step (`mi_step`, nats, and its ceiling)."""
    from .stats import mi_summary, top1_margin

    K = rsr.config.experts
    tables: dict[tuple[int, int], np.ndarray] = {}
    margins: dict[tuple[int, int], list[float]] = {}

    def on_probs(p: torch.Tensor, ctx) -> None:
        margins.setdefault((ctx.layer, ctx.step), []).append(float(top1_margin(p.double().numpy()).mean()))

    for b, batch in enumerate(batches):
        def on_expert(ids: torch.Tensor, ctx, b=b) -> None:
            t = tables.setdefault((ctx.layer, ctx.step), np.zeros((K, len(batches)), np.int64))
            t[:, b] += np.bincount(ids.reshape(-1).numpy(), minlength=K)
        with rsr.hooks.hooks({"*.expert": on_expert, "*.probs": on_probs}):
            model(hidden_states=batch.xt, timestep=batch.t, **batch.cond)
    layers: dict[str, Any] = {}
    for (layer, step), table in sorted(tables.items()):
        mi = mi_summary(table, n_perm=199, seed=0)
        layers.setdefault(str(layer), {"steps": {}})["steps"][str(step)] = {
            "gate": {"mean_margin": float(np.mean(margins[(layer, step)]))},
            "mi": {"timestep_bin": {"ami": float(mi.ami), "p_value": float(mi.p_value)}}}
    for layer, entry in layers.items():  # expert x recursion step, summed over the bins
        by_step = np.stack([tables[(int(layer), int(s))].sum(1) for s in entry["steps"]], axis=1)  # (K, L)
        entry["mi_step"] = {"mi": float(mi_summary(by_step, n_perm=0).mi),
                            "ceiling": math.log(min(K, by_step.shape[1]))}
    return {"layers": layers}


def _copy_expert_zero(rsr, factors: str = "AB") -> None:
    """Copy expert 0's `factors` (A, B or both) into every expert."""
    with torch.no_grad():
        for layer in rsr.values():
            for name in factors:
                w = getattr(layer.experts, name)
                w.copy_(w[:1].expand_as(w))


def _pair_experts(rsr) -> None:
    """Two kinds of expert: expert 1 a copy of expert 0 (kind P), expert 3 a copy of expert 2 (kind Q)."""
    with torch.no_grad():
        for layer in rsr.values():
            for w in (layer.experts.A, layer.experts.B):
                w[1].copy_(w[0])
                w[3].copy_(w[2])


def _flatten_gate(rsr, scale: float = 1e-3) -> None:
    with torch.no_grad():
        for n, p in rsr.named_parameters():
            if ".gate." in n:
                p.mul_(scale)


def train_experts_under_random_routing(model, rsr, pool: list[list[HeldOutBatch]], epochs: int = 6) -> None:
    """From a common start (expert 0's A in every expert, every B zero), fit the experts to the teacher's
    targets in `pool` with every token routed to a random expert (uniform, per token): every expert sees
    all the data and starts where the others do, so they differ only by which random tokens each saw."""
    gen = torch.Generator().manual_seed(5)
    _copy_expert_zero(rsr, "A")
    with torch.no_grad():
        for layer in rsr.values():
            layer.experts.B.zero_()
    params = [p for n, p in rsr.named_parameters() if ".experts." in n]
    opt = torch.optim.Adam(params, lr=3e-3)
    K = rsr.config.experts
    rand = lambda ids, ctx: torch.randint(0, K, ids.shape, generator=gen)
    for _ in range(epochs):
        for batches in pool:
            for batch in batches:
                with rsr.hooks.hooks({"*.expert": rand}):
                    pred = model(hidden_states=batch.xt, timestep=batch.t, **batch.cond).sample
                loss = ((pred - batch.target) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()


def build_case(name: str, n: int, sets: int) -> tuple[Any, Any, list[list[HeldOutBatch]], str, dict | None]:
    """The model of case `name`, its held-out sets (seeds 100, 101, ...), the rule its gate was taught and
    what was planted (if anything). Targets are made first, by the teacher; then the case changes the model
    as its row says."""
    if name not in EXPECTED:
        raise ValueError(f"no calibration case {name!r}; cases are {', '.join(EXPECTED)}")
    # planted_wrong has one recursion step, where a step's routing IS the whole routing (module docstring)
    model, rsr = base_model(latent_steps=1 if name == "planted_wrong" else None)
    teacher, rule, planted = (lambda b, s: b), "band", None
    if name == "identical_experts":
        _copy_expert_zero(rsr)
        teacher = lambda b, s: 0
    elif name == "planted_random":  # the frozen base: no routing of these random experts is right
        teacher, rule, planted = (lambda b, s: -1), "step", {"layout": "step", "steps": GATE_STEPS}
    elif name == "planted_wrong":  # targets of kind P in bins 0-1, Q in 2-3; the gate sends 0-1 to Q, 2-3 to P
        _pair_experts(rsr)
        rule = "shifted"
    batch_sets = [held_out(model, rsr, teacher, n, 100 + j) for j in range(sets)]
    if name == "random_trained":
        pool = [held_out(model, rsr, teacher, 16, 500 + j) for j in range(8)]  # training data, other seeds
        train_experts_under_random_routing(model, rsr, pool)
    teach_gate(model, rsr, RULES[rule])
    if name == "flat_gate":
        _flatten_gate(rsr)
    return model, rsr, batch_sets, rule, planted


def run_case(name: str, n: int = 12, sets: int = 2, draws: int = 4, n_boot: int = 500) -> dict[str, Any]:
    """Build the case, measure its routing value and trace evidence, and give every step's verdict."""
    start = time.perf_counter()
    model, rsr, batch_sets, rule, planted = build_case(name, n, sets)
    value = routing_value(model, rsr, batch_sets, random_draws=draws, n_boot=n_boot)
    agreement, chance = rule_agreement(model, rsr, batch_sets[0], RULES[rule])
    if planted is not None:  # the verdict's text: agreement of the gate's routing with the planted rule
        value["planted"] = {**planted, "agreement": agreement, "chance": chance}
    report = trace_evidence(model, rsr, batch_sets[0])
    add_verdicts(report, value)
    steps = report["layers"]["1"]["steps"]
    whole = value["scopes"]["all"]
    return {"case": name, "expected": EXPECTED[name], "verdicts": {s: d["verdict"]["label"] for s, d in steps.items()},
            "texts": {s: d["verdict"]["text"] for s, d in steps.items()},
            "figures": {k: whole.get(k) for k in ("value", "value_ci95", "value_token", "value_token_ci95",
                                                   "adapter_gain", "adapter_gain_ci95", "routing_share",
                                                   "oracle_gap", "argmax_vs_sampled")},
            "by_step": {s: {k: value["scopes"][s].get(k) for k in ("value", "value_ci95", "value_token",
                                                                  "value_token_ci95")} for s in steps},
            "margin": {s: d["gate"]["mean_margin"] for s, d in steps.items()},
            "rule": {"name": rule, "agreement": agreement, "chance": chance},
            "mi_step": report["layers"]["1"]["mi_step"],
            "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def rule_agreement(model, rsr, batches: list[HeldOutBatch], rule: Rule) -> tuple[float, float]:
    """Share of tokens the gate sends to the expert `rule` gives them, and the chance share: per (layer, step),
    sum_k P(gate = k) P(rule = k), the agreement of two independent routings with those loads, weighted by
    tokens (the chance of `probes.planted.planted_agreement`). Under the step rule every point's two loads
    are the same single expert, so its chance is 1: within a step, the rule is a constant."""
    K = rsr.config.experts
    hit, total = 0, 0
    loads: dict[tuple[int, int], np.ndarray] = {}
    for batch in batches:
        def on_expert(ids: torch.Tensor, ctx) -> None:
            nonlocal hit, total
            want = rule(ctx.timestep / 1000, ctx.step)[:, None].expand_as(ids)
            hit += int((ids == want).sum())
            total += ids.numel()
            count = np.stack([np.bincount(x.reshape(-1).numpy(), minlength=K) for x in (ids, want)])
            loads[(ctx.layer, ctx.step)] = loads.get((ctx.layer, ctx.step), 0) + count
        with rsr.hooks.hooks({"*.expert": on_expert}):
            model(hidden_states=batch.xt, timestep=batch.t, **batch.cond)
    chance = sum(float((c[0] / c[0].sum()) @ (c[1] / c[1].sum())) * c[0].sum() for c in loads.values())
    return hit / max(total, 1), chance / max(total, 1)


def confusion(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per case (expected, the verdict of every step, whether all match), then the
    confusion counts of expected vs given labels over all (case, step) cells."""
    lines = ["| case | expected | verdict per recursion step | value [95% CI] (all steps) | per token | adapter gain "
             "| routing share | oracle gap | MI(expert; step) | match | s |", "|---" * 11 + "|"]
    for r in rows:
        f = r["figures"]
        ci, tci = f["value_ci95"], f["value_token_ci95"]
        lines.append(f"| {r['case']} | {r['expected']} | {', '.join(r['verdicts'].values())} | "
                     f"{f['value']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] | "
                     f"{f['value_token']:+.3f} [{tci[0]:+.3f}, {tci[1]:+.3f}] | {100 * f['adapter_gain']:+.1f}% | "
                     f"{f['routing_share']:.2f} | {f['oracle_gap']:+.3f} | "
                     f"{r['mi_step']['mi']:.3f} / {r['mi_step']['ceiling']:.3f} | "
                     f"{'yes' if all(v == r['expected'] for v in r['verdicts'].values()) else 'NO'} | {r['seconds']} |")
    given = sorted({v for r in rows for v in r["verdicts"].values()} | {r["expected"] for r in rows})
    expected = sorted({r["expected"] for r in rows})
    lines += ["", "| expected \\ given | " + " | ".join(given) + " |", "|---|" + "---|" * len(given)]
    for e in expected:
        counts = [sum(v == g for r in rows if r["expected"] == e for v in r["verdicts"].values()) for g in given]
        lines.append(f"| {e} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cli_common.command import Parser, int_at_least, run_main
    from cli_common.errors import UsageError
    from cli_common.outputs import check_output, write_atomic

    p = Parser(prog="python -m probes.calibrate", description=__doc__.splitlines()[0], version=True)
    p.add_argument("--cases", default="all", help="all, cheap, or a comma-separated list of cases")
    p.add_argument("--samples", type=int_at_least(2), default=12, help="held-out samples per bin and set")
    p.add_argument("--sets", type=int_at_least(1), default=2, help="held-out sets")
    p.add_argument("--draws", type=int_at_least(1), default=4, help="draws of each random condition")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--overwrite", action="store_true")

    def body() -> None:
        from .analysis import jsonable

        a = p.parse_args(argv)
        names = list(EXPECTED) if a.cases == "all" else list(CHEAP) if a.cases == "cheap" else a.cases.split(",")
        unknown = [n for n in names if n not in EXPECTED]
        if unknown:
            raise UsageError(f"--cases: no case {', '.join(map(repr, unknown))}; cases are all, cheap, or of "
                             f"{', '.join(EXPECTED)}")
        check_output(a.json, a.overwrite, flag="--json")
        start = time.perf_counter()
        rows = []
        for name in names:
            rows.append(run_case(name, a.samples, a.sets, a.draws))
            print(f"{name}: expected {rows[-1]['expected']}, given {list(rows[-1]['verdicts'].values())} "
                  f"({rows[-1]['seconds']} s)", file=sys.stderr)
        print(confusion(rows))
        print(f"\nwall time {time.perf_counter() - start:.0f} s ({a.samples} samples x {N_BINS} bins x {a.sets} "
              f"set(s), {a.draws} draws)")
        if a.json is not None:
            write_atomic(a.json, json.dumps(jsonable(rows), indent=1))

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())

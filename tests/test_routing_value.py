"""Routing value: known answers on planted models (useful-by-band experts; identical experts)."""

import numpy as np
import pytest
import torch

from probes.calibrate import band, random_inputs, teach_gate_band_rule
from probes.routing_value import HeldOutBatch, bin_edges, routing_value, summary_lines
from probes.stats import mi_summary
from probes.verdict import step_verdict
from rsr_model import install_rsr, rsr_config
from rsr_model.backbones import tiny_sd3

from .conftest import randomize_rsr

N_BINS = 4


def _model():
    torch.manual_seed(0)
    model = tiny_sd3(num_layers=3, sample_size=16, pos_embed_max_size=16).eval()
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[1]))
    randomize_rsr(rsr, scale=0.3)
    return model, rsr


def _batches(model, rsr, teacher):
    """One batch per band; targets are the model's output under `teacher(band)` routing."""
    gen = torch.Generator().manual_seed(2)
    edges = bin_edges(N_BINS)
    out = []
    for b in range(N_BINS):
        sigma = edges[b + 1] + (edges[b] - edges[b + 1]) * torch.rand(12, generator=gen)
        inp = random_inputs(12, gen, sigma)
        with torch.no_grad(), rsr.hooks.hooks({"*.expert": lambda ids, ctx: torch.full_like(ids, teacher(b))}):
            target = model(**inp).sample
        cond = {k: inp[k] for k in ("encoder_hidden_states", "pooled_projections")}
        out.append(HeldOutBatch(inp["hidden_states"], inp["timestep"], cond, target))
    return out


def _step_evidence(model, rsr, batches, step="*"):
    """A report-like step entry measured on `batches`: gate margin and MI of expert with the band."""
    K = rsr.config.experts
    table, margins = np.zeros((K, len(batches)), np.int64), []

    def on_probs(p, ctx):
        top = p.topk(2, dim=-1).values
        margins.append(float((top[..., 0] - top[..., 1]).mean()))

    for b, batch in enumerate(batches):
        def on_expert(ids, ctx, b=b):
            table[:, b] += np.bincount(ids.reshape(-1).numpy(), minlength=K)
        with torch.no_grad(), rsr.hooks.hooks({f"*.step.{step}.expert": on_expert, f"*.step.{step}.probs": on_probs}):
            model(hidden_states=batch.xt, timestep=batch.t, **batch.cond)
    mi = mi_summary(table, n_perm=199, seed=0)
    return {"gate": {"mean_margin": float(np.mean(margins))},
            "mi": {"timestep_bin": {"ami": float(mi.ami), "p_value": float(mi.p_value)}}}


def test_band_specialized_experts_are_found_and_the_gate_beats_random():
    model, rsr = _model()
    teach_gate_band_rule(model, rsr)
    result = routing_value(model, rsr, _batches(model, rsr, teacher=lambda b: b), random_draws=2, n_boot=200)
    assert set(result["scopes"]) == {"0", "1", "2", "all"}
    every_step = result["scopes"]["all"]  # the teacher's routing is band b -> expert b at every step
    assert list(every_step["best_forced_by_bin"]) == [0, 1, 2, 3]
    assert every_step["gate_below_every_forced"]
    assert every_step["value"] > 0.5 and every_step["value_ci95"][0] > 0.3, every_step["value_ci95"]
    for name, r in result["scopes"].items():
        assert r["overall"]["gate"] < r["overall"]["none"], name
    assert "all" in "\n".join(summary_lines(result))
    verdict = step_verdict(_step_evidence(model, rsr, _batches(model, rsr, lambda b: b)), every_step, every_step)
    assert verdict["label"] == "specialized", verdict["text"]


def test_identical_experts_give_no_routing_value():
    model, rsr = _model()
    with torch.no_grad():
        for layer in rsr.values():  # every expert a copy of expert 0
            layer.experts.A.copy_(layer.experts.A[:1].expand_as(layer.experts.A))
            layer.experts.B.copy_(layer.experts.B[:1].expand_as(layer.experts.B))
    # targets from the base model (no adapter): every routing has the same, non-zero loss
    result = routing_value(model, rsr, _batches(model, rsr, teacher=lambda b: -1), random_draws=2, n_boot=200)
    for name, r in result["scopes"].items():
        assert abs(r["value"]) < 1e-4, (name, r["value"])
        forced = np.asarray(r["overall"]["forced"])
        assert np.allclose(forced, forced[0], rtol=1e-4), name
    every_step = result["scopes"]["all"]  # the adapter matters, not which copy of it
    assert every_step["overall"]["gate"] > 1e-6 and every_step["overall"]["none"] < 1e-10
    # the untrained gate is flat, and its (position-following) argmax must not read as specialization
    verdict = step_verdict(_step_evidence(model, rsr, _batches(model, rsr, lambda b: -1)), every_step)
    assert verdict["label"] in ("flat_gate", "chance"), verdict["text"]
    sharp = {"gate": {"mean_margin": 0.9}, "mi": {"timestep_bin": {"ami": 0.4, "p_value": 0.005}}}
    assert step_verdict(sharp, every_step)["label"] == "chance"  # structure that does not lower the loss


def test_random_draws_must_be_positive():
    model, rsr = _model()
    with pytest.raises(ValueError):
        routing_value(model, rsr, [], random_draws=0)


def test_held_out_batches_are_flow_matching_pairs_in_their_bins():
    from probes.routing_value import held_out_batches
    from rsr_model.tasks import get_task

    task = get_task("tiny")
    batches = held_out_batches(task, 6, N_BINS)
    edges = bin_edges(N_BINS)
    for b, batch in enumerate(batches):
        sigma = batch.t / 1000
        assert ((sigma >= edges[b + 1] - 1e-6) & (sigma <= edges[b] + 1e-6)).all()
        x0 = batch.xt - sigma.view(-1, 1, 1, 1) * batch.target  # x_t = x0 + sigma (noise - x0)
        assert x0.min() >= -1.0001 and x0.max() <= 1.0001  # clean images in model space
    again = held_out_batches(task, 6, N_BINS)  # the same stream every time
    assert all(torch.equal(a.xt, c.xt) for a, c in zip(batches, again))


# --- schema 2: the conditions of issue 19, each against a known answer ------------------------------

def _sharp_logits(big=30.0):
    """A logits hook that makes the gate certain of the band's expert (probabilities one-hot to float precision)."""
    def fn(logits, ctx):
        out = torch.zeros_like(logits)
        out[torch.arange(logits.shape[0]), :, band(ctx.timestep / 1000)] = big
        return out
    return fn


def test_identical_experts_give_zero_share_gap_and_sampling_difference():
    model, rsr = _model()
    with torch.no_grad():
        for layer in rsr.values():
            layer.experts.A.copy_(layer.experts.A[:1].expand_as(layer.experts.A))
            layer.experts.B.copy_(layer.experts.B[:1].expand_as(layer.experts.B))
    result = routing_value(model, rsr, _batches(model, rsr, teacher=lambda b: -1), random_draws=2, n_boot=100)
    for name, r in result["scopes"].items():
        for figure in ("value", "value_token", "routing_share", "oracle_gap", "argmax_vs_sampled"):
            assert abs(r[figure]) < 1e-4, (name, figure, r[figure])
            assert abs(r[figure + "_ci95"][0]) < 1e-4 and abs(r[figure + "_ci95"][1]) < 1e-4, (name, figure)
    whole = result["scopes"]["all"]
    assert whole["overall"]["none"] < 1e-10 < whole["overall"]["gate"]  # the base is exact: any adapter raises it


def test_oracle_recovers_the_band_experts_the_gate_ignores():
    """Targets made with expert b in band b at every step; the gate is untrained. The best forced expert per
    bin and step is b, so the oracle routing is the teacher's and its loss is exactly 0 (oracle gap 1)."""
    model, rsr = _model()
    result = routing_value(model, rsr, _batches(model, rsr, teacher=lambda b: b), random_draws=1, n_boot=100)
    whole = result["scopes"]["all"]
    assert whole["overall"]["oracle"] < 1e-10
    assert whole["oracle_gap"] > 0.999 and whole["oracle_gap_ci95"][0] > 0.999
    assert list(whole["best_forced_by_bin"]) == [0, 1, 2, 3]


def test_sampling_from_a_certain_gate_is_its_argmax():
    model, rsr = _model()
    with rsr.hooks.hooks({"*.logits": _sharp_logits()}):
        result = routing_value(model, rsr, _batches(model, rsr, teacher=lambda b: b), random_draws=2, n_boot=100)
    for name, r in result["scopes"].items():
        assert r["overall"]["sampled"] == pytest.approx(r["overall"]["gate"], abs=1e-12), name
        assert abs(r["argmax_vs_sampled"]) < 1e-9, name
    assert result["scopes"]["all"]["overall"]["gate"] < 1e-10  # the certain gate is the teacher


def test_sampled_condition_draws_from_the_gate_probabilities():
    from probes.routing_conditions import Sampled

    ctx = type("Ctx", (), {"layer": 1, "step": 0})()
    s = Sampled(torch.Generator().manual_seed(0))
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0]).expand(4, 5000, 4)
    s.keep(probs, ctx)
    ids = s(torch.zeros(4, 5000, dtype=torch.long), ctx)
    share = torch.bincount(ids.reshape(-1), minlength=4).double() / ids.numel()
    assert torch.allclose(share, torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.double), atol=0.01)


def test_per_image_random_routes_a_whole_image_to_one_expert_with_the_gate_load():
    from probes.routing_conditions import random_image

    ctx = type("Ctx", (), {"layer": 1, "step": 2})()
    load = {(1, 2): torch.tensor([0.5, 0.25, 0.25, 0.0])}
    fn = random_image(load, torch.Generator().manual_seed(0))
    ids = torch.cat([fn(torch.zeros(100, 7, dtype=torch.long), ctx) for _ in range(40)])
    assert (ids == ids[:, :1]).all()  # one expert per image
    share = torch.bincount(ids[:, 0], minlength=4).double() / ids.shape[0]
    assert torch.allclose(share, torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.double), atol=0.03)


def test_per_image_random_loss_is_the_load_weighted_forced_loss_at_one_step():
    """With the other steps replayed, routing step s per image to expert k costs that image exactly its
    forced-k loss; so the expected per-image random loss is sum_k load_k * forced_k (per sample)."""
    from probes.routing_conditions import Scope, forced, random_image, random_token
    from probes.routing_value import _clean_pass, _draws, _fixed, gate_load

    model, rsr = _model()
    batches = _batches(model, rsr, teacher=lambda b: b)
    clean = [_clean_pass(model, rsr, b)[1] for b in batches]
    load = gate_load(clean, rsr.config.experts)
    scope, gen = Scope("1", frozenset({(1, 1)}), True), torch.Generator().manual_seed(0)
    per_image = _draws(model, rsr, batches, clean, scope, lambda: random_image(load, gen), 32).mean(0)  # (bins, n)
    per_token = _draws(model, rsr, batches, clean, scope, lambda: random_token(load, gen), 2).mean(0)
    each = np.concatenate([_fixed(model, rsr, batches, clean, scope, lambda b, k=k: forced(k)) for k in range(4)])
    expected = np.tensordot(load[(1, 1)].numpy(), each, axes=1)  # (bins, n)
    assert np.allclose(per_image.mean(1), expected.mean(1), rtol=0.1), (per_image.mean(1), expected.mean(1))
    assert np.corrcoef(per_image.ravel(), expected.ravel())[0, 1] > 0.9
    assert not np.allclose(per_token, per_image, rtol=1e-3)  # mixing experts inside an image is another routing


def test_replay_keeps_later_steps_on_the_clean_routing():
    """Perturbing step 0 with replay leaves steps 1 and 2 on the ids of the unperturbed pass; without replay the
    later gates read the perturbed h and route differently."""
    from probes.routing_conditions import Scope, forced, router
    from probes.routing_value import _clean_pass

    model, rsr = _model()
    batch = _batches(model, rsr, teacher=lambda b: b)[0]
    _, clean = _clean_pass(model, rsr, batch)
    changed = {}
    for replay in (True, False):
        scope = Scope("0", frozenset({(1, 0)}), replay)
        seen = {}
        hook = router(scope, forced(3), clean)

        def watch(ids, ctx, hook=hook, seen=seen):
            out = hook(ids, ctx)
            seen[(ctx.layer, ctx.step)] = (ids if out is None else out).clone()
            return out

        with torch.no_grad(), rsr.hooks.hooks({"*.expert": watch}):
            model(hidden_states=batch.xt, timestep=batch.t, **batch.cond)
        assert (seen[(1, 0)] == 3).all()
        changed[replay] = any(not torch.equal(seen[(1, s)], clean[(1, s)]) for s in (1, 2))
    assert changed == {True: False, False: True}


def test_interval_includes_the_draws_and_bins_count_equally():
    from probes.routing_interval import Resampler, estimate, relative_gain

    gate = np.ones((1, 1, 2, 8))
    gate[:, :, 0] = 100.0  # a high-noise bin: large, mostly irreducible loss
    random = gate.repeat(6, axis=1) * 1.1
    random[:, :, 1] *= np.array([0.8, 1.2, 0.9, 1.1, 1.0, 1.0])[:, None]  # draws differ, samples within a draw agree
    res = Resampler.new(1, 2, 8, 500, seed=0)
    value, ci = estimate({"g": gate, "r": random}, lambda m: relative_gain(m["g"], m["r"]), res)
    assert value == pytest.approx(1 - 1 / 1.1)  # both bins 1.1x: a ratio of sums would say the same here
    assert ci[1] - ci[0] > 0.02  # the draws' spread is in the interval (averaging them first gives width 0)
    lopsided = {"g": np.array([100.0, 1.0]), "r": np.array([110.0, 1.0])}
    assert relative_gain(lopsided["g"], lopsided["r"]) == pytest.approx(0.5 * (1 - 100 / 110))  # not 1 - 101/111


def test_several_held_out_sets_enter_the_interval():
    model, rsr = _model()
    sets = [_batches(model, rsr, teacher=lambda b: b), _batches(model, rsr, teacher=lambda b: (b + 1) % 4)]
    result = routing_value(model, rsr, sets, random_draws=1, n_boot=200)
    assert result["held_out_sets"] == 2 and result["schema_version"] == 2
    with pytest.raises(ValueError):
        routing_value(model, rsr, [sets[0], sets[1][:2]], random_draws=1)

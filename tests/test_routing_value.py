"""Routing value: known answers on planted models (useful-by-band experts; identical experts)."""

import numpy as np
import pytest
import torch

from probes.routing_value import HeldOutBatch, bin_edges, routing_value, summary_lines
from probes.stats import mi_summary
from probes.verdict import step_verdict
from rsr_model import install_rsr, rsr_config
from rsr_model.backbones import tiny_sd3

from .conftest import randomize_rsr

N_BINS = 4


def _inputs(n, gen, sigma):
    return dict(hidden_states=torch.randn(n, 3, 16, 16, generator=gen),
                encoder_hidden_states=torch.randn(n, 8, 384, generator=gen),
                pooled_projections=torch.randn(n, 384, generator=gen), timestep=sigma * 1000)


def _band(sigma):
    """Bin of sigma, noisiest first (bin 0 = sigma in [0.75, 1])."""
    return torch.clamp((N_BINS * (1 - sigma)).long(), 0, N_BINS - 1)


def _model():
    torch.manual_seed(0)
    model = tiny_sd3(num_layers=3, sample_size=16, pos_embed_max_size=16).eval()
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[1]))
    randomize_rsr(rsr, scale=0.3)
    return model, rsr


def _train_gate_to_route_by_band(model, rsr, steps=120):
    """Supervise every recursion step's gate logits with the timestep band (cross-entropy)."""
    params = [p for n, p in rsr.named_parameters() if ".gate." in n]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        sigma = torch.rand(16, generator=gen)
        band = _band(sigma)
        logits = []
        with rsr.hooks.hooks({"*.logits": lambda v, ctx: logits.append(v)}):
            model(**_inputs(16, gen, sigma))
        loss = sum(torch.nn.functional.cross_entropy(l.flatten(0, 1), band.repeat_interleave(l.shape[1]))
                   for l in logits)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _batches(model, rsr, teacher):
    """One batch per band; targets are the model's output under `teacher(band)` routing."""
    gen = torch.Generator().manual_seed(2)
    edges = bin_edges(N_BINS)
    out = []
    for b in range(N_BINS):
        sigma = edges[b + 1] + (edges[b] - edges[b + 1]) * torch.rand(12, generator=gen)
        inp = _inputs(12, gen, sigma)
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
    _train_gate_to_route_by_band(model, rsr)
    result = routing_value(model, rsr, _batches(model, rsr, teacher=lambda b: b), random_draws=2, n_boot=200)
    assert set(result["scopes"]) == {"0", "1", "2", "all"}
    every_step = result["scopes"]["all"]  # the teacher's routing is band b -> expert b at every step
    assert list(every_step["best_forced_by_bin"]) == [0, 1, 2, 3]
    assert every_step["gate_below_every_forced"]
    assert every_step["value"] > 0.5 and every_step["value_ci95"][0] > 0.3, every_step["value_ci95"]
    for name, r in result["scopes"].items():
        assert r["overall"]["gate"] < r["overall"]["none"], name
    assert "all" in "\n".join(summary_lines(result))
    verdict = step_verdict(_step_evidence(model, rsr, _batches(model, rsr, lambda b: b)), every_step)
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

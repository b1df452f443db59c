"""Expert warm start: equal-mass noise bands, forced cells through the expert hook, a gate that learns them."""

import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from rsr_model.checkpoint import load_checkpoint
from rsr_model.config import tiny
from rsr_model.hooks import hook_name
from rsr_model.install import install_rsr
from rsr_model.tasks import get_task
from rsr_model.warm_start import WarmStart, noise_quantile

from .conftest import one_error_line, train


@pytest.mark.parametrize("weighting, shift", [("logit_normal", 1.0), ("logit_normal", 3.0), ("uniform", 1.0)])
def test_bands_split_the_training_noise_levels_evenly(weighting, shift):
    scheme = "logit_normal" if weighting == "logit_normal" else "none"
    sigma = compute_density_for_timestep_sampling(scheme, 40_000, logit_mean=0.0, logit_std=1.0,
                                                  generator=torch.Generator().manual_seed(0))
    sigma = shift * sigma / (1 + (shift - 1) * sigma)  # as flow.training_pair does
    q = noise_quantile(sigma * 1000, weighting, shift)
    shares = np.bincount((q * 4).long().clamp(max=3).numpy(), minlength=4) / len(q)
    assert np.abs(shares - 0.25).max() < 0.01


def _model(experts: int):
    task = get_task("tiny")
    torch.manual_seed(0)
    transformer = task.build_backbone().train()
    transformer.requires_grad_(False)
    rsr = install_rsr(transformer, tiny(num_experts=experts))
    x0, cond = task.batch(np.random.default_rng(0), 8)
    t = torch.linspace(20, 980, 8)
    return task, transformer, rsr, (x0, t, cond)


def test_warm_start_forces_cells_and_the_gate_learns_them():
    task, transformer, rsr, (x0, t, cond) = _model(experts=6)
    warm = WarmStart(rsr, "step-band", task.weighting, task.shift)
    opt = torch.optim.Adam([p for layer in rsr.values() for p in layer.gate.parameters()], lr=1e-2)
    losses = []
    for i in range(40):
        with warm.forcing(), rsr.hooks.cache(hook_name("*", "expert", "*")) as seen:
            transformer(hidden_states=x0, timestep=t, **cond)
        if i == 0:  # the routing the experts ran with is the cell of (recursion step, noise band)
            for name, calls in seen.items():
                ctx, ids = calls[0]
                assert torch.equal(ids, warm.cell(t, ctx.step)[:, None].expand_as(ids))
        loss = warm.gate_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    # freed: the gate alone now routes tokens to their cells
    transformer.eval()
    with rsr.hooks.cache(hook_name("*", "expert", "*")) as seen:
        transformer(hidden_states=x0, timestep=t, **cond)
    agree = [(ids == warm.cell(t, ctx.step)[:, None]).float().mean().item()
             for calls in seen.values() for ctx, ids in calls]
    assert min(agree) > 0.9  # chance is 1/6


def test_training_with_a_warm_start_and_its_errors(tmp_path, capsys):
    out = tmp_path / "w.pt"
    assert train(out, "--save-every", 1, "--experts", 6, "--warm-start", "step-band", "--warm-start-steps", 2) == 0
    ck = load_checkpoint(out)
    assert ck["args"]["warm_start"] == "step-band"
    # forced routing sends all of a sample's tokens to its cell, so with 4 samples every expert's
    # share is a multiple of 1/4 per step (of 1/12 over 3 steps); the gate's own Gumbel draws
    # per token would not be
    loads = np.array([e["load"] for e in ck["losses"] if e["stage"] == "rsr"])  # (steps, K)
    assert np.allclose(loads * 12, np.round(loads * 12), atol=0.02)
    capsys.readouterr()
    assert train(tmp_path / "x.pt", "--save-every", 1, "--experts", 4, "--warm-start", "step-band", steps=1) == 2
    assert "divisible" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.pt").exists()

"""The learned routing recipe (rsr_model/recipe.py), expert-choice routing, and the tiny-shift task."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from rsr_model import install_rsr, rsr_config
from rsr_model.config import ConfigError
from rsr_model.data import shapes, styles
from rsr_model.gate import expert_choice, sample_choice
from rsr_model.recipe import Recipe, upcycle

from .conftest import one_error_line, randomize_rsr, run, train


def test_phases_run_in_order_and_the_anneal_ends_at_the_argmax():
    r = Recipe(upcycle_steps=3, soft_steps=2, anneal=True)
    names = [r.phase(s, 10).name for s in range(10)]
    assert names == ["upcycle"] * 3 + ["soft"] * 2 + ["hard"] * 5
    temps = [r.phase(s, 10).temperature for s in range(5, 10)]
    assert temps[0] == 1.0 and temps[-1] == 0.0 and all(a > b for a, b in zip(temps, temps[1:]))
    assert [r.upcycles_at(s) for s in range(10)] == [s == 3 for s in range(10)]
    assert {Recipe(train_routing="random").phase(s, 10).routing for s in range(10)} == {"random"}
    assert Recipe().phase(0, 10) == Recipe().phase(9, 10)  # no recipe: the paper's draw throughout


@pytest.mark.parametrize("recipe, has_gate, fragment", [
    (Recipe(upcycle_steps=5, soft_steps=5), True, "leave no hard-routing step"),
    (Recipe(soft_steps=2), False, "no gate"),
    (Recipe(upcycle_steps=2, train_routing="random"), True, "takes no upcycling"),
    (Recipe(train_routing="mixed"), True, "train routing must be"),
])
def test_recipes_that_cannot_run_are_refused(recipe, has_gate, fragment):
    with pytest.raises(ConfigError, match=fragment):
        recipe.check(10, has_gate)


def test_temperature_zero_draws_the_argmax_and_one_draws_from_the_gate():
    torch.manual_seed(0)
    logits = torch.randn(4, 50, 5)
    expert, onehot = sample_choice(logits, tau=1.0, training=True, temperature=0.0)
    assert torch.equal(expert, logits.argmax(-1))
    assert torch.allclose(onehot.detach(), torch.nn.functional.one_hot(expert, 5).float())
    # temperature 1 is a categorical draw: over many draws each expert's frequency matches softmax(logits)
    logits = torch.tensor([[[2.0, 0.0, -1.0]]]).expand(1, 20000, 3)
    freq = torch.bincount(sample_choice(logits, 1.0, True, 0.5)[0].flatten(), minlength=3) / 20000
    sharper = (logits[0, 0] / 0.5).softmax(-1)
    assert torch.allclose(freq, sharper, atol=0.02)  # temperature T draws from softmax(logits / T)


def test_expert_choice_lets_experts_compete_and_is_the_same_at_training_and_sampling():
    torch.manual_seed(0)
    logits = torch.randn(2, 64, 4) + torch.tensor([10.0, 0.0, 0.0, 0.0])  # expert 0 scores highest everywhere
    token = logits.argmax(-1)
    chosen, onehot = expert_choice(logits, 0.1, training=True)
    assert (token == 0).all()  # token choice sends every token to expert 0 ...
    assert len(torch.unique(chosen)) == 4  # ... experts competing for tokens share them
    assert torch.equal(chosen, expert_choice(logits, 0.1, training=False)[0])
    logits.requires_grad_(True)
    _, onehot = expert_choice(logits, 0.1, training=True)
    (onehot * torch.randn_like(onehot)).sum().backward()
    assert logits.grad.abs().sum() > 0  # straight-through: the gate learns from the choice


def _layer_model(sd3):
    model, inputs = sd3
    rsr = install_rsr(model, rsr_config("tiny", num_experts=3, latent_steps=2, target_layers=[1]))
    randomize_rsr(rsr, scale=0.2)
    return model, inputs, rsr


def test_the_soft_phase_mixes_every_expert_by_the_gate_probabilities(sd3):
    """The soft mixture equals the probability-weighted sum of each expert's own output (one step, so
    the sum is exact: the mixture is linear in the adapters' outputs at a step)."""
    model, inputs = sd3
    rsr = install_rsr(model, rsr_config("tiny", num_experts=3, latent_steps=1, mode="no_recursion", target_layers=[1]))
    randomize_rsr(rsr, scale=0.2)
    layer = rsr.layer(1)
    h = torch.randn(2, 7, layer.experts.in_dim)
    w = torch.rand(2, 7, 3).softmax(-1)
    mixed = layer.experts.mixture(h, w)
    for part in range(3):
        expect = sum(w[..., k, None] * layer.experts(h, torch.full((2, 7), k))[part] for k in range(3))
        assert torch.allclose(mixed[part], expect, atol=1e-5)
    rsr.state.routing = "soft"
    model.train()
    out = run(model, inputs)
    out.sum().backward()
    gate_grad = sum(p.grad.abs().sum() for p in layer.gate.parameters())
    assert gate_grad > 0  # the gate learns from the loss itself in the soft phase


@pytest.mark.parametrize("routing, check", [
    ("first", lambda ids, K: bool((ids == 0).all())),
    ("random", lambda ids, K: len(torch.unique(ids)) == K),
])
def test_upcycling_and_the_random_control_route_as_stated(sd3, routing, check):
    model, inputs, rsr = _layer_model(sd3)
    seen = []
    rsr.state.routing = routing
    model.train()
    with rsr.hooks.hooks({"*.expert": lambda ids, ctx: seen.append(ids.clone())}):
        run(model, inputs)
    assert seen and all(check(ids, 3) for ids in seen)
    model.eval()  # sampling ignores the training recipe: the gate's argmax, as with no recipe set
    seen.clear()
    with rsr.hooks.hooks({"*.expert": lambda ids, ctx: seen.append(ids.clone())}):
        run(model, inputs)
    rsr.state.routing = None
    plain = []
    with rsr.hooks.hooks({"*.expert": lambda ids, ctx: plain.append(ids.clone())}):
        run(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(seen, plain)) and len(seen) == len(plain)


def test_upcycle_copies_expert_zero_and_its_moments_with_noise(sd3):
    model, inputs, rsr = _layer_model(sd3)
    params = list(rsr.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    run(model, inputs).sum().backward()
    opt.step()
    ex = rsr.layer(1).experts
    a0, b0 = ex.A[0].detach().clone(), ex.B[0].detach().clone()
    m0 = opt.state[ex.A]["exp_avg"][0].clone()
    upcycle(rsr, opt, noise=0.01, seed=0)
    for k in range(3):
        assert torch.allclose(ex.A[k], a0, atol=0.05 * float(a0.std())) and not torch.equal(ex.A[k], a0)
        assert torch.allclose(ex.B[k], b0, atol=0.05 * float(b0.std()) + 1e-12)
        assert torch.equal(opt.state[ex.A]["exp_avg"][k], m0)


def test_styles_are_the_stated_colour_maps_and_training_never_shows_a_held_out_pair():
    img = np.random.default_rng(0).uniform(-1, 1, (2, 3, 4, 4)).astype(np.float32)
    assert np.array_equal(styles.apply_style(img, "negative"), -img)
    assert np.array_equal(styles.apply_style(img, "reversed")[:, 0], img[:, 2])
    assert np.array_equal(styles.apply_style(img, "swapped")[:, 1], img[:, 0])
    assert np.allclose(styles.apply_style(img, "gray")[:, 1], img.mean(1))
    for split, held in (("train", False), ("test", True)):
        _, captions, names = styles.sample_batch(np.random.default_rng(1), 200, 16, split)
        for text, style in zip(captions, names):
            plain, parsed = styles.split_caption(text)
            assert parsed == style
            scene_shapes = {g.shape for g in shapes.parse_caption(plain).groups}
            assert any((style, s) in styles.HELD_OUT_PAIRS for s in scene_shapes) == held, text


def test_tiny_shift_trains_its_base_on_the_plain_task_and_the_rsr_stage_on_the_styles(tmp_path):
    from rsr_model.tasks import get_task

    task = get_task("tiny-shift")
    rng = np.random.default_rng(0)
    plain, _ = task.stage_batch("base", rng, 16)
    assert (plain.reshape(16, 3, -1).min(-1).values == -1).all()  # black backgrounds: not negative
    assert task.describe("a red circle, in gray")["attributes"]["style"] == "gray"
    out = tmp_path / "shift.pt"
    assert train(out, "--preset", "tiny-shift", "--upcycle-steps", "1", "--soft-steps", "1", steps=4) == 0
    with open(str(out) + ".log.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == "rsr"]
    loads = [list(map(float, r["load_share"].split())) for r in rows]
    assert loads[0] == [1.0, 0.0, 0.0, 0.0]  # the upcycling step: expert 0 alone
    assert loads[1][0] < 1.0  # then the gate routes


@pytest.mark.parametrize("args, fragment", [
    (["--upcycle-steps", "0", "--upcycle-noise", "0.1"], "does not upcycle"),
    (["--mode", "sft", "--soft-steps", "1"], "has none to choose"),
    (["--train-routing", "random", "--anneal"], "takes no upcycling"),
    (["--train-routing", "random", "--upcycle-noise", "0.1"], "does not upcycle"),
    (["--preset", "tiny", "--anneal"], "warm start"),
    (["--upcycle-steps", "3", "--soft-steps", "1"], "leave no hard-routing step"),
])
def test_recipe_flags_that_do_not_apply_are_refused(tmp_path, capsys, args, fragment):
    code = train(tmp_path / "x.pt", "--preset", "tiny-shift", *args, steps=4)
    assert code == 2
    assert fragment in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.pt").exists()

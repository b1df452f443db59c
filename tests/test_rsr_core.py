"""Properties of the RSR mechanism on real (tiny) diffusers models."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from rsr_model import HOOK_POINTS, MODES, ConfigError, hook_name, install_rsr, load_rsr, remove_rsr, rsr_config
from rsr_model.experts import LoRAExperts
from rsr_model.gate import balance_loss, load_share, sample_choice
from rsr_model.hooks import hook_table

from .conftest import randomize_rsr, run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["sd3", "dit"])
def test_identity_at_init(arch, mode, request):
    model, inputs = request.getfixturevalue(arch)
    with torch.no_grad():
        ref = run(model, inputs)
        rsr = install_rsr(model, rsr_config("tiny", mode=mode, target_layers=[1, 2]))
        out = run(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # ... and the experts are really on the path: non-zero B changes the output.
    randomize_rsr(rsr)
    with torch.no_grad():
        assert (run(model, inputs) - ref).abs().max() > 1e-3


def test_modes_resolve_to_paper_ablations():
    assert (rsr_config("tiny", mode="sft").experts, rsr_config("tiny", mode="sft").steps) == (1, 1)
    assert (rsr_config("tiny", mode="no_recursion").experts, rsr_config("tiny", mode="no_recursion").steps) == (4, 1)
    assert (rsr_config("tiny", mode="no_modulation").experts, rsr_config("tiny", mode="no_modulation").steps) == (1, 3)
    assert (rsr_config("tiny", mode="rsr").experts, rsr_config("tiny", mode="rsr").steps) == (4, 3)
    assert not rsr_config("tiny", mode="no_modulation").has_gate


@pytest.mark.parametrize("kw", [dict(num_experts=0), dict(latent_steps=-1), dict(rank=0), dict(mode="bogus"),
                                dict(target_layers=[])])
def test_bad_config_rejected(kw):
    with pytest.raises(ConfigError):
        rsr_config("tiny", **kw)


def test_target_layer_beyond_depth(sd3):
    model, _ = sd3
    with pytest.raises(ConfigError, match="beyond the model's depth"):
        install_rsr(model, rsr_config("tiny", target_layers=[9]))


def test_sft_equals_peft_lora(sd3):
    from peft import LoraConfig, inject_adapter_in_model

    model, inputs = sd3
    layers, r = [1, 3], 4
    peft_model = inject_adapter_in_model(
        LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0,
                   target_modules=[f"transformer_blocks.{i}.attn.{p}" for i in layers for p in ("to_q", "to_k",
                                                                                                "to_v")]),
        copy.deepcopy(model))
    rsr_model_ = copy.deepcopy(model)
    rsr = install_rsr(rsr_model_, rsr_config("tiny", mode="sft", rank=r, lora_alpha=8, target_layers=layers))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in layers:
            attn = peft_model.transformer_blocks[i].attn
            ex = rsr.layer(i).experts
            for j, p in enumerate(("to_q", "to_k", "to_v")):
                lin = getattr(attn, p)
                lin.lora_B["default"].weight.copy_(torch.randn(lin.lora_B["default"].weight.shape, generator=g) * 0.1)
                ex.A[0, :, j * r:(j + 1) * r] = lin.lora_A["default"].weight.T
                ex.B[0, j] = lin.lora_B["default"].weight.T
        ref = run(model, inputs)
        out_peft, out_rsr = run(peft_model, inputs), run(rsr_model_, inputs)
    assert (out_peft - ref).abs().max() > 1e-3  # the LoRA really changes the output
    torch.testing.assert_close(out_rsr, out_peft, atol=1e-5, rtol=1e-5)


def test_sparse_dispatch_equals_dense_forward_and_backward():
    torch.manual_seed(0)
    # float64 so that the comparison is about dispatch, not about summation order
    ex = LoRAExperts(num_experts=5, in_dim=24, out_dim=24, rank=3, scaling=2.0).double()
    with torch.no_grad():
        ex.B.normal_()
    h = torch.randn(3, 17, 24, dtype=torch.float64, requires_grad=True)
    expert = torch.randint(-1, 5, (3, 17))
    expert[0] = 2  # one sample entirely on one expert; some experts may be empty
    weight = (torch.rand(3, 17, dtype=torch.float64) + 0.5).requires_grad_()
    outs = {}
    for name, fn in (("sparse", ex.forward), ("dense", ex.forward_dense)):
        for t in (h, weight, ex.A, ex.B):
            t.grad = None
        q, k, v = fn(h, expert, weight)
        (q.square().sum() + (k * 2).sum() + v.sin().sum()).backward()
        outs[name] = [t.detach().clone() for t in (q, k, v, h.grad, weight.grad, ex.A.grad, ex.B.grad)]
    for a, b in zip(outs["sparse"], outs["dense"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # ablated tokens (-1) get no adapter
    assert outs["sparse"][0][expert == -1].abs().max() == 0


def _train_step(model, rsr, inputs, opt):
    opt.zero_grad()
    out = run(model, inputs)
    loss = out.square().mean() + rsr.balance_loss()
    loss.backward()
    return loss


def test_gradients_reach_gate_experts_and_every_step(sd3):
    model, inputs = sd3
    model.train()
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[2]))
    layer = rsr.layer(2)
    opt = torch.optim.AdamW(rsr.parameters(), lr=1e-2)
    _train_step(model, rsr, inputs, opt)
    assert layer.experts.B.grad.abs().sum() > 0  # B gets gradient even at zero init
    opt.step()
    # Force step s onto expert s so that each step's adapter is identifiable by its gradient.
    forced = {hook_name(2, "expert", s): (lambda s: lambda e, ctx: torch.full_like(e, s))(s) for s in range(3)}
    with rsr.hooks.hooks(forced):
        _train_step(model, rsr, inputs, opt)
    for s in range(3):
        assert layer.experts.A.grad[s].abs().sum() > 0 and layer.experts.B.grad[s].abs().sum() > 0, s
    assert layer.experts.A.grad[3].abs().sum() == 0  # expert 3 was not used
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.gate.parameters())
    # The frozen base gets no gradient at all.
    assert all(p.grad is None for n, p in model.named_parameters() if ".processor." not in n)


def test_text_tokens_never_routed(sd3):
    model, inputs = sd3
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[2]))
    calls = {"add_q_proj": 0, "add_k_proj": 0, "add_v_proj": 0}
    attn = model.transformer_blocks[2].attn
    for name in calls:
        getattr(attn, name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    with rsr.hooks.cache("*.expert") as cache, torch.no_grad():
        run(model, inputs)
    n_vision = (32 // 2) ** 2
    assert all(v.shape == (2, n_vision) for name in cache for _, v in cache[name])  # only vision tokens routed
    # the text projections run once per forward, whatever L, and are the frozen modules themselves
    assert calls == {"add_q_proj": 1, "add_k_proj": 1, "add_v_proj": 1}
    assert not any(p.requires_grad for p in attn.add_q_proj.parameters())


@pytest.mark.parametrize("tau", [0.5, 1.0, 5.0])
def test_hard_gumbel_choice_is_categorical(tau):
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    expert, onehot = sample_choice(logits.expand(100_000, 1, 5), tau, training=True)
    counts = np.bincount(expert.flatten().numpy(), minlength=5)
    p = logits.double().softmax(-1).numpy()
    expected = p / p.sum() * counts.sum()
    assert chisquare(counts, expected).pvalue > 1e-3
    assert torch.equal(onehot.argmax(-1), expert) and torch.all(onehot.sum(-1) == 1)
    # a wrong distribution (tau applied to the choice) would be rejected
    wrong = (logits.double() / tau).softmax(-1).numpy() * counts.sum() if tau != 1.0 else None
    if wrong is not None:
        assert chisquare(counts, wrong).pvalue < 1e-6


def test_balance_loss_closed_forms():
    K = 8
    uniform, collapse = torch.full((K,), 1 / K), torch.nn.functional.one_hot(torch.tensor(0), K).float()
    for over in ("step", "recursion"):
        assert balance_loss([uniform] * 3, [uniform] * 3, over).item() == pytest.approx(1.0)
        assert balance_loss([collapse] * 3, [collapse] * 3, over).item() == pytest.approx(K)
    # steps that each use their own expert: collapsed per step, balanced over the recursion
    own = [torch.nn.functional.one_hot(torch.tensor(s), 4).float() for s in range(4)]
    assert balance_loss(own, own, "step").item() == pytest.approx(4.0)
    assert balance_loss(own, own, "recursion").item() == pytest.approx(1.0)
    ids = torch.arange(K * 50) % K  # and f_k is what load_share measures
    assert torch.allclose(load_share(ids, K), uniform)


@pytest.mark.parametrize("over", ["step", "recursion"])
def test_layer_balances_over_what_its_config_says(sd3, over):
    """In training the layer's balance loss is balance_loss(f, P, config.balance_over) of its own steps."""
    model, inputs = sd3
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[2], balance_over=over))
    randomize_rsr(rsr)
    model.train()
    own_expert = lambda e, ctx: torch.full_like(e, ctx.step % rsr.config.experts)  # each step its own
    with torch.no_grad(), rsr.hooks.hooks({"*.step.*.expert": own_expert}), rsr.hooks.cache("*.probs") as probs:
        run(model, inputs)
    K = rsr.config.experts
    shares = [torch.nn.functional.one_hot(torch.tensor(s % K), K).float() for s in range(rsr.config.steps)]
    mean_probs = [v[0][1].reshape(-1, K).mean(0) for _, v in sorted(probs.items())]
    layer = rsr["2"]
    assert layer.last_balance.item() == pytest.approx(balance_loss(shares, mean_probs, over).item(), rel=1e-5)
    other = "step" if over == "recursion" else "recursion"
    assert layer.last_balance.item() != pytest.approx(balance_loss(shares, mean_probs, other).item(), rel=1e-3)


def test_hook_points_names_shapes_and_context(sd3):
    model, inputs = sd3
    cfg = rsr_config("tiny", target_layers=[1, 2])
    rsr = install_rsr(model, cfg)
    names = rsr.hooks.names()
    B, N, D, K = 2, 256, 128, cfg.experts
    sizes = {"B": B, "N": N, "D": D, "K": K}
    expected = {}  # every name HOOK_POINTS promises, with the shape its table gives
    for i in (1, 2):
        for point, spec in HOOK_POINTS.items():
            shape = tuple(sizes[d] for d in spec.shape.strip("()").split(", "))
            for s in (range(cfg.steps) if spec.per_step else [None]):
                expected[hook_name(i, point, s)] = shape
    assert sorted(names) == sorted(expected) and rsr.layer_indices == [1, 2] and rsr.layer(2) is rsr["2"]
    assert hook_name(2, "probs", 1) == "blocks.2.rsr.step.1.probs" and hook_name(1, "cond") == "blocks.1.rsr.cond"
    assert rsr.hooks.names(hook_name(2, "expert", "*")) == [hook_name(2, "expert", s) for s in range(3)]
    rsr.set_context(sample_ids=torch.tensor([10, 11]), train_step=5)
    with rsr.hooks.cache() as cache, torch.no_grad():
        run(model, inputs)
    for name, shape in expected.items():
        assert len(cache[name]) == 1 and tuple(cache[name][0][1].shape) == shape, name
    ctx = cache[hook_name(2, "probs", 1)][0][0]
    assert (ctx.layer, ctx.step, ctx.train_step) == (2, 1, 5)
    assert torch.equal(ctx.timestep, inputs["timestep"]) and torch.equal(ctx.sample_ids, torch.tensor([10, 11]))
    torch.testing.assert_close(cache[hook_name(2, "probs", 0)][0][1],
                               cache[hook_name(2, "logits", 0)][0][1].softmax(-1))


def test_readme_hook_table_is_hook_points():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert hook_table() in readme
    with pytest.raises(ValueError):
        hook_name(0, "expert")  # a per-step point needs its step
    with pytest.raises(KeyError):
        hook_name(0, "gate")


def test_hooks_remove_exactly_and_force_expert(sd3):
    model, inputs = sd3
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[2]))
    randomize_rsr(rsr)
    with torch.no_grad():
        ref = run(model, inputs)
        with rsr.hooks.cache("*.expert") as free:
            run(model, inputs)
        assert any(len(v[0][1].unique()) > 1 for v in free.values())  # the gate really routes
        keep = rsr.hooks.add(hook_name(2, "out"), lambda v, ctx: None)  # a reader that stays
        with rsr.hooks.hooks({"*.step.*.expert": lambda e, ctx: torch.zeros_like(e)}):
            with rsr.hooks.cache("*.expert") as forced:
                forced_out = run(model, inputs)
        assert all((v[0][1] == 0).all() for v in forced.values())
        assert (forced_out - ref).abs().max() > 1e-4
        assert [len(rsr.hooks.points[n].fns) for n in rsr.hooks.names()] == [
            1 if n == hook_name(2, "out") else 0 for n in rsr.hooks.names()]
        torch.testing.assert_close(run(model, inputs), ref, atol=0, rtol=0)
        keep[0].remove()
        assert not rsr.hooks.active
        # ablation: -1 removes the adapter, as if the layer had no RSR... at the last step
        with rsr.hooks.hooks({"*.step.*.expert": lambda e, ctx: torch.full_like(e, -1)}):
            ablated = run(model, inputs)
        remove_rsr(model)
        torch.testing.assert_close(ablated, run(model, inputs), atol=1e-6, rtol=0)
    with pytest.raises(KeyError):
        rsr.hooks.add("no.such.point", lambda v, c: None)


def test_remove_restores_and_weights_round_trip(sd3, tmp_path):
    model, inputs = sd3
    procs = {n: type(p) for n, p in model.attn_processors.items()}
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = run(model, inputs)
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[0, 2]))
    randomize_rsr(rsr, seed=4)
    with torch.no_grad():
        adapted = run(model, inputs)
    rsr.save(tmp_path / "rsr.safetensors")
    remove_rsr(model)
    assert {n: type(p) for n, p in model.attn_processors.items()} == procs
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), ref, atol=0, rtol=0)
    fresh = copy.deepcopy(model)
    loaded = load_rsr(fresh, tmp_path / "rsr.safetensors")
    assert loaded.config == rsr.config
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, inputs), adapted, atol=0, rtol=0)


def test_early_exit_finishes_the_layer_at_a_step(sd3):
    model, inputs = sd3
    rsr = install_rsr(model, rsr_config("tiny", target_layers=[2]))
    randomize_rsr(rsr, scale=0.2)
    with torch.no_grad():
        full = run(model, inputs)
        rsr.set_exit_step(2)  # L - 1: the normal forward
        torch.testing.assert_close(run(model, inputs), full, atol=0, rtol=0)
        outs = []
        for s in (0, 1):
            rsr.set_exit_step(s)
            with rsr.hooks.cache("*.expert") as seen:
                outs.append(run(model, inputs))
            assert sorted(seen) == [hook_name(2, "expert", i) for i in range(s + 1)]  # later steps never run
        rsr.set_exit_step(None)
        torch.testing.assert_close(run(model, inputs), full, atol=0, rtol=0)
    assert (outs[0] - full).abs().max() > 1e-4 and (outs[0] - outs[1]).abs().max() > 1e-5

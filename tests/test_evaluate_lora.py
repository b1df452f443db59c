"""export-lora: one expert as a diffusers LoRA that an unmodified SD3 transformer loads."""
import pytest
import torch
from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin

from rsr_model.__main__ import main
from rsr_model.checkpoint import load_checkpoint, save_checkpoint
from rsr_model.evaluation.lora_export import WEIGHTS_NAME
from rsr_model.hooks import hook_name
from rsr_model.sample import load_model
from rsr_model.train import build_from_checkpoint

from .conftest import one_error_line

EXPERT = 2


@pytest.fixture(scope="module")
def routed_ckpt(tmp_path_factory):
    """A tiny no_recursion checkpoint (K=4, L=1) whose experts clearly differ."""
    path = tmp_path_factory.mktemp("lora") / "moe.pt"
    assert main(["train", "--out", str(path), "--batch-size", "4", "--save-every", "1", "--steps", "1",
                 "--mode", "no_recursion", "--target-layers", "1,3"]) == 0
    ck = load_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    ck["rsr_state"] = {k: (torch.randn(v.shape, generator=g) * 0.05 if k.endswith("experts.B") else v)
                       for k, v in ck["rsr_state"].items()}
    save_checkpoint(ck, path)
    return path


def test_exported_expert_changes_projections_exactly_as_inside_rsr(routed_ckpt, tmp_path):
    out = tmp_path / "lora"
    assert main(["export-lora", "--ckpt", str(routed_ckpt), "--expert", str(EXPERT), "--out", str(out)]) == 0
    task, model, rsr, ck = load_model(routed_ckpt)
    plain, _ = build_from_checkpoint(task, {**ck, "rsr_config": None, "rsr_state": None})
    state = SD3LoraLoaderMixin.lora_state_dict(out)
    state = state[0] if isinstance(state, tuple) else state
    assert len(state) == 2 * 3 * 2  # A and B of q, k, v on blocks 1 and 3
    plain.load_lora_adapter(out, prefix="transformer", weight_name=WEIGHTS_NAME)  # diffusers alone, no RSR code
    plain.eval()
    x = torch.randn(2, 144, model.config.num_attention_heads * model.config.attention_head_dim,
                    generator=torch.Generator().manual_seed(1))
    for index in rsr.layer_indices:
        base_attn, lora_attn = model.transformer_blocks[index].attn, plain.transformer_blocks[index].attn
        deltas = rsr.layer(index).experts(x, torch.full(x.shape[:2], EXPERT))
        for name, delta in zip(("to_q", "to_k", "to_v"), deltas):
            change = getattr(lora_attn, name)(x) - getattr(base_attn, name)(x)
            assert delta.abs().max() > 1e-3
            torch.testing.assert_close(change, delta, atol=1e-5, rtol=1e-4)
        # text projections untouched
        torch.testing.assert_close(lora_attn.add_q_proj(torch.zeros(1, 3, x.shape[-1])),
                                   base_attn.add_q_proj(torch.zeros(1, 3, x.shape[-1])))
    # the whole transformer: RSR with every token routed to the expert == the base with the LoRA
    cond = task.condition(["a red circle", "two squares"])
    inputs = dict(hidden_states=torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2)),
                  timestep=torch.tensor([800.0, 200.0]), **cond)
    with torch.no_grad(), rsr.hooks.hooks({hook_name("*", "expert", "*"): lambda ids, ctx: torch.full_like(ids, EXPERT)}):
        routed = model(**inputs).sample
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, routed, atol=1e-4, rtol=1e-4)


def test_export_lora_refuses_a_missing_expert(routed_ckpt, tmp_path, capsys):
    assert main(["export-lora", "--ckpt", str(routed_ckpt), "--expert", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--expert must be in 0..3" in one_error_line(capsys.readouterr().err)

"""Exports: GenEval's and DPG-Bench's folder layouts, and one expert as a diffusers LoRA, from a tiny checkpoint."""
import json
import re

import numpy as np
import pytest
import torch
from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin
from PIL import Image

from evaluation.export import dpg_grid
from evaluation.lora_export import WEIGHTS_NAME
from rsr_model.__main__ import main
from rsr_model.checkpoint import load_checkpoint, save_checkpoint
from rsr_model.hooks import hook_name
from rsr_model.sample import load_model
from rsr_model.train import build_from_checkpoint

from .conftest import one_error_line, train

EXPERT = 2


@pytest.fixture(scope="module")
def routed_ckpt(tmp_path_factory):
    """A tiny no_recursion checkpoint (K=4, L=1) whose experts clearly differ."""
    path = tmp_path_factory.mktemp("lora") / "moe.pt"
    assert train(path, "--save-every", 1, "--mode", "no_recursion", "--experts", 4, "--target-layers", "1,3",
                 steps=1) == 0
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
    every_token_to_expert = {hook_name("*", "expert", "*"): lambda ids, ctx: torch.full_like(ids, EXPERT)}
    with torch.no_grad(), rsr.hooks.hooks(every_token_to_expert):
        routed = model(**inputs).sample
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, routed, atol=1e-4, rtol=1e-4)


def test_export_lora_refuses_a_missing_expert(routed_ckpt, tmp_path, capsys):
    assert main(["export-lora", "--ckpt", str(routed_ckpt), "--expert", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--expert must be in 0..3" in one_error_line(capsys.readouterr().err)


def test_geneval_layout(routed_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}
    prompts.write_text(json.dumps(meta) + "\nthree squares\n")
    out = tmp_path / "geneval"
    assert main(["evaluate", "--export", "geneval", "--ckpt", str(routed_ckpt), "--prompts", str(prompts),
                 "--out", str(out), "--samples-per-prompt", "3", "--sample-steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for folder in out.iterdir():  # what GenEval's evaluate_images.py reads
        assert folder.name.isdigit()
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == 1 and "tag" in json.loads(lines[0]) and "include" in json.loads(lines[0])
        samples = sorted(p.name for p in (folder / "samples").iterdir())
        assert samples == ["0000.png", "0001.png", "0002.png"] and all(re.match(r"\d+\.png", s) for s in samples)
        assert Image.open(folder / "samples" / "0000.png").size == (24, 24)
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == meta
    counting = json.loads((out / "00001" / "metadata.jsonl").read_text())
    assert counting["tag"] == "counting" and counting["exclude"] == [{"class": "square", "count": 4}]


def test_dpg_layout(routed_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "partiprompts12.txt").write_text("a red circle left of a blue square\n")
    (prompts / "coco7.txt").write_text("two triangles\n")
    out = tmp_path / "dpg"
    assert main(["evaluate", "--export", "dpg", "--ckpt", str(routed_ckpt), "--prompts", str(prompts),
                 "--out", str(out), "--sample-steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["coco7.png", "partiprompts12.png"]
    assert Image.open(out / "coco7.png").size == (48, 48)  # 2x2 tiles of 24 px: --resolution 24
    # the grid's tiles are the samples in the evaluator's crop order
    tiles = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    grid = dpg_grid(tiles)
    for k, (x, y) in enumerate([(0, 0), (2, 0), (0, 2), (2, 2)]):
        assert np.array_equal(grid[y:y + 2, x:x + 2], tiles[k])
    # DPG images hold four samples; an export into a used folder is refused
    capsys.readouterr()
    assert main(["evaluate", "--export", "dpg", "--ckpt", str(routed_ckpt), "--prompts", str(prompts),
                 "--out", str(tmp_path / "x"), "--samples-per-prompt", "3"]) == 2
    assert "hold 4 samples" in one_error_line(capsys.readouterr().err)
    assert main(["evaluate", "--export", "dpg", "--ckpt", str(routed_ckpt), "--prompts", str(prompts),
                 "--out", str(out)]) == 2
    assert "not an empty folder" in one_error_line(capsys.readouterr().err)

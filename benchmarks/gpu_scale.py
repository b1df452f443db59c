"""On a CUDA GPU, a few minutes: `python -m benchmarks.gpu_scale [--reps 20] [--tokens 4096]`.

PREPARED, NOT YET RUN: no GPU was lent to the session that wrote it (docs/scale.md says so);
run it on the first GPU machine and put its printout, with the date and the GPU, into
docs/scale.md. Not a test dependency.

One SD3-medium-sized joint-attention layer (1536 wide, 24 heads, 4096 vision tokens = 1024 px,
154 text tokens, batch 2, LoRA rank 128), on CUDA in bf16 autocast, median of interleaved reps:

1. training steps per second (forward + backward + AdamW step of the trainable weights) of
   RSR K = 8, L = 3 against the frozen base layer (the base trains nothing: its step is
   forward + backward), and K = 8 against K = 1 (sparse dispatch cost; target <= 1.15);
2. recording overhead on CUDA: the RSR layer's forward (sampling, no grad) with nothing
   attached against the same forward with the training/sampling recorder's hooks attached
   (chosen expert ids copied to the host as uint8 per recursion step, and the all-token
   counts per expert), and with gate probabilities (float16) copied too.

`--smoke` runs every step of it on the CPU at a tiny size (width 64, 16 vision tokens, one rep):
not a measurement, a check that the script runs before a GPU session spends its minutes on it
(tests/test_gpu_scale.py runs it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def build(size: dict, K: int, L: int, device: str = "cuda"):
    """The layer (base if K == 0) on `device`, and its hook registry (None for the base)."""
    from diffusers.models.attention import JointTransformerBlock

    from rsr_model.config import RSRConfig
    from rsr_model.hooks import HookRegistry
    from rsr_model.layer import RSRAttnProcessor, RunState

    torch.manual_seed(0)
    attn = JointTransformerBlock(dim=size["dim"], num_attention_heads=size["heads"],
                                 attention_head_dim=size["dim"] // size["heads"], context_pre_only=False).attn
    attn.requires_grad_(False)
    registry = None
    if K:
        registry = HookRegistry()
        cfg = RSRConfig(num_experts=K, latent_steps=L, rank=size["rank"], target_layers=[0],
                        mode="rsr" if K > 1 or L > 1 else "sft")
        layer = RSRAttnProcessor(cfg, 0, size["dim"], size["dim"], registry, RunState())
        with torch.no_grad():
            layer.experts.B.normal_(std=0.01)
        attn.set_processor(layer)
    attn.to(device)
    params = [p for p in attn.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return attn, registry, opt


def train_step(case, x, y, c) -> None:
    attn, _, opt = case
    if hasattr(attn.processor, "cond"):
        attn.processor.cond = c
    xv = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out, ctx = attn(hidden_states=xv, encoder_hidden_states=y)
        loss = out.float().square().mean() + ctx.float().square().mean()
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def sample_step(case, x, y, c) -> None:
    attn = case[0]
    attn.processor.cond = c
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        attn(hidden_states=x, encoder_hidden_states=y)


def timed(fns: dict, reps: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():  # warm-up (cuBLAS plans, allocator)
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():  # interleaved: drift and clocks hit every variant alike
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def recorder_hooks(registry, K: int, probs: bool) -> list:
    """What the recorders attach: ids to host uint8, all-token counts; probabilities as float16."""
    sink: list = []

    def on_expert(e, ctx):
        sink.append(e.detach().to(torch.uint8).cpu())
        sink.append(torch.bincount(e.detach().reshape(-1).clamp_min(0), minlength=K).cpu())

    handles = registry.add("*.expert", on_expert)
    if probs:
        handles += registry.add("*.probs", lambda v, ctx: sink.append(v.detach().to(torch.float16).cpu()))
    return handles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_scale", description=__doc__.splitlines()[0])
    sizes = {"reps": 20, "tokens": 4096, "batch": 2}  # defaults; None below means "not given"
    ap.add_argument("--reps", type=int, help=f"timed repetitions per variant (default {sizes['reps']})")
    ap.add_argument("--tokens", type=int, help=f"vision tokens (default {sizes['tokens']} = 1024 px for SD3)")
    ap.add_argument("--batch", type=int, help=f"batch size (default {sizes['batch']})")
    ap.add_argument("--smoke", action="store_true",
                    help="run every step on the CPU at a tiny size, once: a check of the script, not a measurement")
    args = ap.parse_args(argv)
    given = [name for name in sizes if getattr(args, name) is not None]
    bad = [name for name in given if getattr(args, name) < 1]
    if bad or (args.smoke and given):
        why = (f"must be at least 1, got {getattr(args, bad[0])}" if bad
               else "does not apply with --smoke (its size is fixed)")
        print(f"error: --{(bad or given)[0]} {why}", file=sys.stderr)
        return 2
    for name, default in sizes.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.smoke:
        device, args.reps = "cpu", 1
        size = dict(dim=64, heads=2, n=16, m=8, batch=2, rank=4)
    elif not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark needs a GPU (--smoke checks the script on the CPU)",
              file=sys.stderr)
        return 2
    else:
        device = "cuda"
        size = dict(dim=1536, heads=24, n=args.tokens, m=154, batch=args.batch, rank=128)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(size["batch"], size["n"], size["dim"], generator=g, device=device)
    y = torch.randn(size["batch"], size["m"], size["dim"], generator=g, device=device)
    c = torch.randn(size["batch"], size["dim"], generator=g, device=device)
    cases = {"base": build(size, 0, 3, device), "K1": build(size, 1, 3, device), "K8": build(size, 8, 3, device)}
    where = "SMOKE TEST on the CPU, not a measurement" if args.smoke else torch.cuda.get_device_name()
    print(f"{where} | torch {torch.__version__} | width {size['dim']}, {size['heads']} heads, {size['n']} vision "
          f"+ {size['m']} text tokens, batch {size['batch']}, rank {size['rank']}, L = 3, bf16 autocast, "
          f"median of {args.reps}")

    t = timed({k: (lambda case=case: train_step(case, x, y, c)) for k, case in cases.items()}, args.reps)
    for k, v in t.items():
        print(f"  train {k:<5} {v * 1e3:8.2f} ms/step  {1 / v:7.2f} steps/s")
    print(f"  time(RSR K=8, L=3) / time(base):  {t['K8'] / t['base']:.3f}  (ideal about L = 3)")
    print(f"  time(K=8) / time(K=1):            {t['K8'] / t['K1']:.3f}  (target <= 1.15)")

    k8, reg = cases["K8"], cases["K8"][1]
    plain = lambda: sample_step(k8, x, y, c)

    def with_hooks(probs: bool):
        handles = recorder_hooks(reg, 8, probs)
        try:
            sample_step(k8, x, y, c)
        finally:
            for h in handles:
                h.remove()

    s = timed({"none": plain, "routing": lambda: with_hooks(False), "routing+probs": lambda: with_hooks(True)},
              args.reps)
    for k, v in s.items():
        print(f"  sample K8 {k:<14} {v * 1e3:8.2f} ms  ratio {v / s['none']:.3f}")
    if device == "cuda":
        print(f"  peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of one RSR joint-attention layer (forward + backward, CPU), as ratios measured in one run.

    python -m benchmarks.rsr_cost [--reps 5] [--only tiny|sd3]

For the tiny config and for one SD3-medium-sized layer (1536 wide, 24 heads, 1024 vision
tokens, 154 text tokens, batch 2, rank 128):
  - time(K=8) / time(K=1) at L=3, sparse dispatch (target <= 1.15) and a dense mixture
    (every expert on every token, then masked) for contrast;
  - time(RSR, L=3) / time(frozen base layer), against the ideal of about L attentions;
  - overhead of the hook points with nothing attached (target < 1%): the same layer with
    hook firing compiled out, timed interleaved, plus a direct count of the guard's cost.
Timings are medians over interleaved repetitions, so slow drift hits all variants alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.attention import JointTransformerBlock

from rsr_model.config import RSRConfig
from rsr_model.hooks import HookRegistry
from rsr_model.layer import RSRAttnProcessor, RunState

SIZES = {
    # the tiny preset as it trains: 24x24 RGB, patch 2 (144 tokens), 16 text tokens, batch 32
    "tiny": dict(dim=128, heads=4, n=144, m=16, batch=32, rank=8),
    "sd3": dict(dim=1536, heads=24, n=1024, m=154, batch=2, rank=128),
}


def make_case(size: dict, K: int, L: int, dense: bool = False, hooks: bool = True):
    torch.manual_seed(0)
    attn = JointTransformerBlock(dim=size["dim"], num_attention_heads=size["heads"],
                                 attention_head_dim=size["dim"] // size["heads"], context_pre_only=False).attn
    attn.requires_grad_(False)
    if K == 0:  # the frozen base layer with its own diffusers processor
        return attn
    cfg = RSRConfig(num_experts=K, latent_steps=L, rank=size["rank"], target_layers=[0],
                    mode="rsr" if K > 1 or L > 1 else "sft")
    layer = RSRAttnProcessor(cfg, 0, size["dim"], size["dim"], HookRegistry(), RunState())
    with torch.no_grad():
        layer.experts.B.normal_(std=0.01)
    if dense:
        layer.experts.forward = layer.experts.forward_dense  # benchmark-only swap
    if not hooks:
        layer._fire = lambda hp, value, step=None: value  # hook points compiled out
    attn.set_processor(layer)
    return attn


def step(attn, x, y, c) -> None:
    proc = attn.processor
    if isinstance(proc, RSRAttnProcessor):
        proc.cond = c
    xv = x.detach().requires_grad_(True)
    out, ctx = attn(hidden_states=xv, encoder_hidden_states=y)
    (out.square().mean() + ctx.square().mean()).backward()


def time_cases(cases: dict, inputs, reps: int) -> dict[str, float]:
    for a in cases.values():  # warm-up
        step(a, *inputs)
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, a in cases.items():
            t0 = time.perf_counter()
            step(a, *inputs)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def guard_cost(reps: int = 200_000) -> float:
    """Seconds per `_fire` call with nothing attached (the only work a hook point adds)."""
    cfg = RSRConfig(num_experts=2, latent_steps=1, target_layers=[0])
    layer = RSRAttnProcessor(cfg, 0, 8, 8, HookRegistry(), RunState())
    x = torch.zeros(1)
    t0 = time.perf_counter()
    for _ in range(reps):
        layer._fire(layer.hp_out, x)
    return (time.perf_counter() - t0) / reps


def run(name: str, reps: int) -> None:
    size = SIZES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size["batch"], size["n"], size["dim"], generator=g)
    y = torch.randn(size["batch"], size["m"], size["dim"], generator=g)
    c = torch.randn(size["batch"], size["dim"], generator=g)
    L = 3
    cases = {
        "base": make_case(size, 0, L),
        "K1": make_case(size, 1, L), "K2": make_case(size, 2, L), "K8": make_case(size, 8, L),
        "dense_K1": make_case(size, 1, L, dense=True), "dense_K8": make_case(size, 8, L, dense=True),
        "K8_nohooks": make_case(size, 8, L, hooks=False),
    }
    for a in cases.values():
        a.train()
    t = time_cases(cases, (x, y, c), reps)
    fires = 2 + 4 * L  # cond, out, and latent/logits/probs/expert per step
    print(f"\n== {name}: width {size['dim']}, {size['heads']} heads, {size['n']} vision + {size['m']} text tokens, "
          f"batch {size['batch']}, rank {size['rank']}, L={L}, forward+backward, median of {reps} ==")
    for k, v in t.items():
        print(f"  {k:<11} {v * 1e3:9.1f} ms")
    print(f"  sparse  time(K=8)/time(K=1):        {t['K8'] / t['K1']:.3f}   (target <= 1.15)")
    print(f"  sparse  time(K=8)/time(K=2):        {t['K8'] / t['K2']:.3f}   (both gated: dispatch cost alone)")
    print(f"  dense   time(K=8)/time(K=1):        {t['dense_K8'] / t['dense_K1']:.3f}   (contrast)")
    print(f"  time(RSR K=8, L=3)/time(base):      {t['K8'] / t['base']:.3f}   (ideal about L = {L}; "
          f"{t['K8'] / t['base'] / L:.3f} of it)")
    print(f"  hooks, nothing attached, A/B:       {(t['K8'] / t['K8_nohooks'] - 1) * 100:+.2f}%  (noise-limited)")
    print(f"  hooks, nothing attached, counted:   {fires * guard_cost() / t['K8'] * 100:.4f}%  "
          f"({fires} guard checks per forward; target < 1%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=list(SIZES), default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in ([args.only] if args.only else list(SIZES)):
        run(name, args.reps)


if __name__ == "__main__":
    main()

"""Trace I/O benchmark: `python -m benchmarks.trace_io`.

Writes a synthetic routing-only trace of 64 samples x 28 timesteps x 4 layers x 5 steps x
4096 tokens (K=8, spatially coherent ids) into runs/bench/, then prints bytes per routing
record, write throughput, the size estimate against the real size, the time to read one
(timestep, layer, step) slice of all samples from a fresh open, and a filter comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from traces import SampleTable, SamplingLayout, SamplingWriter, estimate_sampling, open_trace
from traces.compression import compare_filters, format_table
from traces.synthetic import cell_routing, gate_probs

S, T, LAYERS, STEPS, N, K = 64, 28, [2, 6, 10, 14], 5, 4096, 8


def write_trace(path: Path, batch: int) -> dict[str, float]:
    lo = SamplingLayout(n_experts=K, layers=LAYERS, steps=STEPS, tokens=N, timesteps=list(range(T)),
                        timestep_values=list(np.linspace(1.0, 0.0, T, endpoint=False)))
    table = SampleTable(prompt=[f"prompt {i}" for i in range(S)], seed=list(range(S)))
    est = estimate_sampling(lo, S, table)
    write_s = 0.0
    step_ms = []
    with SamplingWriter(path, lo, table, overwrite=True) as w:
        for b0 in range(0, S, batch):
            w.begin_batch(batch)
            for t in range(T):
                e = cell_routing(0, b0, t, (batch, 1, len(LAYERS), STEPS, N), K)
                t0 = time.perf_counter()
                w.write_timestep(t, e)
                dt = time.perf_counter() - t0
                write_s += dt
                step_ms.append(dt * 1e3)
    records = S * T * len(LAYERS) * STEPS * N
    with open_trace(path) as r:
        stored = r.dataset("/routing/expert").id.get_storage_size()
    return {"records": records, "stored": stored, "file": os.path.getsize(path), "estimate": est.total,
            "write_s": write_s, "step_ms_median": statistics.median(step_ms), "step_ms_max": max(step_ms)}


def read_slices(path: Path, picks: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """(read ms, open+read ms) for random (timestep, layer, step) slices, each from a fresh open."""
    rng = np.random.default_rng(seed)
    read_ms, total_ms = [], []
    for _ in range(picks):
        t, l, s = int(rng.integers(T)), int(rng.choice(LAYERS)), int(rng.integers(STEPS))
        t0 = time.perf_counter()
        with open_trace(path) as r:
            t1 = time.perf_counter()
            x = r.routing(timestep=t, layer=l, step=s)
            t2 = time.perf_counter()
        assert x.shape == (S, 1, N) and x.max() < K
        read_ms.append((t2 - t1) * 1e3)
        total_ms.append((t2 - t0) * 1e3)
    return read_ms, total_ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    ap.add_argument("--batch", type=int, default=16, help="sampler batch size (samples per write)")
    ap.add_argument("--picks", type=int, default=20, help="slices read for the timing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trace_io.h5"

    print(f"trace: {S} samples x {T} timesteps x {len(LAYERS)} layers x {STEPS} steps x {N} tokens, "
          f"K={K}, routing only, batch {args.batch}, Blosc-zstd3-bitshuffle, chunk (1,1,1,{len(LAYERS)},{STEPS},{N})")
    w = write_trace(path, args.batch)
    raw_mb = w["records"] / 2**20
    print(f"routing records           {w['records']:,}")
    print(f"routing stored            {w['stored'] / 2**20:.2f} MiB = {w['stored'] / w['records']:.3f} bytes/record")
    print(f"file size                 {w['file'] / 2**20:.2f} MiB ({w['file'] / w['records']:.3f} bytes/record)")
    print(f"size estimate             {w['estimate'] / 2**20:.2f} MiB ({w['estimate'] / w['file']:.3f} x real)")
    print(f"write throughput          {raw_mb / w['write_s']:.0f} MiB/s raw ids, "
          f"{w['records'] / w['write_s'] / 1e6:.0f} M records/s; per write_timestep "
          f"median {w['step_ms_median']:.1f} ms, max {w['step_ms_max']:.1f} ms "
          f"({args.batch * len(LAYERS) * STEPS * N / 2**20:.2f} MiB each, incl. counts + flush)")

    read_ms, total_ms = read_slices(path, args.picks)
    print(f"slice read (t,l,s; all {S} samples) from a fresh open, {args.picks} picks: "
          f"read median {statistics.median(read_ms):.1f} ms, max {max(read_ms):.1f} ms; "
          f"open+read median {statistics.median(total_ms):.1f} ms, max {max(total_ms):.1f} ms "
          f"(target < 20 ms; OS page cache warm)")

    rng = np.random.default_rng(1)
    ids = np.stack([cell_routing(1, 0, t, (S, 1, len(LAYERS), STEPS, N), K) for t in range(2)], axis=2)
    print(f"\nfilter comparison, expert ids ({ids.nbytes / 2**20:.1f} MiB, chunk (1,1,1,4,5,4096), "
          "written chunk by chunk, in memory, best of 2):")
    print(format_table(compare_filters(ids.reshape(S * 2, 1, len(LAYERS), STEPS, N),
                                       (1, 1, len(LAYERS), STEPS, N), repeats=2)))
    probs = gate_probs(rng, ids[:4, :, 0], K)
    names = ["none", "gzip-4+shuffle", "zstd-3", "blosc-zstd3+shuffle", "blosc-zstd3+bitshuffle", "blosc-lz4+shuffle"]
    print(f"\nfilter comparison, float16 gate probabilities ({probs.nbytes / 2**20:.1f} MiB):")
    print(format_table(compare_filters(probs.reshape(4, len(LAYERS), STEPS, N, K), (1, 1, STEPS, N, K), names)))
    lat = (rng.normal(size=(64, 5, 64, 256)) @ rng.normal(size=(256, 256)) / 16).astype(np.float16)
    print(f"\nfilter comparison, float16 latents (correlated Gaussian, {lat.nbytes / 2**20:.1f} MiB):")
    print(format_table(compare_filters(lat, (1, 5, 64, 256), names)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput of the probe statistics, on a synthetic trace on disk and on synthetic data.

    python -m benchmarks.probe_throughput [--trace runs/bench/trace_io.h5] [--no-trace]
        [--records 150e6] [--chunk-rows 4096] [--skip-umap]

0. Routing probes over a trace on disk (default on; --no-trace skips it).  The synthetic
   trace of benchmarks.trace_io (64 samples x 28 timesteps x 4 layers x 5 recursion steps x
   4096 tokens, K=8: 146.8 M routing records, spatially coherent ids from
   traces.synthetic) is written with `benchmarks.trace_io.write_trace` unless the file
   already holds it, then streamed chunk by chunk (one chunk = one (sample, timestep),
   81,920 records) through the real report pass, `probes.analysis.analyze` without
   linear probes: load, counts-vs-ids check, MI for every label (timestep bin, recursion
   step, position, prompt), transitions, spatial coherence and adjacent-timestep
   stability, then the statistics (permutation nulls, expected MI).  Rates: the
   streaming pass (read + decompress + fold every chunk) and end to end.  Memory: peak
   RSS growth over the whole analysis, against the trace's raw id bytes.  Run first so
   the RSS baseline is clean.
1. Routing probes in memory.  Synthetic routing with the trace layout (sample, branch,
   timestep, layer, step, token) is generated chunk by chunk (uint8 expert ids,
   never the whole set) and streamed through the four routing accumulators:
   load per (layer, step, timestep bin); expert x timestep-bin contingency per
   (layer, step); step-to-step transitions per layer; spatial coherence on the
   16 x 16 token grid per (layer, step).  A "record" is one routed token
   (one expert id).  Generation time is excluded from the rates.
   Memory: peak RSS growth over the stream, and the tracemalloc peak of a short
   run, both set by the chunk size, not the number of records.
2. PCA (randomized, 50 components) of 100k x 1536 float32 latents.
3. UMAP (2-D, 15 neighbours) of 50k points, run on the 50-dim PCA coordinates
   of (2) (the usual practice; see probes.stats.projection.umap_embedding);
   reported with the first-call numba compilation included.

Writes runs/bench/probe_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks import trace_io
from probes.analysis import Options, analyze
from probes.stats import (
    ContingencyAccumulator,
    LoadAccumulator,
    SpatialCoherenceAccumulator,
    TransitionAccumulator,
    pca,
    umap_embedding,
)

K, N_LAYERS, N_STEPS, N_TBINS, GRID = 8, 4, 4, 10, (16, 16)
N_TOKENS = GRID[0] * GRID[1]


def rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_chunk(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk: ids (rows, steps, tokens) uint8 and per-row layer and timestep-bin indices.

    A row is one (sample, branch, timestep, layer) coordinate.  Experts depend
    weakly on the timestep bin so the contingency table is not trivial.
    """
    layer = rng.integers(0, N_LAYERS, rows, dtype=np.uint8)
    tbin = rng.integers(0, N_TBINS, rows, dtype=np.uint8)
    ids = rng.integers(0, K, (rows, N_STEPS, N_TOKENS), dtype=np.uint8)
    ids[:, :, :32] = (tbin % K)[:, None, None]  # plant a little timestep specialization
    return ids, layer, tbin


class RoutingProbes:
    """The four routing accumulators fed from one chunk layout; times each one."""

    def __init__(self) -> None:
        self.load = LoadAccumulator(K, (N_LAYERS, N_STEPS, N_TBINS), ("layer", "step", "tbin"))
        self.mi = ContingencyAccumulator(K, N_TBINS, (N_LAYERS, N_STEPS))
        self.trans = TransitionAccumulator(K, (N_LAYERS, N_STEPS - 1))
        self.spatial = SpatialCoherenceAccumulator(K, GRID, (N_LAYERS, N_STEPS))
        self.seconds = {"load": 0.0, "contingency": 0.0, "transitions": 0.0, "spatial": 0.0}
        self._step = np.arange(N_STEPS, dtype=np.uint8)

    def update(self, ids: np.ndarray, layer: np.ndarray, tbin: np.ndarray) -> None:
        lay3, tb3, st3 = layer[:, None, None], tbin[:, None, None], self._step[None, :, None]
        t0 = time.perf_counter()
        self.load.update(ids, lay3, st3, tb3)
        t1 = time.perf_counter()
        self.mi.update(ids, tb3, lay3, st3)
        t2 = time.perf_counter()
        self.trans.update_steps(ids, 1, layer[:, None])
        t3 = time.perf_counter()
        self.spatial.update(ids, layer[:, None], self._step[None, :])
        t4 = time.perf_counter()
        for name, dt in zip(self.seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.seconds[name] += dt


def bench_routing(n_records: float, chunk_rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    per_row = N_STEPS * N_TOKENS
    n_chunks = int(np.ceil(n_records / (chunk_rows * per_row)))
    probes = RoutingProbes()
    rss0 = rss_mib()
    gen = 0.0
    for _ in range(n_chunks):
        t = time.perf_counter()
        chunk = make_chunk(rng, chunk_rows)
        gen += time.perf_counter() - t
        probes.update(*chunk)
    rss1 = rss_mib()
    t = time.perf_counter()
    load = probes.load.result(keep=("layer", "step"))
    mi = probes.mi.result(n_perm=99)
    trans = probes.trans.result()
    spatial = probes.spatial.result()
    t_result = time.perf_counter() - t
    records = n_chunks * chunk_rows * per_row
    total = sum(probes.seconds.values())
    out = {
        "records": records,
        "chunk_records": chunk_rows * per_row,
        "chunks": n_chunks,
        "probe_seconds": total,
        "records_per_s": records / total,
        "per_probe_records_per_s": {k: records / v for k, v in probes.seconds.items()},
        "generation_seconds": gen,
        "result_seconds": t_result,
        "rss_before_mib": rss0,
        "rss_peak_mib": rss1,
        "rss_growth_mib": rss1 - rss0,
        "check": {
            "share_sum_max_dev": float(np.nanmax(np.abs(load.share.sum(-1) - 1))),
            "load_total": int(probes.load.table().sum()),
            "mi_t_bits_layer0_step0": float(mi.mi_bits[0, 0]),
            "mi_p_layer0_step0": float(mi.p_value[0, 0]),
            "persistence_layer0_step0": float(trans.persistence[0, 0]),
            "spatial_same_layer0_step0": float(spatial.same[0, 0]),
            "spatial_chance_layer0_step0": float(spatial.chance[0, 0]),
        },
    }
    assert out["check"]["load_total"] == records
    return out


def bench_memory(chunk_rows: int, n_chunks: int = 4, seed: int = 1) -> float:
    """tracemalloc peak (MiB) of feeding n_chunks (generation included: it is the chunk)."""
    rng = np.random.default_rng(seed)
    probes = RoutingProbes()
    tracemalloc.start()
    for _ in range(n_chunks):
        probes.update(*make_chunk(rng, chunk_rows))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def trace_shape() -> tuple[int, ...]:
    return (trace_io.S, 1, trace_io.T, len(trace_io.LAYERS), trace_io.STEPS, trace_io.N)


def ensure_trace(path: Path, batch: int = 16) -> dict:
    """Make sure `path` holds the synthetic trace of `benchmarks.trace_io` (complete, every
    cell written); write it there if the file does not exist. A different file under that
    name is an error (never overwritten)."""
    from traces import open_trace

    if path.exists():
        with open_trace(path) as tr:
            ok = (tr.kind == "sampling" and tr.complete and tr.dataset("/routing/expert").shape == trace_shape()
                  and len(tr.coords["expert"]) == trace_io.K and bool(np.all(tr.written)))
        if not ok:
            raise SystemExit(f"error: {path} exists but is not the synthetic benchmark trace "
                             f"{trace_shape()}; remove it or pass --trace elsewhere")
        return {"written": False, "path": str(path), "file_mib": path.stat().st_size / 2**20}
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    w = trace_io.write_trace(path, batch)
    return {"written": True, "path": str(path), "write_seconds": time.perf_counter() - t,
            "file_mib": w["file"] / 2**20}


def bench_trace(path: Path, n_perm: int) -> dict:
    """Stream the trace through `probes.analysis.analyze` (routing probes, no linear probes)."""
    info = ensure_trace(path)
    opt = Options(n_perm=n_perm, linear_probes=False)
    rss0 = rss_mib()
    timings: dict = {}
    t = time.perf_counter()
    r = analyze(str(path), opt, timings=timings)
    total = time.perf_counter() - t
    rss1 = rss_mib()
    records = int(r["checks"]["records"])
    assert records == int(np.prod(trace_shape())), records
    assert r["checks"]["invalid_records"] == 0 and r["checks"]["counts_vs_ids_max_abs_diff"] == 0
    layer0 = r["layers"][str(trace_io.LAYERS[0])]
    step0 = layer0["steps"]["0"]
    return {
        **info,
        "records": records,
        "chunks": int(timings["chunks"]),
        "chunk_records": records // int(timings["chunks"]),
        "stream_seconds": timings["stream_s"],
        "assemble_seconds": timings["assemble_s"],
        "total_seconds": total,
        "stream_records_per_s": records / timings["stream_s"],
        "total_records_per_s": records / total,
        "permutations": n_perm,
        "raw_ids_mib": records / 2**20,
        "rss_before_mib": rss0,
        "rss_peak_mib": rss1,
        "rss_growth_mib": rss1 - rss0,
        "check": {
            "share_sum_max_abs_dev": r["checks"]["share_sum_max_abs_dev"],
            "counts_vs_ids_max_abs_diff": r["checks"]["counts_vs_ids_max_abs_diff"],
            "invalid_records": r["checks"]["invalid_records"],
            "mi_labels": sorted(step0["mi"]),
            "spatial_kappa_layer0_step0": float(step0["spatial"]["kappa"]),
            "persistence_layer0_0->1": float(layer0["transitions"]["0->1"]["persistence"]),
            "adjacent_timestep_agreement_layer0_step0": float(step0["stability"]["adjacent_timesteps"]["agreement"]),
        },
    }


def make_latents(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Clustered latents: 20 clusters in a 64-dim subspace of R^d plus isotropic noise."""
    basis = rng.standard_normal((64, d), dtype=np.float32) / 8
    centers = rng.standard_normal((20, 64), dtype=np.float32) * 3
    z = centers[rng.integers(0, 20, n)] + rng.standard_normal((n, 64), dtype=np.float32)
    x = z @ basis
    x += 0.1 * rng.standard_normal((n, d), dtype=np.float32)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="runs/bench/trace_io.h5",
                    help="synthetic trace streamed by the report pass (written if missing)")
    ap.add_argument("--no-trace", action="store_true", help="skip the on-disk trace benchmark")
    ap.add_argument("--trace-permutations", type=int, default=Options.n_perm,
                    help="permutation-null tables per MI table in the trace benchmark")
    ap.add_argument("--records", type=float, default=150e6)
    ap.add_argument("--chunk-rows", type=int, default=4096, help="rows of steps x tokens = 1024 records each")
    ap.add_argument("--pca-n", type=int, default=100_000)
    ap.add_argument("--pca-d", type=int, default=1536)
    ap.add_argument("--umap-n", type=int, default=50_000)
    ap.add_argument("--umap-seed", type=int, default=None, help="fixed seed (single-threaded UMAP)")
    ap.add_argument("--skip-umap", action="store_true")
    ap.add_argument("--out", default="runs/bench/probe_throughput.json")
    args = ap.parse_args()

    res: dict = {"cpus": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS")}
    if not args.no_trace:
        tb = bench_trace(Path(args.trace), args.trace_permutations)
        res["trace"] = tb
        how = (f"written in {tb['write_seconds']:.1f} s" if tb["written"] else "already there, reused")
        print(f"trace: {tb['path']} ({tb['file_mib']:.1f} MiB on disk, {how})")
        print(f"trace: {tb['records']:,} records in {tb['chunks']} chunks of {tb['chunk_records']:,}, "
              f"probes.analysis.analyze without linear probes")
        print(f"trace: streaming pass {tb['stream_records_per_s'] / 1e6:.1f} M records/s "
              f"({tb['stream_seconds']:.2f} s: read + decompress + every routing probe)")
        print(f"trace: statistics {tb['assemble_seconds']:.2f} s ({tb['permutations']} permutations per MI table, "
              f"expected MI); end to end {tb['total_records_per_s'] / 1e6:.1f} M records/s "
              f"({tb['total_seconds']:.2f} s)")
        print(f"trace: peak RSS {tb['rss_peak_mib']:.0f} MiB, growth over the analysis {tb['rss_growth_mib']:.0f} MiB "
              f"(raw ids of the trace {tb['raw_ids_mib']:.0f} MiB)")
        print(f"trace checks: {tb['check']}")
    r = bench_routing(args.records, args.chunk_rows)
    res["routing"] = r
    print(f"routing: {r['records']:,} records in {r['chunks']} chunks of {r['chunk_records']:,}")
    print(f"routing: {r['records_per_s'] / 1e6:.1f} M records/s over all four accumulators "
          f"({r['probe_seconds']:.2f} s; generation {r['generation_seconds']:.2f} s excluded)")
    for k, v in r["per_probe_records_per_s"].items():
        print(f"  {k:12s} {v / 1e6:8.1f} M records/s")
    print(f"routing: results (MI with 99 null tables per group etc.) {r['result_seconds']:.2f} s")
    print(f"routing: peak RSS {r['rss_peak_mib']:.0f} MiB, growth over the stream {r['rss_growth_mib']:.0f} MiB")
    res["tracemalloc_peak_mib_4_chunks"] = bench_memory(args.chunk_rows)
    print(f"routing: tracemalloc peak over 4 chunks {res['tracemalloc_peak_mib_4_chunks']:.0f} MiB "
          f"(one chunk of ids = {r['chunk_records'] / 2**20:.0f} MiB)")
    print(f"routing checks: {r['check']}")

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    X = make_latents(args.pca_n, args.pca_d, rng)
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    p = pca(X, n_components=50, method="randomized", seed=0)
    t_pca = time.perf_counter() - t
    res["pca"] = {"n": args.pca_n, "d": args.pca_d, "seconds": t_pca, "explained": p.params["explained_variance_total"],
                  "generation_seconds": t_gen}
    print(f"pca: {args.pca_n} x {args.pca_d} float32 -> 50 comps (randomized) in {t_pca:.1f} s "
          f"(explained variance {p.params['explained_variance_total']:.3f})")
    del X

    if not args.skip_umap:
        Z = p.coords[: args.umap_n]
        t = time.perf_counter()
        u = umap_embedding(Z, n_neighbors=15, seed=args.umap_seed, pca_dims=None)
        t_umap = time.perf_counter() - t
        res["umap"] = {"n": int(len(Z)), "input_dims": int(Z.shape[1]), "seconds": t_umap, "params": u.params}
        print(f"umap: {len(Z)} points of the 50-dim PCA coordinates -> 2-D in {t_umap:.1f} s "
              f"(seed={args.umap_seed}, numba compilation included)")
    res["peak_rss_mib"] = rss_mib()
    print(f"peak RSS overall {res['peak_rss_mib']:.0f} MiB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

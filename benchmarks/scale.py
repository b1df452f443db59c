"""How costs grow with the work: `python -m benchmarks.scale [--samples 4,32,256] [--dir /tmp/rsr_scale]`.

For each size (samples of the benchmark layout of `benchmarks.trace_io`: 28 timesteps x 4
layers x 5 recursion steps x 4096 tokens, K = 8, spatially coherent ids; `--probs` adds gate
probabilities, 8 float16 per record), in separate processes so each peak memory is its own:

1. write: the synthetic writer (traces.synthetic ids, the real `SamplingWriter`): file bytes
   per routing record, writer seconds per million records (generation excluded) and, as the
   time ratio of recording, writer time over the model time a record costs (`--model-us`,
   the measured sampling cost per routing record of the model the trace stands for);
2. floor: reading and decompressing `/routing/expert` chunk by chunk (one chunk = one
   (sample, timestep), no statistics): what no analysis can beat on this machine;
3. report: the report's analysis (`probes.analysis.analyze`, routing probes, no linear
   probes: what `probes.report --no-probes` computes), wall time, streaming-pass time and
   peak RSS of its process, and the streaming pass's ratio to the floor, in wall time and in
   CPU time of the fold alone (`pass_cpu_s`: barely moved by other jobs sharing the machine;
   for a --probs trace also against the floor that reads the probabilities too);
   floor and report alternate `--repeat` times (default 3); each figure is the fastest of its
   runs, every run kept in scale.json (`floor_runs`, `report_runs`);
   `--baseline CHECKOUT` runs the same measurement with another checkout's packages right
   after, on the same trace (before / after in one run);
4. dashboard (`--dashboard`, largest size): first page, routing-slider p95 and server
   memory, with `benchmarks.dashboard_latency`'s server-side measures.

Prints one JSON line per measurement and writes DIR/scale.json; deletes the traces unless
--keep. The SD3-medium projection is `python -m benchmarks.scale --project`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

T, LAYERS, STEPS, N, K = 28, [2, 6, 10, 14], 5, 4096, 8
RECORDS_PER_SAMPLE = T * len(LAYERS) * STEPS * N


def layout(probs: bool):
    from traces import SamplingLayout

    return SamplingLayout(n_experts=K, layers=LAYERS, steps=STEPS, tokens=N, timesteps=list(range(T)),
                          timestep_values=list(np.linspace(1000.0, 0.0, T, endpoint=False)), store_prob=probs)


def write(path: Path, samples: int, probs: bool, batch: int = 4) -> dict:
    """The trace of `samples` samples; times generation and the writer apart."""
    from traces import SampleTable, SamplingWriter, estimate_sampling
    from traces.synthetic import cell_routing, gate_probs

    lo = layout(probs)
    table = SampleTable(prompt=[f"prompt {i % 16}" for i in range(samples)], seed=list(range(samples)))
    rng = np.random.default_rng(1)
    gen_s = write_s = 0.0
    with SamplingWriter(path, lo, table, overwrite=True) as w:
        for b0 in range(0, samples, batch):
            b = min(batch, samples - b0)
            w.begin_batch(b)
            for t in range(T):
                t0 = time.perf_counter()
                e = cell_routing(0, b0, t, (b, 1, len(LAYERS), STEPS, N), K)
                extra = {"prob": gate_probs(rng, e, K)} if probs else {}
                t1 = time.perf_counter()
                w.write_timestep(t, e, **extra)
                gen_s, write_s = gen_s + t1 - t0, write_s + time.perf_counter() - t1
    records = samples * RECORDS_PER_SAMPLE
    size = path.stat().st_size
    return {"samples": samples, "records": records, "file_bytes": size, "bytes_per_record": size / records,
            "estimate_bytes": estimate_sampling(lo, samples, table).total, "generate_s": gen_s, "write_s": write_s,
            "write_s_per_M_records": write_s / records * 1e6}


def floor(path: Path, workers: int = 1) -> dict:
    """Read and decompress /routing/expert chunk by chunk, nothing else; with `workers` > 1
    also the same read split over that many forked processes by sample rows (the floor of
    a report folded by as many workers)."""
    import h5py
    import hdf5plugin  # noqa: F401 -- registers Blosc for h5py

    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    with h5py.File(path, "r") as f:
        d = f["/routing/expert"]
        for sl in d.iter_chunks():
            n += d[sl].size
        s, cpu = time.perf_counter() - t0, time.process_time() - c0
        out = {"records": n, "floor_s": s, "floor_records_per_s": n / s, "floor_cpu_s": cpu}
        if "/routing/prob" in f:  # a --probs trace: the report reads the probabilities too
            t0, c0 = time.perf_counter(), time.process_time()
            for sl in f["/routing/prob"].iter_chunks():
                f["/routing/prob"][sl]
            out["floor_probs_s"], out["floor_probs_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            out["floor_ids_and_probs_records_per_s"] = n / (s + out["floor_probs_s"])
        n_samples = f["/routing/expert"].shape[0]
    if workers > 1:
        import multiprocessing

        bounds = np.linspace(0, n_samples, workers + 1).astype(int)
        t0 = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            assert sum(pool.map(_read_rows, [(str(path), a, b) for a, b in zip(bounds[:-1], bounds[1:])])) == n
        out.update(workers=workers, parallel_floor_s=time.perf_counter() - t0)
    return out


def _read_rows(job: tuple[str, int, int]) -> int:
    """One floor worker: the chunks of sample rows a..b-1."""
    import h5py
    import hdf5plugin  # noqa: F401 -- registers Blosc for h5py

    path, a, b = job
    with h5py.File(path, "r") as f:
        d = f["/routing/expert"]
        return sum(d[sl].size for sl in d.iter_chunks() if a <= sl[0].start < b)


def report(path: Path, workers: int = 1) -> dict:
    """`stream_s` is the analysis's own timing (setup and the fold over every chunk); `pass_s`
    and `pass_cpu_s` time the fold alone (`probes.analysis.run.fold`, `run.stream` in older
    checkouts: reading, decompressing and every family's update), in wall and CPU time (with
    `workers` > 1: the workers' CPU time added)."""
    import resource

    import probes.analysis.run as run
    from probes.analysis import Options, analyze

    timings: dict = {}
    name = "fold" if hasattr(run, "fold") else "stream"
    fold = getattr(run, name)

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def timed_fold(*args, **kwargs):
        t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
        try:
            return fold(*args, **kwargs)
        finally:
            timings.update(pass_s=time.perf_counter() - t0,
                           pass_cpu_s=time.process_time() - c0 + children_cpu() - k0)

    setattr(run, name, timed_fold)
    t0 = time.perf_counter()
    parallel = {"workers": workers} if workers > 1 else {}  # a baseline checkout may have no `workers`
    r = analyze(str(path), Options(linear_probes=False), timings=timings, **parallel)
    total = time.perf_counter() - t0
    assert r["checks"]["invalid_records"] == 0 and r["checks"]["counts_vs_ids_max_abs_diff"] == 0
    records = int(r["checks"]["records"])
    return {"records": records, "workers": workers, "processes": timings.get("processes", 1), "report_s": total,
            "stream_s": timings["stream_s"], "pass_s": timings["pass_s"], "pass_cpu_s": timings["pass_cpu_s"],
            "stream_records_per_s": records / timings["stream_s"],
            "report_records_per_s": records / total}


def over_floor(floor_: dict, report_: dict) -> dict:
    """The streaming pass's time over the floor's, in wall time and (robust to other jobs on the
    machine) in CPU time; for a --probs trace also over the floor that reads the probabilities."""
    out = {"stream_over_floor": report_["stream_s"] / floor_["floor_s"],
           "pass_over_floor_cpu": report_["pass_cpu_s"] / floor_["floor_cpu_s"]}
    if "parallel_floor_s" in floor_:  # against the same read split over as many processes
        out["stream_over_parallel_floor"] = report_["stream_s"] / floor_["parallel_floor_s"]
    if "floor_probs_s" in floor_:
        out["stream_over_ids_and_probs_floor"] = report_["stream_s"] / (floor_["floor_s"] + floor_["floor_probs_s"])
        out["pass_over_ids_and_probs_floor_cpu"] = report_["pass_cpu_s"] / (
            floor_["floor_cpu_s"] + floor_["floor_probs_cpu_s"])
    return out


def fastest(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """The first run with each of `keys` (seconds) replaced by its smallest value over the runs,
    and the throughputs recomputed from them."""
    out = dict(runs[0])
    for key in keys:
        if key in out:
            out[key] = min(run[key] for run in runs)
    if "floor_s" in out:
        out["floor_records_per_s"] = out["records"] / out["floor_s"]
        if "floor_probs_s" in out:
            out["floor_ids_and_probs_records_per_s"] = out["records"] / (out["floor_s"] + out["floor_probs_s"])
    if "stream_s" in out:
        out["stream_records_per_s"] = out["records"] / out["stream_s"]
        out["report_records_per_s"] = out["records"] / out["report_s"]
    out["runs"] = len(runs)
    return out


def dashboard(path: Path, moves: int = 60) -> dict:
    """The report the dashboard needs (first analysis, in a child process as the dashboard runs
    it), then: `python -m dashboard` up, the first page drawn in headless Chromium (where
    chromedriver is installed) and the server's memory (warm cache), and routing-slider moves
    through the Flask stack (`benchmarks.dashboard_latency`'s measures)."""
    from benchmarks import dashboard_latency as dl
    from dashboard.app import create_app
    from dashboard.common import make_context

    dl.clear_cache(path)
    t0 = time.perf_counter()
    ctx = make_context([str(path)])
    tid = ctx.registry.ids()[0]
    ctx.registry.report(tid)
    first_report = time.perf_counter() - t0
    page = dl.first_page(path, browser=shutil.which("chromedriver") is not None)  # in Chromium where there is one
    slider = dl.routing_moves(create_app(ctx), tid, moves)
    return {"first_report_s": first_report, **page, "slider_p95_ms": slider["p95_ms"],
            "slider_median_ms": slider["median_ms"], "slider_bytes": slider["bytes_median"]}


def child(kind: str, path: Path, *extra: str, root: Path | None = None) -> dict:
    """Run one measurement in its own process, this file's measurement with the packages of
    checkout `root` (default this one); adds its wall time and peak RSS (wait4)."""
    root = root or ROOT
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(path), *extra]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"error: {kind} {path} failed ({p.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    return {**res, "process_wall_s": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024}


ROOT = Path(__file__).resolve().parents[1]


def run_child(argv: list[str]) -> None:
    kind, path = argv[0], Path(argv[1])
    if kind == "write":
        res = write(path, int(argv[2]), argv[3] == "probs")
    elif kind in ("floor", "report"):
        res = {"floor": floor, "report": report}[kind](path, *(int(a) for a in argv[2:3]))
    else:
        res = dashboard(path)
    print(json.dumps(res))


def project(ids: dict, probs: dict) -> list[dict]:
    """SD3-medium-size recording of 1,000 prompts (24 blocks with RSR, 4096 tokens at 1024 px,
    28 steps, K = 8, L = 3 as the paper's Table 4; guidance runs a cond and an uncond branch):
    size from `traces.estimate_sampling`, the writer's time from the per-record write cost
    measured here (`ids`: a routing-only run's largest size, `probs`: a --probs run's)."""
    from traces import SampleTable, SamplingLayout, estimate_sampling

    def lo(flags: str, **kw) -> tuple[str, SamplingLayout]:
        base = dict(n_experts=8, layers=list(range(24)), steps=3, tokens=4096, timesteps=list(range(28)),
                    branches=("cond", "uncond"))
        return flags, SamplingLayout(**{**base, **kw})

    cond, t4, t2 = ("cond",), list(range(0, 28, 4)), list(range(0, 28, 2))
    plans = [lo("(defaults: every layer, step, timestep, token, both branches)"),
             lo("--branches cond", branches=cond),
             lo("--probs", store_prob=True),
             lo("--probs --branches cond", store_prob=True, branches=cond),
             lo("--probs --branches cond --timesteps 0:28:2", store_prob=True, branches=cond, timesteps=t2),
             lo("--probs --branches cond --timesteps 0:28:4", store_prob=True, branches=cond, timesteps=t4),
             lo("--probs --branches cond --timesteps 0:28:4 --token-stride 4", store_prob=True, branches=cond,
                timesteps=t4, tokens=list(range(0, 4096, 4))),
             lo("--probs --branches cond --layers 0:24:4 --timesteps 0:28:4", store_prob=True, branches=cond,
                layers=list(range(0, 24, 4)), timesteps=t4)]
    table = SampleTable(prompt=[f"p{i}" for i in range(1000)], seed=list(range(1000)))
    rows = []
    for flags, layout_ in plans:
        records = 1000 * int(np.prod(layout_.cell_shape()))
        cost = probs if layout_.store_prob else ids
        est = estimate_sampling(layout_, 1000, table).total
        rows.append({"flags": flags, "records": records, "estimate_gb": est / 1e9,
                     "measured_gb": records * cost["bytes_per_record"] / 1e9,
                     "writer_s": records * cost["write_s_per_M_records"] / 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        run_child(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="4,32,256", help="sizes in samples (x 16.1 M records each)")
    ap.add_argument("--probs", action="store_true", help="store gate probabilities too (bigger files)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/rsr_scale"))
    ap.add_argument("--dashboard", action="store_true", help="measure the dashboard on the largest trace")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--project", nargs=2, type=Path, metavar=("IDS_JSON", "PROBS_JSON"),
                    help="print the SD3-medium projection from the scale.json of a routing-only and a --probs run")
    ap.add_argument("--repeat", type=int, default=3, help="floor and report runs per size (the fastest counts)")
    ap.add_argument("--workers", type=int, default=1,
                    help="fold the report in this many processes (probes.analysis.parallel); the floor is "
                         "then also read by as many")
    ap.add_argument("--skip-report-above", type=int, default=10**9, help="no report above this many samples")
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="also run the report with the code of another checkout (e.g. `git worktree add /tmp/before "
                         "COMMIT`) on the same traces, right after this one's: before/after in one run")
    args = ap.parse_args(argv)
    for flag, value in (("--repeat", args.repeat), ("--workers", args.workers)):
        if value < 1:
            print(f"error: {flag} {value}: give at least 1", file=sys.stderr)
            return 2
    if args.baseline is not None and not (args.baseline / "probes" / "analysis").is_dir():
        print(f"error: --baseline {args.baseline}: not a checkout of this project (no probes/analysis/)",
              file=sys.stderr)
        return 2
    if args.project:
        ids, probs = (json.loads(p.read_text())[-1]["write"] for p in args.project)
        print(json.dumps(project(ids, probs), indent=1))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    sizes = [int(s) for s in args.samples.split(",")]
    for n in sizes:
        path = args.dir / f"scale_{n}{'_probs' if args.probs else ''}.h5"
        row = {"samples": n, "probs": args.probs, "write": child("write", path, str(n),
                                                                  "probs" if args.probs else "ids")}
        print(json.dumps(row), flush=True)
        # floor and report alternate --repeat times; each figure is its fastest run (what the
        # machine can do: other jobs only ever slow a run down), with every run kept beside it
        floors, reports = [], []
        for _ in range(args.repeat):
            floors.append(child("floor", path, str(args.workers)))
            print(json.dumps(floors[-1]), flush=True)
            if n <= args.skip_report_above:
                reports.append(child("report", path, str(args.workers)))
                reports[-1].update(over_floor(floors[-1], reports[-1]))
                print(json.dumps(reports[-1]), flush=True)
        row["floor"] = fastest(floors, ("floor_s", "floor_cpu_s", "floor_probs_s", "floor_probs_cpu_s",
                                        "parallel_floor_s"))
        row["floor_runs"] = floors
        if reports:
            row["report"] = fastest(reports, ("report_s", "stream_s", "pass_s", "pass_cpu_s"))
            row["report"].update(over_floor(row["floor"], row["report"]))
            row["report_runs"] = reports
            print(json.dumps({"fastest": True, **row["floor"], **row["report"]}), flush=True)
            if args.baseline is not None:
                row["baseline_report"] = child("report", path, root=args.baseline)
                row["baseline_report"].update(over_floor(row["floor"], row["baseline_report"]))
                print(json.dumps({"baseline": str(args.baseline), **row["baseline_report"]}), flush=True)
        if args.dashboard and n == sizes[-1]:
            row["dashboard"] = child("dashboard", path)
            print(json.dumps(row["dashboard"]), flush=True)
        results.append(row)
        (args.dir / "scale.json").write_text(json.dumps(results, indent=1))
        if not args.keep:
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m probes.report TRACE [--json OUT] [--figures DIR] [--timestep-bins N] [--permutations N]`

Computes the probes over a trace (streaming; `probes.analysis`), prints a summary
table per layer and recursion step, and optionally writes the JSON and PNG figures:

    --json OUT        the full result (documented in probes/REPORT.md)
    --figures DIR     expert_share_by_timestep.png (paper Fig. 4: stacked expert share vs diffusion
                      timestep, one panel per recursion step, a row per layer) and, when the trace
                      has latents, latent_trajectories.png (paper Fig. 3: PCA of h_l, lines
                      joining recursion steps, coloured by diffusion timestep)
    --derive          first store PCA projections of the latents under /derived (probes.projections)
    --compare OTHER   also routing stability against another trace with the same grid
                      (e.g. another checkpoint, same prompts and seeds)
    --no-probes       skip the linear probes (the slowest part)
    --workers N       fold a sampling trace in up to N processes (at most the CPUs this process
                      may use, one per written sample; probes.analysis.parallel): the same
                      report, float sums to rounding. A trace that may still be written is
                      refused; a killed run's recorded on this host is split
    --overwrite       replace existing output files (never replaced otherwise)

Bad input (missing or foreign trace, existing output without --overwrite, unwritable
output): one line `error: ...` on stderr, exit code 2.

The JSON is documented, key by key and versioned, in `probes/REPORT.md` (schema
"rsr-report"); `tests/test_report.py` checks a real report against that document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli_common.command import Parser, guard_startup, int_at_least, positive_int, run_main, worker_count
from cli_common.errors import UserError
from cli_common.outputs import check_output, write_atomic

guard_startup(__name__)  # before numpy: Ctrl-C while it loads exits 130 with one line

import numpy as np

FIGURES = ("expert_share_by_timestep.png", "latent_trajectories.png")


class ReportError(UserError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m probes.report", description=__doc__.splitlines()[0], version=True)
    p.add_argument("trace", type=Path)
    p.add_argument("--json", type=Path, help="write the full result as JSON here")
    p.add_argument("--figures", type=Path, help="write PNG figures into this directory")
    p.add_argument("--timestep-bins", type=positive_int, default=4)
    p.add_argument("--permutations", type=int_at_least(0), default=199, help="permutation-null tables per MI (0: none)")
    p.add_argument("--max-latent-points", type=positive_int, default=20000)
    p.add_argument("--no-probes", action="store_true", help="skip the linear probes")
    p.add_argument("--workers", type=worker_count, default=1,
                   help="processes that fold a sampling trace (default 1; at most the CPUs available)")
    p.add_argument("--derive", action="store_true", help="store PCA of the latents under /derived first")
    p.add_argument("--compare", type=Path, help="another trace with the same grid (checkpoint stability)")
    p.add_argument("--routing-value", type=Path,
                   help="a probes.routing_value JSON of the trace's checkpoint: adds it and uses it in the verdicts")
    p.add_argument("--overwrite", action="store_true")
    return p


# --------------------------------------------------------------------------- table


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return fmt.format(x)


def _mean(x) -> float | None:
    a = np.asarray(x, dtype=float) if x is not None else np.array([np.nan])
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


def _training_curve_lines(curves: dict | None) -> list[str]:
    """One line per window of training steps (means over layers and recursion steps)."""
    if not curves:
        return []
    lines = ["specialization over training (means over layers and steps; MI of expert with timestep bin and step):",
             f"{'steps':>11} {'loss':>7} {'Hgate':>6} {'margin':>6} {'AMI(t)':>7} {'p(t)':>5} {'MI(step)':>8} "
             f"{'p(s)':>5}"]
    for w, (a, b) in enumerate(zip(curves["window_start_step"], curves["window_end_step"])):
        if a is None:
            continue
        pick = lambda key, sub: _mean(curves[key][sub][w])
        entropy = _mean(curves["gate_norm_entropy"][w]) if curves.get("gate_norm_entropy") else None
        margin = _mean(curves["gate_margin"][w]) if curves.get("gate_margin") else None
        lines.append(f"{f'{a}-{b}':>11} {_f((curves.get('loss') or [None] * (w + 1))[w], '{:.4f}'):>7} "
                     f"{_f(entropy, '{:.3f}'):>6} {_f(margin, '{:.3f}'):>6} {_f(pick('mi_timestep_bin', 'ami')):>7} "
                     f"{_f(pick('mi_timestep_bin', 'p_value'), '{:.2g}'):>5} {_f(pick('mi_recursion_step', 'mi')):>8} "
                     f"{_f(pick('mi_recursion_step', 'p_value'), '{:.2g}'):>5}")
    return lines


def _step_row(layer: str, step: str, d: dict, transition: dict | None) -> str:
    """One row of the summary table: load, router, MI, transitions, spatial, stability of a step."""
    ld, gate, mi = d["load"], d.get("gate", {}), d.get("mi", {})
    share = " ".join(_f(s, "{:.2f}") for s in ld["share"])
    mt, mp = mi.get("timestep_bin", {}), mi.get("position", {})
    others = {k: v for k, v in mi.items() if k not in ("timestep_bin", "position")}
    best = "-"
    if others:
        k, v = max(others.items(), key=lambda kv: kv[1].get("ami") or -1)
        best = f"{k} AMI={_f(v.get('ami'))} p={_f(v.get('p_value'), '{:.2g}')}"
    pc = f"{_f(transition['persistence'], '{:.2f}')}/{_f(transition['chance'], '{:.2f}')}" if transition else "-"
    sp = d.get("spatial")
    spc = f"{_f(sp['same'], '{:.2f}')}/{_f(sp['chance'], '{:.2f}')}" if sp else "-"
    st = d.get("stability", {})
    return (f"{layer:>5} {step:>4} | {share:<24} {_f(ld['cv'], '{:.2f}'):>5} {_f(ld['max_vio'], '{:.2f}'):>6} "
            f"{_f(ld['norm_entropy'], '{:.2f}'):>5} {_f(ld['effective_experts'], '{:.2f}'):>5} {ld['n_dead']:>4} | "
            f"{_f(gate.get('mean_entropy'), '{:.2f}'):>5} {_f(gate.get('mean_margin'), '{:.2f}'):>6} "
            f"{_f(gate.get('balance'), '{:.2f}'):>5} {_f(gate.get('soft_mi'), '{:.3f}'):>6} | "
            f"{_f(mt.get('mi')):>6} {_f(mt.get('ami')):>6} {_f(mp.get('mi')):>7} {best:<22} | {pc:>10} | "
            f"{spc:>9} | {_f(st.get('seeds', {}).get('kappa'), '{:.2f}'):>5} "
            f"{_f(st.get('adjacent_timesteps', {}).get('kappa'), '{:.2f}'):>5}")


def _header_lines(r: dict) -> list[str]:
    t, c = r["trace"], r["checks"]
    head = (f"{'layer':>5} {'step':>4} | {'load share':<24} {'CV':>5} {'MaxVio':>6} {'Hnorm':>5} {'Eff':>5} "
            f"{'dead':>4} | {'Hgate':>5} {'margin':>6} {'bal':>5} {'softMI':>6} | {'MI(t)':>6} {'AMI(t)':>6} "
            f"{'MI(pos)':>7} {'best label':<22} | {'persist/ch':>10} | {'spat/ch':>9} | {'seedK':>5} {'adjK':>5}")
    return [f"trace {t['path']}  kind={t['kind']}  K={t['experts']}  layers={t['layers']}  steps={t['steps']}  "
            + (f"samples={t.get('samples')} timesteps={len(t.get('timesteps', []))} branches={t.get('branches')}"
               if t["kind"] == "sampling" else f"events={t.get('events')}"),
            f"checks: counts vs ids max |diff| = {c['counts_vs_ids_max_abs_diff']}, "
            f"share sums max |dev| = {_f(c['share_sum_max_abs_dev'], '{:.1e}')}, "
            f"invalid records = {c['invalid_records']}",
            head, "-" * len(head)]


def summary_table(r: dict) -> str:
    lines = _header_lines(r)
    for layer, lo in r["layers"].items():
        steps = list(lo["steps"])
        for i, (step, d) in enumerate(lo["steps"].items()):
            key = f"{step}->{steps[i + 1]}" if i + 1 < len(steps) else None
            lines.append(_step_row(layer, step, d, lo.get("transitions", {}).get(key)))
        cv = lo.get("convergence")
        if cv:
            shares = ", ".join(f"{n} {_f(s, '{:.2f}')}" for n, s in zip(cv["labels"], cv["label_share"]))
            lines.append(f"      layer {layer} latents: rho={_f(cv['rho'])} step cos={[_f(x) for x in cv['step_cos']]} "
                         f"rel step={[_f(x) for x in cv['rel_step']]}  trajectories: {shares}")
    for layer, lo in r["layers"].items():
        for step, d in lo["steps"].items():
            if "verdict" in d:
                lines.append(f"verdict layer {layer} step {step}: {d['verdict']['text']}")
    lines += _training_curve_lines(r.get("training_curves"))
    if "routing_value" in r:
        from .routing_value import summary_lines

        lines += ["routing value (flow-matching loss on held-out batches; value = 1 - gate/random):",
                  *summary_lines(r["routing_value"])]
    for layer, probes in r.get("linear_probes", {}).items():
        parts = [f"{k} {_f(v.get('accuracy'), '{:.2f}')} (shuffled {_f(v.get('baseline'), '{:.2f}')})"
                 for k, v in probes.items() if "accuracy" in v]
        lines.append(f"linear probes, layer {layer}: " + "; ".join(parts))
    lines.append("columns: load share per expert; CV, MaxVio, normalised load entropy, effective experts, dead "
                 "experts; gate entropy (nats), top-1 margin, balance K*sum f*P, soft MI; MI/AMI with the timestep "
                 "bin, MI with position; the label with the highest AMI; persistence to the next step vs chance; "
                 "same-expert neighbours vs chance; Cohen's kappa across seeds and adjacent timesteps")
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    """A PNG whole or not at all."""
    import io

    data = io.BytesIO()
    fig.savefig(data, dpi=110, format="png")
    write_atomic(path, data.getvalue())


def trace_status(trace) -> str | None:
    """None for a cleanly closed trace, else the line a reader must see first: the trace is
    still being written, or its writer stopped without closing (killed, crashed, disk full)."""
    if trace.complete:
        return None
    if trace.kind == "sampling":
        planned, done = trace.dataset("/coords/sample").shape[0], int(trace.final_written.sum())
        amount = f"{done} of {planned} planned samples written"
    else:
        amount = f"{trace.n_events} routing events and {int(trace.dataset('/progress/logs')[0])} logged steps written"
    if trace.live:  # the one definition: traces.reader.TraceReader.live
        return f"live: still being written ({amount} so far); the numbers below will change"
    return f"incomplete: {amount} (the recorder did not close cleanly)"


# --------------------------------------------------------------------------- figures


def figure_expert_share(r: dict, path: Path) -> None:
    """Paper Fig. 4: expert share vs diffusion timestep, one panel per recursion step (rows: layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = r["layers"]
    steps = max(len(lo["steps"]) for lo in layers.values())
    K = r["trace"]["experts"]
    fig, axes = plt.subplots(len(layers), steps, figsize=(3.2 * steps + 1.2, 2.8 * len(layers)), squeeze=False,
                             sharey=True)
    colors = plt.get_cmap("tab10" if K <= 10 else "tab20")(np.arange(K) % (10 if K <= 10 else 20))
    sampling = r["trace"]["kind"] == "sampling"
    for i, (layer, lo) in enumerate(layers.items()):
        for j, (step, d) in enumerate(lo["steps"].items()):
            ax = axes[i, j]
            if sampling:
                sb = d["share_by_timestep"]
                x = np.asarray(sb["timestep_value"], float)
                y = np.nan_to_num(np.asarray(sb["share"], float))
            else:
                x = np.asarray([0.5 * (b["t_min"] + b["t_max"]) for b in r["timestep_bins"]])
                y = np.nan_to_num(np.asarray([b["share"] for b in d["load_by_timestep_bin"]], float))
            order = np.argsort(x)
            if len(x) > 1:
                ax.stackplot(x[order], y[order].T, colors=colors, labels=[f"expert {k}" for k in range(K)])
            else:
                bottom = 0.0
                for k in range(K):
                    ax.bar(x, y[:, k], bottom=bottom, color=colors[k], width=50, label=f"expert {k}")
                    bottom = bottom + y[:, k]
            ax.set_xlim(x.max() if len(x) else 1000, x.min() if len(x) else 0)  # noise (high t) on the left
            ax.set_ylim(0, 1)
            ax.set_title(f"layer {layer}, recursion step {step}", fontsize=9)
            if i == len(layers) - 1:
                ax.set_xlabel("diffusion timestep")
            if j == 0:
                ax.set_ylabel("expert share")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("Expert share by diffusion timestep, per recursion step", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / (3.2 * steps + 1.2), 0.95))
    _save_figure(fig, path)
    plt.close(fig)


def figure_latent_trajectories(tr, path: Path, n_timesteps: int = 6) -> list[dict[str, Any]]:
    """Paper Fig. 3: latent trajectories across recursion steps for several diffusion timesteps,
    as `probes.trajectories` defines them (image-mean h_l of the first layer and branch, PCA with
    2 components fitted on those means; its docstring says why). Thin lines: one sample; thick
    lines with step labels: the mean over samples; colour: diffusion timestep. Returns the lines
    drawn (`probes.trajectories.trajectory_lines`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .trajectories import latent_trajectories, trajectory_lines

    traj = latent_trajectories(tr)
    lines = trajectory_lines(traj, n_timesteps)
    tv = traj["timestep_values"]
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(vmin=tv.min(), vmax=tv.max() if tv.max() > tv.min() else tv.min() + 1)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for line in lines:
        colr = cmap(norm(line["timestep_value"]))
        for xy in line["samples"].values():
            ax.plot(xy[:, 0], xy[:, 1], "-", color=colr, alpha=0.35, lw=0.9)
        mean = line["mean"]
        ax.plot(mean[:, 0], mean[:, 1], "-o", color=colr, lw=2.4, ms=5, label=f"t={line['timestep_value']:.0f}")
        ax.plot(mean[-1, 0], mean[-1, 1], "s", color=colr, ms=8, mec="k")
        for k, step in enumerate(line["steps"]):
            ax.annotate(f"l={step}", mean[k], fontsize=7, xytext=(3, 3), textcoords="offset points")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=norm), ax=ax, label="diffusion timestep")
    ev = traj["explained_variance_ratio"]
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}%)")
    ax.set_title(f"Latent trajectories across recursion steps (layer {traj['layer']}, {traj['branch']}; "
                 f"token-mean h_l, square = last step)", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return lines


# --------------------------------------------------------------------------- CLI


def _read_routing_value(path: Path) -> dict:
    from .routing_value import check_result

    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"--routing-value {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ReportError(f"--routing-value {path}: not a JSON file ({type(e).__name__})") from None
    return check_result(value, f"--routing-value {path}")


def _check_same_checkpoint(trace, value: dict, path: Path) -> None:
    """A routing value decides verdicts only for the checkpoint it was measured on: the trace and
    the result must both name their checkpoint by content, and name the same one."""
    if trace.kind != "sampling":  # a training trace spans many weights, not one checkpoint
        raise ReportError(f"--routing-value {path}: a routing value belongs to one checkpoint; "
                          f"this is a training trace (use it with a sampling trace of that checkpoint)")
    a, b = trace.attrs.get("checkpoint_sha256"), value["checkpoint_sha256"]
    if not a:
        raise ReportError(f"--routing-value {path}: the trace {trace.path} does not record its checkpoint's "
                          f"sha256, so the routing value cannot be matched to it")
    if a != b:
        raise ReportError(f"--routing-value {path} was measured on another checkpoint than the trace's "
                          f"(sha256 {b[:12]} vs {a[:12]})")


def _check_inputs(args) -> dict | None:
    """Every input judged before any work (and before --derive writes anything): outputs that
    are not inputs, the trace readable, a routing value of the trace's own checkpoint."""
    from traces import open_trace

    from .analysis.parallel import splittable

    inputs = {"trace": args.trace, "--compare": args.compare, "--routing-value": args.routing_value}
    check_output(args.json, args.overwrite, flag="--json", inputs=inputs)
    check_output(args.figures, args.overwrite, flag="--figures", folder=True, inputs=inputs)
    for name in FIGURES:
        check_output(args.figures and args.figures / name, args.overwrite, flag="--figures", inputs=inputs)
    value = _read_routing_value(args.routing_value) if args.routing_value else None
    with open_trace(args.trace) as tr:
        if value is not None:
            _check_same_checkpoint(tr, value, args.routing_value)
        if args.workers > 1 and tr.kind != "sampling":
            raise ReportError(f"--workers {args.workers}: a training trace is folded in one process "
                              "(its curves follow the events in order); leave --workers out")
        if args.workers > 1 and not splittable(tr):
            raise ReportError(f"--workers {args.workers}: the trace is incomplete and its writer may still be "
                              "running (here, or on another host), so it is folded in one process; leave "
                              "--workers out")
    return value


def run(args) -> dict:
    from traces import open_trace

    from .analysis import Options, analyze, compare_traces, jsonable
    from .verdict import add_verdicts

    value = _check_inputs(args)
    derived = None
    if args.derive:
        from .projections import derive

        derived = derive(args.trace, overwrite=args.overwrite)
    t0 = time.perf_counter()
    opt = Options(n_bins=args.timestep_bins, n_perm=args.permutations, max_latent_points=args.max_latent_points,
                  linear_probes=not args.no_probes)
    with open_trace(args.trace) as tr:
        status = trace_status(tr)
        r = analyze(tr, opt, workers=args.workers)
    if args.compare:
        r["compare"] = compare_traces(args.trace, args.compare, n_bins=args.timestep_bins)
    if derived is not None:
        r["derived"] = derived
    if value is not None:
        r["routing_value"] = value
        add_verdicts(r, value)
    r["elapsed_s"] = round(time.perf_counter() - t0, 3)
    r = jsonable(r)
    print("\n".join(([status] if status else []) + [summary_table(r)]))
    if args.json:
        write_atomic(args.json, json.dumps(r, indent=1))
        print(f"wrote {args.json}")
    if args.figures:
        out = args.figures / "expert_share_by_timestep.png"
        figure_expert_share(r, out)
        print(f"wrote {out}")
        if r["trace"]["kind"] == "sampling" and r["trace"]["has_latents"]:
            out = args.figures / "latent_trajectories.png"
            with open_trace(args.trace) as tr:
                figure_latent_trajectories(tr, out)
            print(f"wrote {out}")
        else:
            print("no latents in the trace: latent trajectory figure skipped")
    return r


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

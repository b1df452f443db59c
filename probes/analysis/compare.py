"""Routing stability across two traces with the same grid (e.g. two checkpoints)."""

from __future__ import annotations

from typing import Any

import numpy as np

from traces import TraceError, TraceReader, open_trace

from ..stats import AgreementAccumulator, AgreementStats, agreement_stats
from .results import jsonable, stats_at
from .setup import Options, grid_of


def _check_same_grid(a: TraceReader, b: TraceReader) -> int:
    """The number of common samples; raises TraceError unless the grids, prompts and seeds match."""
    if a.kind != "sampling" or b.kind != "sampling":
        raise TraceError("compare_traces needs two sampling traces")
    for key in ("layer", "step", "token", "timestep", "branch", "expert"):
        if not np.array_equal(np.asarray(a.coords[key]), np.asarray(b.coords[key])):
            raise TraceError(f"traces differ in their {key} coordinate; they must share a grid")
    samples_a, samples_b = a.samples(), b.samples()
    n = min(a.n_samples, b.n_samples)
    if (list(samples_a["prompt"][:n]) != list(samples_b["prompt"][:n])
            or not np.array_equal(samples_a["seed"][:n], samples_b["seed"][:n])):
        raise TraceError("traces differ in prompts or seeds of their common samples")
    return n


def weighted_agreement(cells: AgreementStats) -> dict[str, float | int | None]:
    """Agreement, chance and Cohen's kappa over every (layer, step) cell: the means of the cells'
    values weighted by their records. Not the kappa of the pooled table: expert k of one layer is
    not expert k of another, so their tables are not summed; each cell's kappa is against its own
    chance agreement. The one summary the report and the dashboard's Compare tab show."""
    n = np.asarray(cells.n, float).reshape(-1)
    out: dict[str, float | int | None] = {"n": int(n.sum())}
    for key in ("agreement", "chance", "kappa"):
        v = np.asarray(getattr(cells, key), float).reshape(-1)
        ok = np.isfinite(v) & (n > 0)
        out[key] = float(np.sum(v[ok] * n[ok]) / n[ok].sum()) if ok.any() else None
    return out


def compare_traces(path_a, path_b, n_bins: int = 4) -> dict[str, Any]:
    """Agreement and Cohen's kappa per layer and recursion step between two traces (same
    prompts and seeds), streaming both chunk by chunk. Raises TraceError if the grids differ."""
    with open_trace(path_a) as a, open_trace(path_b) as b:
        n = _check_same_grid(a, b)
        grid = grid_of(a, Options(n_bins=n_bins))
        k, n_layers, n_steps = grid.n_experts, len(grid.layers), len(grid.steps)
        agreement = AgreementAccumulator(k, (n_layers, n_steps, grid.n_bins))
        layer_index, step_index = np.arange(n_layers).reshape(-1, 1, 1), np.arange(n_steps).reshape(1, -1, 1)
        for block in a.iter_chunks("/routing/expert", sample=slice(0, n)):
            coords = block.coords
            time = int(np.nonzero(grid.timesteps == coords["timestep"])[0][0])
            if not b.written[int(coords["sample"]), time]:
                continue
            x = block.data
            y = b.routing(sample=int(coords["sample"]), branch=str(coords["branch"]), timestep=time)
            valid = (x < k) & (y < k)
            time_bin = grid.bin_of(coords)
            if valid.all():
                agreement.update(x, y, layer_index, step_index, time_bin)
            else:
                agreement.update(x[valid], y[valid], np.broadcast_to(layer_index, valid.shape)[valid],
                                 np.broadcast_to(step_index, valid.shape)[valid], time_bin)
        confusion = agreement.counts.result()
        total, per_bin = agreement_stats(confusion.sum(axis=2)), agreement_stats(confusion)
        at = lambda index: {**stats_at(total, index, drop=("confusion",)),
                            "by_timestep_bin": [stats_at(per_bin, index + (t,), drop=("confusion",))
                                                for t in range(grid.n_bins)]}
        return jsonable({
            "a": str(a.path), "b": str(b.path), "overall": weighted_agreement(total),
            "checkpoint_sha256": [a.attrs.get("checkpoint_sha256"), b.attrs.get("checkpoint_sha256")],
            "layers": {str(layer): {str(step): at((li, si)) for si, step in enumerate(grid.steps)}
                       for li, layer in enumerate(grid.layers)},
        })

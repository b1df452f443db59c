"""Projections of stored latents written back into the trace under `/derived`, so a dashboard
reads them instead of recomputing.

    python -m probes.derive TRACE [--components 3] [--umap] [--umap-points 5000] [--overwrite]
    python -m probes.report TRACE --derive ...           (same, before the report)

What is written is registered in the trace schema (`traces.schema.DERIVED`, documented in
traces/SCHEMA.md, "Derived projections") and written through `traces.derived.open_derived`:
PCA coordinates of every stored latent on the latents' grid (one PCA per layer: latent spaces
of layers differ), the fitted components, means and explained variance ratios with the
parameters used, and optionally a UMAP of a subsample with each point's grid position.

When it may write: the trace must be complete (its writer closed cleanly) — a live or killed
trace is refused — and nobody may have it open (a reader such as the dashboard, a recorder, another
derive: one-line error). From its first read to its last write the derive holds the trace's writer
lock (`traces.writer.writer_lock`), so a recorder's --overwrite is refused meanwhile. The projections
are written into a copy of the trace that replaces it in one rename (`traces.derived`): a kill at
any moment leaves the original trace readable. Existing projections are replaced only with
overwrite=True. PCA is fitted on a subsample of at most `fit_points`
latents per layer, then every latent is projected chunk by chunk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cli_common.errors import UserError
from traces import open_trace
from traces.derived import open_derived
from traces.writer import writer_lock

from .stats import pca, umap_embedding


class DeriveError(UserError):
    """One-line user error (the CLI prints it and exits 2)."""


def _collect(tr, fit_points: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer position: (latents (n, D) float32, grid index (n, 6)) subsample, chunk by chunk."""
    shape = tr.dataset("/latents/h").shape
    nl, ns, nst = shape[3], shape[4], shape[5]
    n_blocks = max(1, int(tr.written.sum()) * shape[1])
    per_block = max(1, min(nst, fit_points // max(1, n_blocks * ns)))
    rng = np.random.default_rng(seed)
    X: dict[int, list] = {l: [] for l in range(nl)}
    I: dict[int, list] = {l: [] for l in range(nl)}
    bpos = {str(b): i for i, b in enumerate(tr.coords["branch"])}
    tpos = {int(t): i for i, t in enumerate(tr.coords["timestep"])}
    for blk in tr.iter_chunks("/latents/h"):
        c = blk.coords
        pick = np.sort(rng.choice(nst, size=per_block, replace=False))
        for l in range(nl):
            for s in range(ns):
                v = blk.data[l, s, pick].astype(np.float32)
                ok = np.isfinite(v).all(axis=1)
                X[l].append(v[ok])
                idx = np.stack([np.full(len(pick), int(c["sample"])), np.full(len(pick), bpos[str(c["branch"])]),
                                np.full(len(pick), tpos[int(c["timestep"])]), np.full(len(pick), l),
                                np.full(len(pick), s), pick], axis=1)[ok]
                I[l].append(idx)
    return {l: (np.concatenate(X[l]) if X[l] else np.zeros((0, shape[-1]), np.float32),
                np.concatenate(I[l]) if I[l] else np.zeros((0, 6), np.int64)) for l in range(nl)}


def derive(path: str | Path, n_components: int = 3, fit_points: int = 20000, umap: bool = False,
           umap_points: int = 5000, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Compute PCA (and optionally UMAP) of the trace's latents and store them under /derived.

    Returns a summary dict (what was written, with parameters). Raises DeriveError/TraceError.
    """
    path = Path(path)
    if seed < 0:
        raise DeriveError(f"--seed must be >= 0, got {seed}")
    open_trace(path).close()  # a missing, foreign or damaged trace: its own one-line error first
    with writer_lock(path):  # held from the first read to the swap: nobody replaces the trace in between
        return _derive_locked(path, n_components, fit_points, umap, umap_points, seed, overwrite)


def _derive_locked(path: Path, n_components: int, fit_points: int, umap: bool, umap_points: int, seed: int,
                   overwrite: bool) -> dict[str, Any]:
    with open_trace(path) as tr:
        if tr.kind != "sampling" or not tr.has("/latents/h"):
            raise DeriveError(f"{path}: no stored latents (/latents/h); record with --latent-tokens N")
        if not tr.complete:
            raise DeriveError(f"{path}: trace is not complete (live or killed writer); /derived is written "
                              f"only into finished traces")
        if tr.has("/derived") and not overwrite:
            raise DeriveError(f"{path}: /derived exists; pass --overwrite to replace it")
        samples = _collect(tr, fit_points, seed)
        shape = tr.dataset("/latents/h").shape
        layers = [int(x) for x in tr.coords["layer"]]
        steps_written = tr.steps
    fits = {}
    for l, (X, _) in samples.items():
        if len(X) < 2:
            raise DeriveError(f"{path}: too few written latents for a projection")
        fits[l] = pca(X, n_components=n_components, method="full" if X.shape[1] <= 256 else "randomized",
                      seed=seed)
    k = min(f.params["n_components"] for f in fits.values())
    ump = {}
    if umap:
        for l, (X, idx) in samples.items():
            if len(X) > umap_points:
                keep = np.sort(np.random.default_rng(seed).choice(len(X), umap_points, replace=False))
                X, idx = X[keep], idx[keep]
            ump[l] = (umap_embedding(X, n_components=2, seed=seed, n_neighbors=min(15, max(2, len(X) - 1))), idx)
    comps = np.stack([fits[l].components[:k] for l in range(len(layers))])
    means = np.stack([fits[l].mean for l in range(len(layers))])
    with open_derived(path, source="/latents/h", trace_steps=steps_written) as out:
        coords = out.create("/derived/pca/coords", shape=tuple(shape[:-1]) + (k,))
        out.create("/derived/pca/components", comps)
        out.create("/derived/pca/mean", means)
        out.create("/derived/pca/explained_variance_ratio",
                   np.stack([fits[l].explained_variance_ratio[:k] for l in range(len(layers))]))
        out.set_attrs("/derived/pca", method="pca", params=json.dumps({str(layers[l]): fits[l].params for l in fits}),
                      n_components=k,
                      fit_points=json.dumps({str(layers[l]): int(len(samples[l][0])) for l in samples}))
        src = out.file["latents/h"]
        written = out.file["progress/written"][: shape[0]].astype(bool)
        for s in range(shape[0]):
            for t in range(shape[2]):
                if not written[s, t]:
                    continue
                h = src[s, :, t].astype(np.float32)  # (branch, layer, step, tok, D)
                coords[s, :, t] = np.einsum("blstd,lkd->blstk", h - means[None, :, None, None, :], comps)
        if ump:
            out.create("/derived/umap/coords", np.concatenate([ump[l][0].coords for l in sorted(ump)]))
            out.create("/derived/umap/index", np.concatenate([ump[l][1] for l in sorted(ump)]))
            out.set_attrs("/derived/umap", method="umap",
                          params=json.dumps({str(layers[l]): ump[l][0].params for l in ump}),
                          index_columns=json.dumps(["sample", "branch", "timestep", "layer", "step", "stored_token"]))
    return {"pca": {"n_components": k, "params": {str(layers[l]): fits[l].params for l in fits}},
            "umap": {str(layers[l]): ump[l][0].params for l in ump} if ump else None}


def load_derived(path: str | Path) -> dict[str, Any]:
    """Read /derived back: {'pca': {coords, components, mean, explained_variance_ratio, params},
    'umap': {coords, index, params} | None}; {} if the trace has none."""
    with open_trace(path) as tr:
        if not tr.has("/derived"):
            return {}
        out: dict[str, Any] = {}
        if tr.has("/derived/pca"):
            d = tr.dataset("/derived/pca/coords")
            g = d.parent
            out["pca"] = {"coords": d[()], "components": g["components"][()], "mean": g["mean"][()],
                          "explained_variance_ratio": g["explained_variance_ratio"][()],
                          "params": json.loads(g.attrs["params"]), "fit_points": json.loads(g.attrs["fit_points"])}
        if tr.has("/derived/umap"):
            d = tr.dataset("/derived/umap/coords")
            g = d.parent
            out["umap"] = {"coords": d[()], "index": g["index"][()], "params": json.loads(g.attrs["params"]),
                           "index_columns": json.loads(g.attrs["index_columns"])}
        return out


def main(argv: list[str] | None = None) -> int:
    from cli_common.command import Parser, int_at_least, run_main

    p = Parser(prog="python -m probes.derive",
               description="Store PCA/UMAP projections of a trace's latents under /derived.", version=True)
    p.add_argument("trace", type=Path)
    p.add_argument("--components", type=int, default=3)
    p.add_argument("--fit-points", type=int, default=20000)
    p.add_argument("--umap", action="store_true", help="also a UMAP embedding of a subsample (slow: numba start-up)")
    p.add_argument("--umap-points", type=int, default=5000)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--overwrite", action="store_true")
    def body() -> None:
        a = p.parse_args(argv)
        if a.components < 1 or a.fit_points < 2 or a.umap_points < 4:
            raise DeriveError("--components >= 1, --fit-points >= 2, --umap-points >= 4")
        r = derive(a.trace, a.components, a.fit_points, a.umap, a.umap_points, a.seed, a.overwrite)
        print(f"wrote /derived into {a.trace}: pca ({r['pca']['n_components']} components)"
              + (" and umap" if r["umap"] else ""))

    return run_main(body)

"""HDF5 filters used by the writer, and the measurement that chose them.

The choice (see SCHEMA.md, "Compression") is Blosc + zstd level 3 + bit-shuffle for expert ids:
expert ids use at most 3 of 8 bits when K <= 8, bit-shuffle turns the 5 empty bit planes into
runs that cost nothing, and zstd then finds the spatial coherence. Readers need `hdf5plugin`
imported, which this package always does; gzip would be the only filter every HDF5 tool
can read without it, and it is kept in the comparison for that reason.
"""

from __future__ import annotations

import io
import time
from typing import Any

import h5py
import hdf5plugin
import numpy as np

# Filter keyword sets for h5py.create_dataset, by role.
FILTERS: dict[str, dict[str, Any]] = {
    "none": {},
    "gzip-4+shuffle": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
    "gzip-1+shuffle": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "lzf+shuffle": {"compression": "lzf", "shuffle": True},
    "zstd-3": dict(hdf5plugin.Zstd(clevel=3)),
    "blosc-lz4+bitshuffle": dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE)),
    "blosc-zstd3+bitshuffle": dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.BITSHUFFLE)),
    "blosc-zstd3+shuffle": dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE)),
    "blosc-lz4+shuffle": dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)),
}

# What the writer uses for each kind of dataset (chosen by `compare_filters` runs, SCHEMA.md).
ROLE_FILTER: dict[str, str] = {
    "expert": "blosc-zstd3+bitshuffle",   # uint8 ids: best ratio, fast both ways
    "prob": "blosc-zstd3+bitshuffle",     # float16 probabilities: ~1.14x, fastest read
    "latents": "blosc-zstd3+shuffle",     # float16 activations barely compress (~1.1x)
    "decoded": "blosc-zstd3+shuffle",     # uint8 images
    "small": "none",                      # counts, masks: tiny, overwritten in place
}


def filter_kwargs(role: str) -> dict[str, Any]:
    """h5py create_dataset keywords for a dataset role (`expert`, `prob`, ...)."""
    return dict(FILTERS[ROLE_FILTER[role]])


def compare_filters(
    data: np.ndarray,
    chunks: tuple[int, ...],
    names: list[str] | None = None,
    repeats: int = 1,
) -> list[dict[str, float | str]]:
    """Write `data` in chunk-aligned pieces along axis 0 under each filter, in memory.

    Returns one row per filter: stored bytes, ratio, bytes per element, write and read MB/s.
    Writing whole chunks along the first axis mirrors what the trace writer does per step.
    """
    rows: list[dict[str, float | str]] = []
    step = chunks[0]
    for name in names or list(FILTERS):
        best_w = best_r = float("inf")
        stored = 0
        for _ in range(repeats):
            buf = io.BytesIO()
            with h5py.File(buf, "w") as f:
                d = f.create_dataset("x", shape=data.shape, dtype=data.dtype, chunks=chunks, **FILTERS[name])
                t0 = time.perf_counter()
                for i in range(0, data.shape[0], step):
                    d[i:i + step] = data[i:i + step]
                f.flush()
                best_w = min(best_w, time.perf_counter() - t0)
                stored = d.id.get_storage_size()
            buf.seek(0)
            with h5py.File(buf, "r") as f:
                t0 = time.perf_counter()
                f["x"][...]
                best_r = min(best_r, time.perf_counter() - t0)
        mb = data.nbytes / 2**20
        rows.append({
            "filter": name,
            "stored_bytes": float(stored),
            "ratio": data.nbytes / max(stored, 1),
            "bytes_per_element": stored / data.size,
            "write_MBps": mb / best_w,
            "read_MBps": mb / best_r,
        })
    return rows


def format_table(rows: list[dict[str, float | str]]) -> str:
    """Plain-text table of `compare_filters` rows."""
    head = f"{'filter':26s} {'ratio':>6s} {'B/elem':>7s} {'write MB/s':>10s} {'read MB/s':>9s}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['filter']:26s} {r['ratio']:6.2f} {r['bytes_per_element']:7.3f} "
            f"{r['write_MBps']:10.0f} {r['read_MBps']:9.0f}"
        )
    return "\n".join(lines)

"""HDF5 filters of traces, the portable alternative, and the measurement that chose them.

The choice (see SCHEMA.md, "Compression") is Blosc + zstd level 3 + bit-shuffle for expert ids:
expert ids use at most 3 of 8 bits when K <= 8, bit-shuffle turns the 5 empty bit planes into
runs that cost nothing, and zstd then finds the spatial coherence. Reading Blosc needs
`hdf5plugin` (this package imports it when installed). gzip is the one filter every HDF5 tool
reads without plugins, so portable traces (`portable=True`, `python -m traces convert
--portable`) use gzip + shuffle wherever the default uses Blosc.
"""

from __future__ import annotations

import io
import time
from typing import Any

import h5py
import numpy as np

from .errors import TraceError

try:
    import hdf5plugin  # registers the Blosc/Zstd filters with HDF5
except ImportError:  # portable traces still read and write without it
    hdf5plugin = None

PORTABLE_FILTER = "gzip-4+shuffle"


class PluginMissing(TraceError):
    """A trace needs an HDF5 filter plugin that is not installed."""


# Filter keyword sets for h5py.create_dataset, by name (the `filter` column of traces.schema).
FILTERS: dict[str, dict[str, Any]] = {
    "none": {},
    "gzip-4": {"compression": "gzip", "compression_opts": 4},
    "gzip-4+shuffle": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
    "gzip-1+shuffle": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "lzf+shuffle": {"compression": "lzf", "shuffle": True},
}
if hdf5plugin is not None:
    _blosc = hdf5plugin.Blosc
    FILTERS.update({
        "zstd-3": dict(hdf5plugin.Zstd(clevel=3)),
        "blosc-lz4+bitshuffle": dict(_blosc(cname="lz4", clevel=5, shuffle=_blosc.BITSHUFFLE)),
        "blosc-zstd3+bitshuffle": dict(_blosc(cname="zstd", clevel=3, shuffle=_blosc.BITSHUFFLE)),
        "blosc-zstd3+shuffle": dict(_blosc(cname="zstd", clevel=3, shuffle=_blosc.SHUFFLE)),
        "blosc-lz4+shuffle": dict(_blosc(cname="lz4", clevel=5, shuffle=_blosc.SHUFFLE)),
    })

# HDF5 filter ids of plugins, for messages about missing ones.
BLOSC_ID = 32001
PLUGIN_NAMES = {BLOSC_ID: "Blosc", 32015: "Zstd", 32008: "Bitshuffle", 32004: "LZ4"}
_BUILTIN = {1, 2, 3, 4, 5, 6}  # deflate, shuffle, fletcher32, szip, nbit, scaleoffset


def chosen_filter(name: str, portable: bool) -> str:
    """The filter to write for a schema filter name: itself, or gzip + shuffle if `portable`
    and it needs a plugin."""
    return PORTABLE_FILTER if portable and not (name == "none" or name.startswith("gzip")) else name


def filter_kwargs(name: str, portable: bool = False) -> dict[str, Any]:
    """h5py create_dataset keywords for a schema filter name (see `chosen_filter`)."""
    name = chosen_filter(name, portable)
    if name not in FILTERS:
        raise PluginMissing(f"writing {name} needs hdf5plugin: pip install hdf5plugin (or write a portable "
                            f"trace: portable=True, `--portable`)")
    return dict(FILTERS[name])


def missing_plugin(dataset: h5py.Dataset) -> str | None:
    """Name of a filter `dataset` is compressed with that this HDF5 cannot decode, else None.

    A virtual dataset (joined ranks) has no filters of its own; its rank files use Blosc
    unless they were written portable."""
    if dataset.is_virtual:
        return None if h5py.h5z.filter_avail(BLOSC_ID) else "Blosc"
    plist = dataset.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        fid = plist.get_filter(i)[0]
        if fid not in _BUILTIN and not h5py.h5z.filter_avail(fid):
            return PLUGIN_NAMES.get(fid, f"HDF5 filter {fid}")
    return None


def plugin_hint(name: str = "Blosc") -> str:
    """What a user without hdf5plugin should do (the one-line error of the reader)."""
    return (f"this trace uses {name} compression: pip install hdf5plugin "
            f"(or convert it with `python -m traces convert --portable`)")


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

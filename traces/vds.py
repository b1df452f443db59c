"""Join per-rank trace files into one file through HDF5 virtual datasets (VDS).

Each rank writes its own file (no parallel HDF5, no collective metadata). The joined file
holds one VDS mapping per rank for every growing dataset (concatenated along the sample or
event axis), small copies of coordinates and per-sample tables, and summed progress
counters, so `open_trace` reads it like a single-rank trace. Source paths are stored
relative to the joined file's folder, so the folder can be moved as a whole; `open_trace`
refuses a joined file whose rank files are not there (HDF5 would read fill values).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from cli_common.outputs import check_output

from .errors import TraceError
from .reader import open_trace
from .schema import AXIS_COORDS, LIBVER

_SKIP_ATTRS = {"DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME"}
_COUNTERS_SUM = ("/progress/steps", "/progress/events", "/progress/logs")


def join_ranks(rank_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
               overwrite: bool = False) -> Path:
    """Write `out_path`, a trace whose growing datasets are VDS over `rank_paths` in order.

    The extent joined is what each rank file holds now (join after the ranks have closed).
    """
    out = Path(out_path)
    if not rank_paths:
        raise TraceError("join_ranks needs at least one rank file")
    # refused even with overwrite: an output that is (or links to) a rank file would destroy it
    check_output(out, overwrite, flag="OUT", inputs={f"rank file #{i}": p for i, p in enumerate(rank_paths)})
    extents, complete, kinds, attrs = [], [], set(), []
    for p in rank_paths:
        with open_trace(p) as r:
            if r.live:
                raise TraceError(f"{p} is still being written (its writer, process {r.attrs['writer_pid']}, "
                                 f"runs); join the rank files after the recording ends")
            kinds.add(r.kind)
            complete.append(r.complete)
            attrs.append(r.attrs)
            logs = int(r.dataset("/progress/logs")[0]) if r.kind == "training" else 0
            extents.append({"sample": r.n_samples, "event": r.n_events, "log": logs})
    if len(kinds) != 1:
        raise TraceError(f"cannot join traces of different kinds {sorted(kinds)}")
    _check_one_recording(attrs, rank_paths)
    srcs = [h5py.File(p, "r", swmr=True) for p in rank_paths]
    try:
        _check_compatible(srcs, rank_paths)
        out.parent.mkdir(parents=True, exist_ok=True)
        # relative to the real folder the joined file lands in (a symlink at `out` is replaced, not
        # followed): the reader looks them up from there, so the folder can move as a whole
        rel = [os.path.relpath(Path(p).resolve(), out.parent.resolve()) for p in rank_paths]
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # renamed when whole: no half-joined file
        try:
            with h5py.File(tmp, "w", libver=LIBVER) as dst:
                _write(dst, srcs, rel, extents)
                for k, v in srcs[0].attrs.items():
                    dst.attrs[k] = v
                dst.attrs["complete"] = all(complete)
                dst.attrs["rank"] = -1
                dst.attrs["joined_from"] = json.dumps(rel)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        for s in srcs:
            s.close()
    return out


def _check_one_recording(attrs: list[dict], paths: Sequence) -> None:
    """Rank files join only when they are the ranks 0..W-1 of one recording: the same run id
    (which the recorder derives from the checkpoint, prompts, seeds and settings), checkpoint
    and command line (up to each rank's own --rank and --out), each rank exactly once."""
    for key, what in (("run_id", "run id"), ("checkpoint_sha256", "checkpoint"), ("command", "command line")):
        values = [_comparable(key, a.get(key)) for a in attrs]
        if values[0] is None:
            raise TraceError(f"{paths[0]} has no {what}; it cannot be shown to belong with other rank files")
        for p, v in zip(paths[1:], values[1:]):
            if v != values[0]:
                raise TraceError(f"{p} is not a rank of the same recording as {paths[0]} (its {what} differs)")
    worlds = {int(a.get("world_size", -1)) for a in attrs}
    ranks = sorted(int(a.get("rank", -1)) for a in attrs)
    world = worlds.pop() if len(worlds) == 1 else None
    if world is None or ranks != list(range(world)):
        raise TraceError(f"rank files must be ranks 0..W-1 of one recording, each once; got ranks {ranks} "
                         f"of world size(s) {sorted({int(a.get('world_size', -1)) for a in attrs})}")


_PER_RANK_FLAGS = ("--rank", "--out")  # command-line flags (with a value) that differ between the ranks of a run


def _comparable(key: str, value):
    """Attribute as compared across ranks: a command line without the flags that differ per rank."""
    if key != "command" or value is None:
        return value
    out, skip = [], False
    for word in shlex.split(str(value)):
        if skip:
            skip = False
        elif word in _PER_RANK_FLAGS:
            skip = True
        elif word != "--overwrite" and not word.startswith(tuple(f"{flag}=" for flag in _PER_RANK_FLAGS)):
            out.append(word)
    return out


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append("/" + n) if isinstance(o, h5py.Dataset) else None)
    return names


def _check_compatible(srcs: list[h5py.File], paths: Sequence) -> None:
    ref = _datasets(srcs[0])
    for s, p in zip(srcs[1:], paths[1:]):
        if _datasets(s) != ref:
            raise TraceError(f"{p}: datasets differ from {paths[0]}; record ranks with one layout")
        for name in ref:
            a, b = srcs[0][name], s[name]
            if a.attrs.get("growing") or _axis0(a) == "sample":
                if a.shape[1:] != b.shape[1:]:
                    raise TraceError(f"{p}: {name} shape {b.shape} does not match {a.shape}")
            elif name.startswith("/coords/") and not _same(a[()], b[()]):
                raise TraceError(f"{p}: coordinate {name} differs from {paths[0]}")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    nan_ok = a.dtype.kind == "f" and b.dtype.kind == "f"
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=nan_ok)


def _axis0(d: h5py.Dataset) -> str | None:
    axes = d.attrs.get("axes")
    if axes is None or len(axes) == 0:
        return None
    x = axes[0]
    return x.decode() if isinstance(x, bytes) else str(x)


def _write(dst: h5py.File, srcs: list[h5py.File], rel: list[str], extents: list[dict[str, int]]) -> None:
    for name in _datasets(srcs[0]):
        d0 = srcs[0][name]
        axis0 = _axis0(d0)
        if d0.attrs.get("growing"):
            n = [e[axis0] for e in extents]
            layout = h5py.VirtualLayout(shape=(sum(n), *d0.shape[1:]), dtype=d0.dtype,
                                        maxshape=(sum(n), *d0.shape[1:]))
            start = 0
            for src, r, k in zip(srcs, rel, n):
                if k:
                    layout[start:start + k] = h5py.VirtualSource(r, name, shape=src[name].shape)[:k]
                start += k
            fill = d0.fillvalue
            new = dst.create_virtual_dataset(name, layout, fillvalue=fill)
        elif axis0 == "sample":
            parts = [src[name][: e["sample"]] for src, e in zip(srcs, extents)]
            new = _plain(dst, name, np.concatenate(parts), d0.dtype)
        elif name in _COUNTERS_SUM:
            new = _plain(dst, name, np.array([sum(int(s[name][0]) for s in srcs)]), d0.dtype)
        elif name == "/progress/closed":
            new = _plain(dst, name, np.array([min(int(s[name][0]) for s in srcs)]), d0.dtype)
        else:
            new = _plain(dst, name, d0[()], d0.dtype)
        for k, v in d0.attrs.items():
            if k not in _SKIP_ATTRS:
                new.attrs[k] = v
    _scales(dst)


def _plain(dst: h5py.File, name: str, data: np.ndarray, dtype) -> h5py.Dataset:
    # chunked, never contiguous: contiguous data is unreadable in SWMR-read mode
    return dst.create_dataset(name, data=data, dtype=dtype, chunks=True if np.ndim(data) else None)


def _scales(dst: h5py.File) -> None:
    coord_paths = {p for ps in AXIS_COORDS.values() for p in ps}
    for p in coord_paths:
        if p in dst:
            dst[p].make_scale(p.rsplit("/", 1)[1])
    for name in _datasets(dst):
        d = dst[name]
        axes = d.attrs.get("axes")
        if axes is None or name in coord_paths:
            continue
        for i, ax in enumerate(axes):
            ax = ax.decode() if isinstance(ax, bytes) else str(ax)
            d.dims[i].label = ax
            for cp in AXIS_COORDS.get(ax, ()):
                if cp in dst:
                    d.dims[i].attach_scale(dst[cp])

"""Turn user selections into HDF5 reads that touch only the chunks they need.

h5py reads ints and slices as one hyperslab (only the chunks it covers), but fancy indexing
with lists is slow beyond a few hundred indices and allows one list per read. So lists are
split into runs of neighbouring chunks; each run is one hyperslab, and the result is
assembled (and reordered, duplicates kept) in NumPy.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import h5py
import numpy as np

from .errors import TraceError


def resolve(sel: Any, axis: str, length: int, coord: np.ndarray | None, by_value: bool) -> Any:
    """One axis selection -> int (axis dropped), slice (step > 0) or int64 positions.

    Strings (and lists of them) and `by_value` axes look values up in the coordinate;
    everything else is positional, NumPy style (negative ints count from the end).
    """
    if sel is None:
        return slice(0, length)
    if isinstance(sel, slice):
        start, stop, step = sel.indices(length)
        if step > 0:
            return slice(start, max(start, stop), step)
        return np.arange(start, stop, step, dtype=np.int64)
    if isinstance(sel, (str, bytes)) or (np.ndim(sel) == 0 and by_value):
        return int(_lookup(np.atleast_1d(sel), axis, coord)[0])
    if np.ndim(sel) == 0:
        i = int(sel)
        if not -length <= i < length:
            raise TraceError(f"{axis} index {i} out of range 0..{length - 1}")
        return i % length
    arr = np.asarray(sel)
    if arr.dtype == bool:
        if arr.shape != (length,):
            raise TraceError(f"{axis} mask has {arr.size} entries for {length} positions")
        return np.nonzero(arr)[0].astype(np.int64)
    if arr.dtype.kind in "USO" or by_value:
        return _lookup(arr, axis, coord)
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TraceError(f"{axis} selection must be ints, a slice, a mask or names; got {arr.dtype}")
    if arr.min() < -length or arr.max() >= length:
        raise TraceError(f"{axis} indices out of range 0..{length - 1}")
    return (arr.astype(np.int64) % length).ravel()


def _lookup(values: np.ndarray, axis: str, coord: np.ndarray | None) -> np.ndarray:
    if coord is None:
        raise TraceError(f"axis {axis} has no coordinate to look values up in")
    c = np.asarray([x.decode() if isinstance(x, bytes) else x for x in coord])
    vals = [v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
            for v in np.ravel(values)]
    out = []
    for v in vals:
        hit = np.nonzero(c == v)[0]
        if hit.size == 0:
            raise TraceError(f"{axis} {v!r} not in trace (recorded: {', '.join(map(str, c.tolist()))})")
        out.append(hit[0])
    return np.asarray(out, dtype=np.int64)


def read(dset: h5py.Dataset, keys: Sequence[Any], chunks: Sequence[int] | None = None) -> np.ndarray:
    """Read `dset[keys]` (keys from `resolve`), touching only the chunks that hold them.

    `chunks` overrides the dataset's chunk shape (virtual datasets have none)."""
    keys = list(keys)
    if all(isinstance(k, (int, slice)) for k in keys):
        return dset[tuple(keys)]
    chunks = chunks or dset.chunks or dset.shape
    drop = [isinstance(k, int) for k in keys]
    idx = [np.array([k]) if isinstance(k, int)
           else np.arange(k.start, k.stop, k.step) if isinstance(k, slice) else k for k in keys]
    uniq, inv = zip(*(np.unique(i, return_inverse=True) for i in idx))
    out_shape = tuple(len(u) for u in uniq)
    out = np.empty(out_shape, dtype=dset.dtype)
    if all(out_shape):
        per_axis = [_segments(u, c) for u, c in zip(uniq, chunks)]
        for combo in itertools.product(*per_axis):
            hyper = tuple(slice(int(u[0]), int(u[-1]) + 1) for u, _ in combo)
            block = dset[hyper]
            local = np.ix_(*[u - u[0] for u, _ in combo])
            dest = np.ix_(*[pos for _, pos in combo])
            out[dest] = block[local]
    result = out[np.ix_(*[i.ravel() for i in inv])] if all(out_shape) else out
    return result[tuple(0 if d else slice(None) for d in drop)]


def _segments(uniq: np.ndarray, chunk: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split sorted positions into runs whose chunks are adjacent (no unneeded chunk between).

    Returns (positions, their indices in `uniq`) per run.
    """
    if uniq.size == 0:
        return []
    cid = uniq // max(chunk, 1)
    cuts = np.nonzero(np.diff(cid) > 1)[0] + 1
    pos = np.arange(uniq.size)
    return list(zip(np.split(uniq, cuts), np.split(pos, cuts)))

"""A compiled counting kernel for the streaming pass over large traces (numba).

`ChunkTables.pairs` (the joint table of two routings of the same tokens: stability across
timesteps, branches and seeds, and expert change) is, in numpy, a combined key built in three byte
passes and one `np.bincount`. The kernel counts the same table in one pass over the two id arrays,
with no key array: 4-5x faster per record here (1.0 against 4.5 ns). The other count,
`ChunkTables.count` (histogram and step pairs, a table of ~20k cells), gained nothing compiled (its
increments miss the first-level cache either way) and stays in numpy. numba is installed with
umap-learn (a dependency); its import and the compiled code's load cost ~0.7 s per process (the
first run on a machine also compiles, a few seconds, and caches the result beside this file), so the
pass uses the kernel only for traces of at least `MIN_RECORDS` routing records; below it, and
wherever numba is missing or `RSR_PROBES_COMPILED=0`, the numpy path runs. Both give identical
tables (`tests/test_stream_fast.py`).
"""
from __future__ import annotations

import os
from types import ModuleType

MIN_RECORDS = 200_000_000  # start-up ~0.7 s against ~1-2 ns saved a record (1-2 pairs a record)
ENV = "RSR_PROBES_COMPILED"  # "0": never, "1": always (tests, benchmarks), unset: by trace size

_loaded: ModuleType | None | bool = None  # None: not tried; False: unavailable


def wanted(records: int) -> bool:
    """Whether a pass over `records` routing records should use the kernels (and they load)."""
    setting = os.environ.get(ENV, "")
    if setting == "0" or (setting != "1" and records < MIN_RECORDS):
        return False
    return kernels() is not None


def kernels() -> ModuleType | None:
    """The compiled kernels module, or None where numba cannot be imported."""
    global _loaded
    if _loaded is None:
        try:
            from . import _kernels
        except ImportError:  # numba missing or broken: the numpy path
            _loaded = False
        else:
            _loaded = _kernels
    return _loaded or None

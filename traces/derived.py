"""Write results computed from a finished trace into it, under `/derived` (schema table DERIVED).

A trace is append-only while it records; `/derived` is the one part written afterwards, by
analysis tools (probes.projections stores PCA/UMAP of the latents here so a dashboard reads
them instead of recomputing). Datasets and attributes must be registered in
`traces.schema.DERIVED` / `DERIVED_ATTRS`, which give their axes, dtype, fill, chunks and filter.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .compression import filter_kwargs
from .errors import TraceError
from .schema import DERIVED, DERIVED_ATTRS

_STR = h5py.string_dtype()
_SPECS = {spec.path: spec for spec in DERIVED}


class DerivedWriter:
    """Replaces `/derived` of a complete trace (open it with `open_derived`).

    Opening needs exclusive access: HDF5 file locking refuses it while any reader (e.g. the
    dashboard) holds the file, which is reported as a one-line TraceError.
    """

    def __init__(self, path: str | os.PathLike, source: str, trace_steps: int) -> None:
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r+")
        except OSError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TraceError(f"{self.path}: cannot open for writing (is it open elsewhere, e.g. the dashboard, "
                             f"or read-only?): {first}") from None
        if "derived" in self.file:
            del self.file["derived"]
        self.file.create_group("derived")
        self.set_attrs("/derived", source=source, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                       trace_steps=trace_steps)

    def create(self, path: str, data: Any = None, shape: tuple[int, ...] | None = None) -> h5py.Dataset:
        """Create registered dataset `path` from `data`, or empty (fill value) with `shape`."""
        spec = _SPECS.get(path)
        if spec is None:
            raise TraceError(f"{path} is not a /derived dataset of the schema (traces.schema.DERIVED)")
        if data is not None:
            data = np.asarray(data, dtype=spec.dtype)
            shape = data.shape
        d = self.file.create_dataset(path, shape=shape, data=data, dtype=spec.dtype, fillvalue=spec.fill,
                                     chunks=spec.chunk_shape(shape), **filter_kwargs(spec.filter))
        d.attrs["axes"] = np.array(spec.axes, dtype=_STR)
        return d

    def set_attrs(self, group: str, **values: Any) -> None:
        """Attributes of a /derived group (created if needed); names must be registered."""
        unknown = set(values) - set(DERIVED_ATTRS.get(group, ()))
        if unknown:
            raise TraceError(f"{group} has no schema attributes {sorted(unknown)} (traces.schema.DERIVED_ATTRS)")
        self.file.require_group(group).attrs.update(values)



@contextmanager
def open_derived(path: str | os.PathLike, source: str, trace_steps: int) -> Iterator[DerivedWriter]:
    """`with open_derived(trace, "/latents/h", steps) as out:` replace the trace's /derived."""
    writer = DerivedWriter(path, source, trace_steps)
    try:
        yield writer
    finally:
        writer.file.close()

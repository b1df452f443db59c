"""Write results computed from a finished trace into it, under `/derived` (schema table DERIVED).

A trace is append-only while it records; `/derived` is the one part written afterwards, by
analysis tools (probes.projections stores PCA/UMAP of the latents here so a dashboard reads
them instead of recomputing). Datasets and attributes must be registered in
`traces.schema.DERIVED` / `DERIVED_ATTRS`, which give their axes, dtype, fill, chunks and filter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from cli_common.outputs import os_error_reason

from .compression import filter_kwargs
from .errors import TraceError
from .schema import DERIVED, DERIVED_ATTRS

_STR = h5py.string_dtype()
_SPECS = {spec.path: spec for spec in DERIVED}


class DerivedWriter:
    """Writes `/derived` of a complete trace into a copy of it (open it with `open_derived`).

    The trace itself is never opened for writing: the copy (a hidden temporary file beside it)
    gets the new `/derived`, is flushed to disk, and `commit` swaps it in with one rename. A
    kill or crash at any moment leaves the original trace as it was (plus, at worst, a stale
    `.NAME.derive-PID-*.tmp` beside it, removed by the next derive of that trace); readers that
    hold the old file keep reading it. The caller holds `traces.writer.writer_lock` on the trace
    from its first read to the end of the `open_derived` block (`probes.projections.derive`
    does), so no recorder replaces the trace in between.
    """

    def __init__(self, path: str | os.PathLike, source: str, trace_steps: int) -> None:
        self.path = Path(os.path.realpath(path))  # a symlink to a trace: its target is replaced
        remove_stale_copies(self.path)
        self._check_room()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.derive-{os.getpid()}-", suffix=".tmp",
                                   dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            shutil.copyfile(self.path, self.tmp)
            shutil.copymode(self.path, self.tmp)
            self.file = h5py.File(self.tmp, "r+")
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise TraceError(f"{self.path}: cannot copy it to write /derived ({os_error_reason(e)})") from None
        try:
            if "derived" in self.file:
                del self.file["derived"]
            self.file.create_group("derived")
            self.set_attrs("/derived", source=source, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                           trace_steps=trace_steps)
        except BaseException:
            self.discard()
            raise

    def _check_room(self) -> None:
        """The copy needs the trace's size again, plus the projections (a fraction of the latents)."""
        need = 2 * self.path.stat().st_size
        free = shutil.disk_usage(self.path.parent).free
        if need > free:
            raise TraceError(f"{self.path}: writing /derived needs about {need >> 20} MiB free beside the trace "
                             f"(a copy is written, then swapped in); {free >> 20} MiB free")

    def commit(self) -> None:
        """Flush the copy to disk and swap it in for the trace (one rename)."""
        self.file.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)
        try:  # the rename itself on disk
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def discard(self) -> None:
        """Drop the copy; the trace is untouched."""
        try:
            self.file.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

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


def stale_copies(trace: str | os.PathLike) -> list[Path]:
    """Copies a killed derive left beside `trace` (their process no longer runs)."""
    trace = Path(trace)
    stale = []
    for tmp in trace.parent.glob(f".{trace.name}.derive-*-*.tmp"):
        pid = tmp.name[len(f".{trace.name}.derive-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.append(tmp)
    return stale


def remove_stale_copies(trace: str | os.PathLike) -> None:
    for tmp in stale_copies(trace):
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def open_derived(path: str | os.PathLike, source: str, trace_steps: int) -> Iterator[DerivedWriter]:
    """`with open_derived(trace, "/latents/h", steps) as out:` replace the trace's /derived: written
    into a copy, swapped in when the block ends without an error, dropped otherwise. Hold
    `traces.writer.writer_lock(trace)` around the reads the projections come from and this block."""
    writer = DerivedWriter(path, source, trace_steps)
    try:
        yield writer
    except BaseException:
        writer.discard()
        raise
    writer.commit()

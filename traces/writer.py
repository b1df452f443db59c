"""Append-only, crash-safe trace writers (one file per rank).

Why it is built this way (SCHEMA.md, "Durability"):
- every dataset, attribute and dimension scale is created first, then SWMR mode is switched
  on; afterwards the writer only grows datasets and writes data, which is what SWMR keeps
  consistent, so a SIGKILL at any moment leaves a file whose flushed steps all read back;
- each call writes whole chunks (one chunk per sample x branch x timestep), then flushes the
  file, then marks the step in /progress and flushes again, so a reader never sees a step
  marked before its data is on disk;
- `complete` is a root attribute set to True only by a clean `close()` (after SWMR ends).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import functools
import os
import socket
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from cli_common.outputs import OutputError, free_bytes, os_error_reason
from cli_common.version import toolkit_version

from .compression import filter_kwargs
from .errors import TraceError
from .layout import SampleTable, SamplingLayout, TraceMeta, TrainingLayout
from .reader import pid_namespace
from .schema import AXIS_COORDS, LIBVER, SCHEMA_NAME, SCHEMA_VERSION, WRITER_VERSION, Dataset, datasets

_STR = h5py.string_dtype("utf-8")


ROOM_MARGIN = 4 << 20  # bytes kept free beyond a write's own data: HDF5 metadata, the final flush and close


def _nbytes(value: Any) -> int:
    return int(value.nbytes) if hasattr(value, "nbytes") else 0


def _guarded(method):
    """Wrap a write call: refuse it while the disk (or the file-size limit) leaves too little room
    for its data, so the trace stops at a flushed step and stays readable; a write that fails
    anyway becomes one OutputError line."""
    @functools.wraps(method)
    def write(self, *args, **kw):
        self._check_room(sum(_nbytes(a) for a in (*args, *kw.values())) + ROOM_MARGIN)
        try:
            return method(self, *args, **kw)
        except (OSError, RuntimeError) as e:
            raise self._failed_write(e) from None
    return write


class _BaseWriter:
    """File creation, root attributes, dimension scales, SWMR switch and clean close."""

    kind = ""

    def __init__(self, path: str | os.PathLike, meta: TraceMeta | None, rank: int,
                 world_size: int, overwrite: bool, portable: bool, run_id: str | None) -> None:
        self.path = Path(path)
        self.portable = portable
        if self.path.exists() and not overwrite:
            raise TraceError(f"{self.path} exists (pass overwrite=True to replace it)")
        if run_id is None and world_size > 1:
            raise TraceError("rank files of one recording need a shared run_id (the join checks it)")
        meta = meta or TraceMeta()
        _refuse_if_locked(self.path)  # before HDF5's own open, which truncates first and locks after
        self._lock: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # "x" creates only a new file: of two writers racing for one path, the second fails
            # here instead of truncating the first one's trace ("w" with overwrite: HDF5's file
            # lock refuses a path another writer holds open)
            self._f = h5py.File(self.path, "w" if overwrite else "x", libver=LIBVER)
        except FileExistsError:
            raise TraceError(f"{self.path} exists (another writer created it just now?); "
                             f"pass overwrite=True to replace it") from None
        except OSError as e:
            raise TraceError(f"cannot create trace {self.path}: {os_error_reason(e)}") from None
        self._closed = False
        self._broken = False
        self._steps = 0
        self._scales: dict[str, h5py.Dataset] = {}
        try:
            self._write_root_attrs(meta, rank, world_size, run_id)
        except BaseException:
            self._discard()
            raise

    def _write_root_attrs(self, meta: TraceMeta, rank: int, world_size: int, run_id: str | None) -> None:
        a = self._f.attrs
        a["schema"] = SCHEMA_NAME
        a["schema_version"] = SCHEMA_VERSION
        a["writer_version"] = WRITER_VERSION
        a["toolkit_version"] = toolkit_version()
        a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        a["kind"] = self.kind
        a["complete"] = False
        a["model_config"] = meta.to_json(meta.model_config)
        a["rsr_config"] = meta.to_json(meta.rsr_config)
        a["checkpoint_sha256"] = meta.checkpoint_sha256
        a["command"] = meta.command_line()
        a["seeds"] = meta.to_json(meta.seeds)
        a["scheduler"] = meta.to_json(meta.scheduler)
        a["rank"] = int(rank)
        a["world_size"] = int(world_size)
        a["run_id"] = run_id or uuid.uuid4().hex  # a single-file recording is a run of its own
        # who writes: a reader on this host tells a live trace from one whose writer died
        a["writer_host"] = socket.gethostname()
        a["writer_pid"] = os.getpid()
        namespace = pid_namespace()
        if namespace is not None:  # a pid means something only in its namespace (containers share host names)
            a["writer_pid_namespace"] = namespace
        for key, value in meta.extra.items():
            if key in a:
                raise TraceError(f"extra attribute {key!r} clashes with a schema attribute")
            a[key] = meta.to_json(value)

    # Creation from the schema table ---------------------------------------------------
    def _create_datasets(self, kind: str, features: set[str], lengths: dict[str, int],
                         values: dict[str, Any], scalars: tuple[str, ...] = ()) -> dict[str, list[h5py.Dataset]]:
        """Create every dataset of `kind` the layout turns on, in table order; returns the
        ones that grow along axis 0, by the name of that axis."""
        growing: dict[str, list[h5py.Dataset]] = {}
        for spec in datasets(kind, features, scalars):
            d = self._create(spec, lengths, values.get(spec.path))
            if spec.grows:
                growing.setdefault(spec.axes[0], []).append(d)
        return growing

    def _create(self, spec: Dataset, lengths: dict[str, int], data: Any) -> h5py.Dataset:
        f = self._f
        dtype = _STR if spec.dtype == "str" else np.dtype(spec.dtype)
        if spec.role in ("grid", "counter"):  # created empty, filled by write calls
            shape = spec.shape(lengths)
            d = f.create_dataset(spec.path, shape=(0, *shape[1:]) if spec.grows else shape,
                                 maxshape=(None if spec.grows else shape[0], *shape[1:]), dtype=dtype,
                                 chunks=spec.chunk_shape(shape), fillvalue=spec.fill,
                                 **filter_kwargs(spec.filter, self.portable))
        else:  # contents known up front
            arr = np.asarray(data, dtype=spec.numpy_dtype)
            d = f.create_dataset(spec.path, data=arr, dtype=dtype, chunks=spec.chunk_shape(arr.shape),
                                 maxshape=(None,) if spec.grows else None)
        if spec.role == "coord":
            # labels and attachments edit attributes, so scales are wired up at the SWMR switch
            d.make_scale(spec.path.rsplit("/", 1)[1])
            self._scales[spec.path] = d
        elif spec.axes:
            d.attrs["axes"] = np.array(spec.axes, dtype=_STR)
        if spec.grows:
            d.attrs["growing"] = True
        return d

    def _attach_scales(self) -> None:
        """Label every axis and attach its coordinates (before SWMR: it edits attributes)."""
        for d in _walk(self._f):
            axes = d.attrs.get("axes")
            if axes is None:
                continue
            for i, name in enumerate(axes):
                name = name.decode() if isinstance(name, bytes) else str(name)
                d.dims[i].label = name
                for cpath in AXIS_COORDS.get(name, ()):
                    if cpath in self._scales:
                        d.dims[i].attach_scale(self._scales[cpath])

    def _start_swmr(self) -> None:
        self._attach_scales()
        for path, d in self._scales.items():
            if "axes" not in d.attrs:
                axis = next((a for a, cs in AXIS_COORDS.items() if path in cs), None)
                if axis:
                    d.attrs["axes"] = np.array([axis], dtype=_STR)
        self._f.flush()
        self._f.swmr_mode = True
        self._lock = _take_lock(self.path)  # HDF5 drops its own file lock in SWMR mode

    def _grow(self, datasets: list[h5py.Dataset], n: int) -> None:
        for d in datasets:
            d.resize(n, axis=0)

    def _commit(self, counters: dict[str, int]) -> None:
        """Flush data, then publish progress counters and flush them (order matters)."""
        self._f.flush()
        self._steps += 1
        self._f["/progress/steps"][0] = self._steps
        for path, value in counters.items():
            self._f[path][0] = value
        self._f.flush()

    # Lifecycle ------------------------------------------------------------------------
    @property
    def steps_written(self) -> int:
        return self._steps

    # Room on disk -------------------------------------------------------------------------
    def _check_room(self, need: int) -> None:
        if self._broken:
            raise OutputError(f"{self.path}: an earlier write failed; nothing more can be written")
        disk = free_bytes(self.path)
        limit = _file_size_limit()
        under_limit = None if limit is None else limit - self.path.stat().st_size
        free = disk if under_limit is None else min(disk, under_limit)
        if free < need:
            where = ("the file-size limit (ulimit -f)" if under_limit is not None and under_limit < disk
                     else f"the disk holding {self.path.parent}")
            raise OutputError(f"{where} leaves {free >> 10} KiB, less than the {need >> 10} KiB the next write "
                              f"needs; {self.path} stopped after {self._steps} flushed write(s), all readable")

    def _failed_write(self, e: BaseException) -> OutputError:
        """A write HDF5 could not finish. Its library state for this file is then unusable: closing
        or even freeing the file's objects fails again and can crash the interpreter at exit, so
        the file is left as it is and the process, when it ends, ends without HDF5's teardown."""
        self._broken = True
        atexit.register(_exit_now)
        return OutputError(f"writing {self.path} failed ({os_error_reason(e)});"
                           f" it may be unreadable past step {self._steps}")

    def close(self, attrs: dict[str, Any] | None = None) -> None:
        """Clean close: mark /progress/closed, leave SWMR, then set root `complete=True` and
        any final root `attrs` (JSON-encoded; e.g. what an intervention changed in the run)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._f["/progress/closed"][0] = 1
            self._f.flush()
        finally:
            self._f.close()
            self._lock = _release_lock(self._lock)  # the reopen below takes HDF5's own lock
        try:
            f = h5py.File(self.path, "r+", libver=LIBVER)
        except OSError:
            # A live SWMR reader in another process holds a shared lock; the attribute write
            # is a small metadata edit that such readers never depend on (they watch
            # /progress/closed), so skip the lock rather than fail the clean close.
            f = h5py.File(self.path, "r+", libver=LIBVER, locking=False)
        with f:
            for key, value in (attrs or {}).items():
                f.attrs[key] = TraceMeta.to_json(value)
            f.attrs["complete"] = True

    def _discard(self) -> None:
        """Remove a file whose creation failed (e.g. a full disk): it holds no readable trace."""
        self.abort()
        self.path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Close without marking the trace complete (used when the caller raised). Never raises:
        the caller's error is the one to report, and a failed final flush (a full disk) loses
        only the unflushed step; every step flushed before stays readable."""
        if self._closed or self._broken:
            return
        self._closed = True
        try:
            self._f.flush()
        except Exception:
            pass
        try:
            self._f.close()
        except Exception:
            pass
        self._lock = _release_lock(self._lock)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# While a writer writes in SWMR mode, where HDF5 holds no lock of its own, it holds a shared
# advisory lock (flock) on its file, as HDF5's readers do. A new writer first asks for the
# exclusive lock and stops if the file is in use: HDF5's own open would truncate the file
# before it failed on the lock.
try:
    import fcntl
except ImportError:  # not POSIX: no lock, as before
    fcntl = None


def _refuse_if_locked(path: Path) -> None:
    if fcntl is None or not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable: HDF5's open reports it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TraceError(f"{path} is open in another process (being written or read); wait for it to "
                         f"finish or write elsewhere") from None
    finally:
        os.close(fd)  # closing releases the probe's lock


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold a trace for a writer that works on it for a while (e.g. `probes.derive`, which reads
    the latents, fits, then replaces the file): refused (TraceError) while any other process has
    it open, as `SamplingWriter`/`TrainingWriter` refuse it, then a shared lock for the whole
    `with` block, so a recorder's `--overwrite` or a second derive is refused in turn, also
    while this process is stopped between its reads and its write."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise TraceError(f"{path}: cannot open ({os_error_reason(e)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else holds it ...
        except BlockingIOError:
            raise TraceError(f"{path} is open in another process (being written or read, e.g. the dashboard); "
                             f"wait for it to finish or close it") from None
        fcntl.flock(fd, fcntl.LOCK_SH)  # ... then shared: this process's own HDF5 opens take shared locks too
        yield
    finally:
        os.close(fd)


def _take_lock(path: Path) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # compatible with readers; only an exclusive holder would wait here
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
    return None


def _file_size_limit() -> int | None:
    """The soft RLIMIT_FSIZE (`ulimit -f`) in bytes, or None where there is none."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def _walk(group: h5py.Group):
    for obj in group.values():
        if isinstance(obj, h5py.Group):
            yield from _walk(obj)
        else:
            yield obj


def _check(name: str, arr: Any, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != shape:
        raise TraceError(f"{name} has shape {a.shape}, expected {shape}")
    return a


def _counts(expert: np.ndarray, k: int) -> np.ndarray:
    """Expert counts over the last axis, vectorised with one bincount; ids >= k (ablated,
    unwritten) go to an overflow slot that is dropped."""
    lead = expert.shape[:-1]
    m = int(np.prod(lead))
    ids = np.minimum(expert.reshape(m, -1), k).astype(np.int64)
    flat = ids + (np.arange(m, dtype=np.int64) * (k + 1))[:, None]
    return np.bincount(flat.ravel(), minlength=m * (k + 1)).reshape(*lead, k + 1)[..., :k].astype(np.int32)


class SamplingWriter(_BaseWriter):
    """Writes a sampling trace one diffusion timestep of one batch at a time.

    Usage: `begin_batch(n)` opens the next n samples of the SampleTable, then
    `write_timestep(t, expert=...)` for each recorded timestep index t, then optionally
    `write_final(images)`; finally `close()`.
    """

    kind = "sampling"

    def __init__(self, path: str | os.PathLike, layout: SamplingLayout, samples: SampleTable,
                 meta: TraceMeta | None = None, *, rank: int = 0, world_size: int = 1,
                 overwrite: bool = False, portable: bool = False, run_id: str | None = None) -> None:
        super().__init__(path, meta, rank, world_size, overwrite, portable, run_id)
        self.layout = layout
        self.samples = samples
        self._batch = slice(0, 0)
        try:
            growing = self._create_datasets("sampling", layout.features(), layout.axis_lengths(len(samples)),
                                            self._values(layout, samples))
            self._growing = growing["sample"]
            self._f["/routing/counts"].attrs["scope"] = layout.counts_scope
            self._start_swmr()
        except BaseException:
            self._discard()
            raise

    def _values(self, lo: SamplingLayout, st: SampleTable) -> dict[str, Any]:
        """Contents of the datasets written once: coordinates, per-sample columns, projection."""
        nsamp, nt = len(st), len(lo.timestep_ids)
        nan = np.full(nt, np.nan)
        out: dict[str, Any] = {
            "/coords/sample": np.arange(nsamp) if st.sample_id is None else st.sample_id,
            "/coords/branch": list(lo.branches),
            "/coords/timestep": lo.timestep_ids,
            "/coords/timestep_value": nan if lo.timestep_values is None else lo.timestep_values,
            "/coords/sigma": nan if lo.sigmas is None else lo.sigmas,
            "/coords/layer": lo.layer_ids,
            "/coords/step": lo.step_ids,
            "/coords/token": lo.token_ids,
            "/coords/expert": np.arange(lo.n_experts),
            "/samples/prompt": list(st.prompt),
            "/samples/seed": st.seed,
            "/samples/label": st.label if st.label is not None else [-1] * nsamp,
            "/samples/scene": [sc if isinstance(sc, str) else TraceMeta.to_json(sc)
                               for sc in (st.scene or [""] * nsamp)],
            "/latents/token_index": lo.latent_token_ids,
            "/coords/dim": np.arange(lo.latent_dim),
            "/coords/decoded_branch": list(lo.decoded_branches),
        }
        if lo.projection is not None:
            out["/latents/projection"] = lo.projection
            out["/coords/source_dim"] = np.arange(np.shape(lo.projection)[0])
        if lo.image_shape is not None:
            for name, n in zip(("height", "width", "channel"), lo.image_shape):
                out[f"/coords/{name}"] = np.arange(n)
        return out

    @_guarded
    def begin_batch(self, n: int) -> slice:
        """Open the next `n` samples (rows of the SampleTable); returns their positions."""
        start = self._batch.stop
        if n <= 0 or start + n > len(self.samples):
            raise TraceError(f"batch of {n} samples exceeds the {len(self.samples)} planned samples (at {start})")
        self._batch = slice(start, start + n)
        self._grow(self._growing, start + n)
        self._f.flush()
        return self._batch

    @_guarded
    def write_timestep(self, t: int, expert: Any, *, prob: Any = None, counts: Any = None,
                       latents: Any = None, decoded: Any = None) -> None:
        """Write one recorded timestep (position `t` on the timestep axis) of the open batch.

        Shapes (B = batch size): expert (B, branch, layer, step, token) uint8; prob the same
        plus expert; counts (B, branch, layer, step, expert), computed from `expert` if None
        (pass your own when counting over all tokens); latents (B, branch, layer, step,
        stored_token, dim or source_dim) - projected here if given in source_dim; decoded
        (B, decoded_branch, layer, step, H, W, C) uint8.
        """
        lo = self.layout
        b = self._batch.stop - self._batch.start
        if b == 0:
            raise TraceError("write_timestep before begin_batch")
        nb, nt, nl, ns, nn = lo.cell_shape()
        if not 0 <= t < nt:
            raise TraceError(f"timestep position {t} outside 0..{nt - 1}")
        k = lo.n_experts
        sl = self._batch
        e = _check("expert", expert, (b, nb, nl, ns, nn))
        if e.dtype != np.uint8:
            if e.size and (e.min() < 0 or e.max() >= k):
                raise TraceError(f"expert ids must lie in 0..{k - 1}")
            e = e.astype(np.uint8)
        f = self._f
        f["/routing/expert"][sl, :, t] = e
        f["/routing/counts"][sl, :, t] = (_counts(e, k) if counts is None
                                          else _check("counts", counts, (b, nb, nl, ns, k)).astype(np.int32))
        if prob is not None:
            if not lo.store_prob:
                raise TraceError("prob given but the layout has store_prob=False")
            f["/routing/prob"][sl, :, t] = _check("prob", prob, (b, nb, nl, ns, nn, k)).astype(np.float16)
        if latents is not None:
            self._write_latents(t, latents, b, nb, nl, ns)
        if decoded is not None:
            if "/decoded/step" not in f:
                raise TraceError("decoded given but the layout has no decoded steps")
            shape = (b, len(lo.decoded_branches), nl, ns, *lo.image_shape)
            f["/decoded/step"][sl, :, t] = _check("decoded", decoded, shape).astype(np.uint8)
        f.flush()
        f["/progress/written"][sl, t] = 1
        self._commit({})

    def _write_latents(self, t: int, latents: Any, b: int, nb: int, nl: int, ns: int) -> None:
        lo = self.layout
        lt = lo.latent_token_ids
        if lt is None:
            raise TraceError("latents given but the layout has no latent_tokens")
        h = np.asarray(latents)
        if h.shape[:-1] != (b, nb, nl, ns, len(lt)):
            raise TraceError(f"latents has shape {h.shape}, expected {(b, nb, nl, ns, len(lt))} + (dim,)")
        if h.shape[-1] != lo.latent_dim:
            if lo.projection is None or h.shape[-1] != np.shape(lo.projection)[0]:
                raise TraceError(f"latents last axis {h.shape[-1]} is neither latent_dim nor the projection input")
            h = h.astype(np.float32) @ np.asarray(lo.projection, dtype=np.float32)
        self._f["/latents/h"][self._batch, :, t] = h.astype(np.float16)

    @_guarded
    def write_final(self, images: Any) -> None:
        """Final decoded images (B, H, W, C) uint8 of the open batch."""
        if "/decoded/final" not in self._f:
            raise TraceError("final images given but the layout has no image_shape")
        b = self._batch.stop - self._batch.start
        images = _check("images", images, (b, *self.layout.image_shape))
        self._f["/decoded/final"][self._batch] = images.astype(np.uint8)
        self._f.flush()
        self._f["/progress/final_written"][self._batch] = 1
        self._commit({})


class TrainingWriter(_BaseWriter):
    """Writes a training trace: routing events (training step, sample, timestep) and scalars."""

    kind = "training"

    def __init__(self, path: str | os.PathLike, layout: TrainingLayout, meta: TraceMeta | None = None,
                 *, rank: int = 0, world_size: int = 1, overwrite: bool = False, portable: bool = False,
                 run_id: str | None = None) -> None:
        super().__init__(path, meta, rank, world_size, overwrite, portable, run_id)
        self.layout = layout
        self._events = 0
        self._logs = 0
        try:
            values = {"/coords/layer": layout.layer_ids, "/coords/step": layout.step_ids,
                      "/coords/token": layout.token_ids, "/coords/expert": np.arange(layout.n_experts),
                      "/events/step": [], "/events/sample": [], "/events/timestep": [], "/train/step": []}
            growing = self._create_datasets("training", layout.features(), layout.axis_lengths(), values,
                                            tuple(layout.scalars))
            self._event_ds, self._log_ds = growing["event"], growing["log"]
            self._f["/routing/counts"].attrs["scope"] = layout.counts_scope
            self._start_swmr()
        except BaseException:
            self._discard()
            raise

    @_guarded
    def write_events(self, train_step: int, sample: Any, timestep: Any, expert: Any, *,
                     label: Any = None, prob: Any = None, counts: Any = None) -> slice:
        """Append B events of one training step: sample ids (B,), timesteps (B,), expert
        (B, layer, step, token); returns their event positions."""
        lo = self.layout
        nl, ns, nn, k = len(lo.layer_ids), len(lo.step_ids), len(lo.token_ids), lo.n_experts
        e = np.asarray(expert)
        b = e.shape[0] if e.ndim else 0
        e = _check("expert", e, (b, nl, ns, nn)).astype(np.uint8)
        sl = slice(self._events, self._events + b)
        self._grow(self._event_ds, sl.stop)
        f = self._f
        f["/events/step"][sl] = train_step
        f["/events/sample"][sl] = _check("sample", sample, (b,))
        f["/events/timestep"][sl] = _check("timestep", timestep, (b,))
        f["/events/label"][sl] = -1 if label is None else _check("label", label, (b,))
        f["/routing/expert"][sl] = e
        f["/routing/counts"][sl] = _counts(e, k) if counts is None else _check("counts", counts, (b, nl, ns, k))
        if prob is not None:
            if not lo.store_prob:
                raise TraceError("prob given but the layout has store_prob=False")
            f["/routing/prob"][sl] = _check("prob", prob, (b, nl, ns, nn, k)).astype(np.float16)
        self._events = sl.stop
        self._commit({"/progress/events": self._events})
        return sl

    @_guarded
    def log(self, train_step: int, **scalars: float) -> None:
        """Append one row of training scalars (every name in layout.scalars, NaN if absent)."""
        unknown = set(scalars) - set(self.layout.scalars)
        if unknown:
            raise TraceError(f"unknown training scalars {sorted(unknown)}; layout has {list(self.layout.scalars)}")
        i = self._logs
        self._grow(self._log_ds, i + 1)
        self._f["/train/step"][i] = train_step
        for name in self.layout.scalars:
            self._f[f"/train/{name}"][i] = scalars.get(name, np.nan)
        self._logs = i + 1
        self._commit({"/progress/logs": self._logs})

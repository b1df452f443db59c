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

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc/Zstd filters)
import numpy as np

from .compression import filter_kwargs
from .errors import TraceError
from .layout import SampleTable, SamplingLayout, TraceMeta, TrainingLayout
from .schema import (AXIS_COORDS, COUNT_FILL, EXPERT_FILL, LIBVER, SCHEMA_NAME, SCHEMA_VERSION,
                     WRITER_VERSION, chunk_shape)

_STR = h5py.string_dtype("utf-8")


class _BaseWriter:
    """File creation, root attributes, dimension scales, SWMR switch and clean close."""

    kind = ""

    def __init__(self, path: str | os.PathLike, meta: TraceMeta | None, rank: int,
                 world_size: int, overwrite: bool) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise TraceError(f"{self.path} exists (pass overwrite=True to replace it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = meta or TraceMeta()
        self._f = h5py.File(self.path, "w", libver=LIBVER)
        self._closed = False
        self._steps = 0
        self._scales: dict[str, h5py.Dataset] = {}
        a = self._f.attrs
        a["schema"] = SCHEMA_NAME
        a["schema_version"] = SCHEMA_VERSION
        a["writer_version"] = WRITER_VERSION
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
        for key, value in meta.extra.items():
            if key in a:
                raise TraceError(f"extra attribute {key!r} clashes with a schema attribute")
            a[key] = meta.to_json(value)

    # Creation helpers ---------------------------------------------------------------
    def _coord(self, path: str, values: Any, growing: bool = False) -> h5py.Dataset:
        """A coordinate dataset (chunked: contiguous data is unreadable under SWMR)."""
        arr = np.asarray(values)
        dtype = _STR if arr.dtype.kind in "UO" else arr.dtype
        n = 4096 if growing else min(max(len(arr), 1), 4096)
        d = self._f.create_dataset(path, data=arr, dtype=dtype, chunks=(n,),
                                   maxshape=(None,) if growing else (len(arr),))
        d.make_scale(path.rsplit("/", 1)[1])
        if growing:
            d.attrs["growing"] = True
        self._scales[path] = d
        return d

    def _grid(self, path: str, axes: tuple[str, ...], shape: tuple[int, ...], dtype: Any,
              role: str, fill: Any, n_outer: int, chunks: tuple[int, ...] | None = None) -> h5py.Dataset:
        """A dataset that grows along axis 0, chunked so one write call covers whole chunks."""
        dt = np.dtype(dtype)
        d = self._f.create_dataset(
            path, shape=(0, *shape[1:]), maxshape=(None, *shape[1:]), dtype=dt,
            chunks=chunks or chunk_shape(shape, dt.itemsize, n_outer), fillvalue=fill,
            **filter_kwargs(role))
        d.attrs["axes"] = np.array(axes, dtype=_STR)
        d.attrs["growing"] = True
        return d

    def _counter(self, path: str) -> h5py.Dataset:
        return self._f.create_dataset(path, shape=(1,), chunks=(1,), maxshape=(1,), dtype="i8", fillvalue=0)

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

    def close(self) -> None:
        """Clean close: mark /progress/closed, leave SWMR, then set root `complete=True`."""
        if self._closed:
            return
        self._closed = True
        self._f["/progress/closed"][0] = 1
        self._f.flush()
        self._f.close()
        try:
            f = h5py.File(self.path, "r+", libver=LIBVER)
        except OSError:
            # A live SWMR reader in another process holds a shared lock; the attribute write
            # is a small metadata edit that such readers never depend on (they watch
            # /progress/closed), so skip the lock rather than fail the clean close.
            f = h5py.File(self.path, "r+", libver=LIBVER, locking=False)
        with f:
            f.attrs["complete"] = True

    def abort(self) -> None:
        """Close without marking the trace complete (used when the caller raised)."""
        if not self._closed:
            self._closed = True
            self._f.flush()
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
                 overwrite: bool = False) -> None:
        super().__init__(path, meta, rank, world_size, overwrite)
        self.layout = layout
        self.samples = samples
        self._batch = slice(0, 0)
        try:
            self._create(layout, samples)
        except BaseException:
            self._f.close()
            raise
        self._start_swmr()

    def _create(self, lo: SamplingLayout, st: SampleTable) -> None:
        nb, nt, nl, ns, nn = lo.cell_shape()
        k = lo.n_experts
        nsamp = len(st)
        ids = np.arange(nsamp) if st.sample_id is None else np.asarray(st.sample_id)
        self._coord("/coords/sample", ids.astype(np.int64))
        self._coord("/coords/branch", np.array(list(lo.branches), dtype=object))
        self._coord("/coords/timestep", lo.timestep_ids)
        nan = np.full(nt, np.nan)
        self._coord("/coords/timestep_value", np.asarray(lo.timestep_values if lo.timestep_values is not None else nan, dtype=np.float64))
        self._coord("/coords/sigma", np.asarray(lo.sigmas if lo.sigmas is not None else nan, dtype=np.float64))
        self._coord("/coords/layer", lo.layer_ids)
        self._coord("/coords/step", lo.step_ids)
        self._coord("/coords/token", lo.token_ids)
        self._coord("/coords/expert", np.arange(k, dtype=np.int64))

        s = self._f.create_group("samples")
        s.create_dataset("prompt", data=np.array(list(st.prompt), dtype=object), dtype=_STR)
        s.create_dataset("seed", data=np.asarray(st.seed, dtype=np.int64))
        s.create_dataset("label", data=np.asarray(st.label if st.label is not None else [-1] * nsamp, dtype=np.int32))
        scenes = [sc if isinstance(sc, str) else TraceMeta.to_json(sc) for sc in (st.scene or [""] * nsamp)]
        s.create_dataset("scene", data=np.array(scenes, dtype=object), dtype=_STR)
        for d in s.values():
            d.attrs["axes"] = np.array(["sample"], dtype=_STR)

        g: list[h5py.Dataset] = []
        g.append(self._grid("/routing/expert", ("sample", "branch", "timestep", "layer", "step", "token"),
                            (nsamp, nb, nt, nl, ns, nn), np.uint8, "expert", EXPERT_FILL, 3))
        c = self._grid("/routing/counts", ("sample", "branch", "timestep", "layer", "step", "expert"),
                       (nsamp, nb, nt, nl, ns, k), np.int32, "small", COUNT_FILL, 1,
                       chunks=(1, nb, nt, nl, ns, k))
        c.attrs["scope"] = lo.counts_scope
        g.append(c)
        if lo.store_prob:
            g.append(self._grid("/routing/prob", ("sample", "branch", "timestep", "layer", "step", "token", "expert"),
                                (nsamp, nb, nt, nl, ns, nn, k), np.float16, "prob", np.nan, 3))
        lt = lo.latent_token_ids
        if lt is not None:
            self._coord("/latents/token_index", lt)
            self._coord("/coords/dim", np.arange(lo.latent_dim, dtype=np.int64))
            if lo.projection is not None:
                p = np.asarray(lo.projection, dtype=np.float32)
                self._coord("/coords/source_dim", np.arange(p.shape[0], dtype=np.int64))
                pd = self._f.create_dataset("/latents/projection", data=p, chunks=p.shape)
                pd.attrs["axes"] = np.array(["source_dim", "dim"], dtype=_STR)
            g.append(self._grid("/latents/h", ("sample", "branch", "timestep", "layer", "step", "stored_token", "dim"),
                                (nsamp, nb, nt, nl, ns, len(lt), lo.latent_dim), np.float16, "latents", np.nan, 3))
        if lo.image_shape is not None:
            h, w, ch = lo.image_shape
            self._coord("/coords/height", np.arange(h, dtype=np.int64))
            self._coord("/coords/width", np.arange(w, dtype=np.int64))
            self._coord("/coords/channel", np.arange(ch, dtype=np.int64))
            if lo.decode_steps:
                self._coord("/coords/decoded_branch", np.array(list(lo.decoded_branches), dtype=object))
                g.append(self._grid("/decoded/step",
                                    ("sample", "decoded_branch", "timestep", "layer", "step", "height", "width", "channel"),
                                    (nsamp, len(lo.decoded_branches), nt, nl, ns, h, w, ch), np.uint8, "decoded", 0, 3))
            g.append(self._grid("/decoded/final", ("sample", "height", "width", "channel"),
                                (nsamp, h, w, ch), np.uint8, "decoded", 0, 1))
        g.append(self._grid("/progress/written", ("sample", "timestep"), (nsamp, nt), np.uint8,
                            "small", 0, 1, chunks=(256, nt)))
        g.append(self._grid("/progress/final_written", ("sample",), (nsamp,), np.uint8, "small", 0, 1,
                            chunks=(256,)))
        self._counter("/progress/steps")
        self._counter("/progress/closed")
        self._growing = g

    def begin_batch(self, n: int) -> slice:
        """Open the next `n` samples (rows of the SampleTable); returns their positions."""
        start = self._batch.stop
        if n <= 0 or start + n > len(self.samples):
            raise TraceError(f"batch of {n} samples exceeds the {len(self.samples)} planned samples (at {start})")
        self._batch = slice(start, start + n)
        self._grow(self._growing, start + n)
        self._f.flush()
        return self._batch

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

    def write_final(self, images: Any) -> None:
        """Final decoded images (B, H, W, C) uint8 of the open batch."""
        if "/decoded/final" not in self._f:
            raise TraceError("final images given but the layout has no image_shape")
        b = self._batch.stop - self._batch.start
        self._f["/decoded/final"][self._batch] = _check("images", images, (b, *self.layout.image_shape)).astype(np.uint8)
        self._f.flush()
        self._f["/progress/final_written"][self._batch] = 1
        self._commit({})


class TrainingWriter(_BaseWriter):
    """Writes a training trace: routing events (training step, sample, timestep) and scalars."""

    kind = "training"

    def __init__(self, path: str | os.PathLike, layout: TrainingLayout, meta: TraceMeta | None = None,
                 *, rank: int = 0, world_size: int = 1, overwrite: bool = False) -> None:
        super().__init__(path, meta, rank, world_size, overwrite)
        self.layout = layout
        self._events = 0
        self._logs = 0
        try:
            self._create(layout)
        except BaseException:
            self._f.close()
            raise
        self._start_swmr()

    def _create(self, lo: TrainingLayout) -> None:
        nl, ns, nn, k = len(lo.layer_ids), len(lo.step_ids), len(lo.token_ids), lo.n_experts
        self._coord("/coords/layer", lo.layer_ids)
        self._coord("/coords/step", lo.step_ids)
        self._coord("/coords/token", lo.token_ids)
        self._coord("/coords/expert", np.arange(k, dtype=np.int64))
        self._coord("/events/step", np.zeros(0, np.int64), growing=True)
        self._coord("/events/sample", np.zeros(0, np.int64), growing=True)
        self._coord("/events/timestep", np.zeros(0, np.float64), growing=True)
        self._coord("/train/step", np.zeros(0, np.int64), growing=True)
        ev = [self._scales[p] for p in ("/events/step", "/events/sample", "/events/timestep")]
        ev.append(self._grid("/events/label", ("event",), (0,), np.int32, "small", -1, 1, chunks=(4096,)))
        ev.append(self._grid("/routing/expert", ("event", "layer", "step", "token"), (0, nl, ns, nn),
                             np.uint8, "expert", EXPERT_FILL, 1))
        ev.append(self._grid("/routing/counts", ("event", "layer", "step", "expert"), (0, nl, ns, k),
                             np.int32, "small", COUNT_FILL, 1, chunks=(64, nl, ns, k)))
        ev[-1].attrs["scope"] = lo.counts_scope
        if lo.store_prob:
            ev.append(self._grid("/routing/prob", ("event", "layer", "step", "token", "expert"),
                                 (0, nl, ns, nn, k), np.float16, "prob", np.nan, 1))
        logs = [self._scales["/train/step"]]
        for name in lo.scalars:
            logs.append(self._grid(f"/train/{name}", ("log",), (0,), np.float32, "small", np.nan, 1, chunks=(4096,)))
        for c in ("/progress/steps", "/progress/events", "/progress/logs", "/progress/closed"):
            self._counter(c)
        self._event_ds, self._log_ds = ev, logs

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

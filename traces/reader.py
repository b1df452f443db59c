"""Lazy, validating trace reader: selections, streaming blocks, and following a live file.

Files are opened in SWMR-read mode whenever HDF5 allows it: that is the only mode in which a
file whose writer was killed (or is still running) opens without external tools, and it
costs nothing for finished files. Opening reads only attributes and small coordinates;
every data access reads just the chunks its selection touches.

A joined trace (`python -m traces join`) reads its rank files through HDF5 virtual datasets.
HDF5 silently returns fill values for a rank file it cannot find (and, for a relative source
name, falls back to the working directory, where another run's file of that name may sit), so
opening checks that every rank file is there, beside the joined file as stored, and belongs to
the joined recording; reads then look the rank files up from the joined file's real folder.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from cli_common.outputs import os_error_reason

from . import select
from .compression import missing_plugin, plugin_hint  # also registers the Blosc filters if installed
from .errors import TraceError
from .schema import (
    AXIS_COORDS,
    JSON_ATTRS,
    KINDS,
    OUTER_AXES,
    REQUIRED,
    ROOT_ATTRS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    VALUE_AXES,
    find,
)

# Chunk cache per open dataset: big enough for every chunk one slice read touches.
_CACHE = dict(rdcc_nbytes=32 << 20, rdcc_nslots=10007)


@dataclass
class Block:
    """One stored chunk's worth of data with the coordinates of every axis it spans."""

    data: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, Any]


@dataclass
class Progress:
    """What `follow()` reports each time a live trace grows."""

    steps: int
    new_steps: int
    closed: bool


def open_trace(path: str | os.PathLike) -> "TraceReader":
    """Open and validate a trace; raises TraceError (one line) if it is not a usable one."""
    p = Path(path)
    if p.is_dir():
        raise TraceError(f"{p} is a folder, not a trace file (give one .h5 file)")
    if not p.is_file():
        raise TraceError(f"{p}: no such file")
    if not h5py.is_hdf5(p):
        raise TraceError(f"{p}: not an HDF5 file (no HDF5 signature; truncated to nothing or another format)")
    # Plain open first: it checks the stored end-of-file, so truncation is caught. A file
    # whose writer is running or was killed refuses plain opens (consistency flags, lock);
    # SWMR-read mode is made for exactly those files.
    try:
        f = h5py.File(p, "r", **_CACHE)
    except OSError as exc:
        first = _first_line(exc)
        if "truncated" in first:
            raise TraceError(f"{p}: HDF5 file is truncated or damaged ({first})") from None
        try:
            f = h5py.File(p, "r", swmr=True, **_CACHE)
        except OSError as exc2:
            raise TraceError(f"{p}: HDF5 file cannot be opened, truncated or damaged "
                             f"({_first_line(exc2)})") from None
    try:
        return TraceReader(f, p)
    except BaseException:
        f.close()
        raise


class TraceReader:
    """Read access to one trace (a rank file or a joined file). Use as a context manager."""

    def __init__(self, f: h5py.File, path: Path) -> None:
        self._f = f
        self.path = path
        self._ds: dict[str, h5py.Dataset] = {}
        self._validate()
        self.attrs = self._load_attrs()
        self.kind: str = self.attrs["kind"]
        self._vds_access = self._check_rank_files()
        self.coords = self._load_coords()

    # Validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        a = self._f.attrs
        name = _text(a.get("schema"))
        if name != SCHEMA_NAME:
            what = "no 'schema' attribute" if name is None else f"schema {name!r}"
            raise TraceError(f"{self.path}: foreign HDF5 file ({what}, expected {SCHEMA_NAME!r})")
        try:
            version = int(a["schema_version"])
        except (KeyError, TypeError, ValueError):
            raise TraceError(f"{self.path}: {SCHEMA_NAME} file without a readable schema_version") from None
        if version > SCHEMA_VERSION:
            raise TraceError(f"{self.path}: schema version {version} is newer than this reader "
                             f"(supports {SCHEMA_VERSION}); upgrade the traces package")
        if version < SCHEMA_VERSION:
            raise TraceError(f"{self.path}: schema version {version} is older than supported "
                             f"version {SCHEMA_VERSION}; re-record the trace")
        kind = _text(a.get("kind"))
        if kind not in KINDS:
            raise TraceError(f"{self.path}: unknown trace kind {kind!r} (expected one of {KINDS})")
        for path in REQUIRED[kind]:
            if path not in self._f:
                raise TraceError(f"{self.path}: missing required dataset {path}")

    def _check_rank_files(self) -> h5py.h5p.PropDAID | None:
        """For a joined trace: refuse it unless every rank file its virtual datasets map is where
        the joined file says (relative to its real folder), opens, is a rank of this recording and
        holds every mapped row; return the dataset access property that makes HDF5 look the rank
        files up in that folder. None for a rank file or a single-rank trace."""
        virtual = [d for d in _datasets(self._f) if d.is_virtual]
        if not virtual:
            return None
        base = Path(os.path.realpath(self.path)).parent
        joined_from = self.attrs.get("joined_from")
        ranks = {name: i for i, name in enumerate(joined_from)} if isinstance(joined_from, list) else {}
        needed: dict[str, dict[str, int]] = {}  # rank file -> dataset -> rows the mapping reads
        for d in virtual:
            for m in d.virtual_sources():
                rows = needed.setdefault(m.file_name, {})
                rows[m.dset_name] = max(rows.get(m.dset_name, 0), m.src_space.get_select_bounds()[1][0] + 1)
        for name, rows in needed.items():
            where = Path(name) if os.path.isabs(name) else base / name
            _check_rank_file(self.path, where, name, rows, self.attrs.get("run_id"), ranks.get(name))
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_virtual_prefix(os.fsencode(str(base)))  # not the working directory, whatever it is
        return dapl

    def _load_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self._f.attrs.items():
            v = _text(v) if isinstance(v, (str, bytes)) else (v.item() if isinstance(v, np.generic) else v)
            # Schema JSON attributes, and extra attributes a writer stored as JSON (TraceMeta.extra).
            if isinstance(v, str) and (k in JSON_ATTRS or (k not in ROOT_ATTRS and v[:1] in "[{")):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass
            out[k] = v
        return out

    def _load_coords(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for axis, paths in AXIS_COORDS.items():
            if axis in ("event", "log"):
                continue  # growing; read through events() / train()
            for i, p in enumerate(paths):
                if p in self._f:
                    arr = self._f[p][()]
                    if arr.dtype.kind == "O":
                        arr = np.array([_text(x) for x in arr])
                    out[axis if i == 0 else p.rsplit("/", 1)[1]] = arr
        if self.kind == "sampling":
            out["sample"] = out["sample"][: self.n_samples]
        return out

    # Basic properties ---------------------------------------------------------------------
    @property
    def file(self) -> h5py.File:
        """The open h5py file (for tools that copy or inspect it as a whole)."""
        return self._f

    def dataset(self, path: str) -> h5py.Dataset:
        """The h5py dataset (cached, refreshed by `refresh()`)."""
        if path not in self._ds:
            if path not in self._f:
                raise TraceError(f"{self.path}: trace has no dataset {path}")
            d = self._f[path]
            if self._vds_access is not None and isinstance(d, h5py.Dataset) and d.is_virtual:
                d = h5py.Dataset(h5py.h5d.open(self._f.id, d.name.encode(), dapl=self._vds_access))
            self._ds[path] = d
        return self._ds[path]

    def has(self, path: str) -> bool:
        return path in self._f

    def axes(self, path: str) -> tuple[str, ...]:
        return tuple(_text(x) for x in self.dataset(path).attrs["axes"])

    @property
    def complete(self) -> bool:
        """True only when the writer closed cleanly (root attribute)."""
        return bool(self._f.attrs["complete"])

    @property
    def live(self) -> bool:
        """True while a writer may still be appending: not complete, and the process that wrote it
        (`writer_pid` on `writer_host`) still runs. Only a writer on this host can be checked; a
        trace whose writer ran elsewhere, or is this very process, counts as not live."""
        pid = self._checkable_writer()
        return pid is not None and _process_exists(pid)

    @property
    def writer_gone(self) -> bool:
        """True when the trace is incomplete and its writer is known to have ended without closing
        it (a killed run's): one file (not joined from ranks that may run elsewhere), written on
        this host in this pid namespace (a container can share the host name), whose writer
        process no longer exists, so nothing will append to it. Anything that cannot be checked
        (another host, another or unrecorded namespace, a joined trace): False."""
        pid = self._checkable_writer()
        return (pid is not None and "joined_from" not in self.attrs
                and self.attrs.get("writer_pid_namespace") == pid_namespace() is not None
                and not _process_exists(pid))

    def _checkable_writer(self) -> int | None:
        """The writer's pid of an incomplete trace written by another process on this host."""
        if self.complete:
            return None
        pid, host = self.attrs.get("writer_pid"), self.attrs.get("writer_host")
        try:
            pid = int(pid)
        except (TypeError, ValueError):  # absent or not a number: nothing to check
            return None
        if not 0 < pid < 1 << 22 or host != socket.gethostname() or pid == os.getpid():  # Linux pids < 2**22
            return None
        return pid

    @property
    def closed(self) -> bool:
        """True once the writer reached close(); visible to live readers before `complete`."""
        return bool(self.dataset("/progress/closed")[0])

    @property
    def steps(self) -> int:
        """Write calls flushed so far (the live-reader cursor)."""
        return int(self.dataset("/progress/steps")[0])

    @property
    def n_samples(self) -> int:
        """Samples begun so far (sampling traces); see `written` for which cells hold data."""
        return int(self.dataset("/routing/expert").shape[0]) if self.kind == "sampling" else 0

    @property
    def n_events(self) -> int:
        """Events whose data is flushed (training traces)."""
        if self.kind != "training":
            return 0
        return min(int(self.dataset("/progress/events")[0]), self.dataset("/routing/expert").shape[0])

    @property
    def written(self) -> np.ndarray:
        """(sample, timestep) bool mask of flushed cells (sampling traces)."""
        return self.dataset("/progress/written")[: self.n_samples].astype(bool)

    @property
    def final_written(self) -> np.ndarray:
        return self.dataset("/progress/final_written")[: self.n_samples].astype(bool)

    # Selections -----------------------------------------------------------------------
    def read(self, path: str, **sel: Any) -> np.ndarray:
        """Select from any gridded dataset by axis name, e.g. read('/latents/h', layer=12).

        Each axis takes None (all), an int (axis dropped), a slice, a list/array of ints or a
        bool mask; `layer` ints are block indices (coordinate values; slices stay positional);
        `branch` also takes names ('cond'). Unwritten cells hold the fill value (255 for
        expert ids, NaN for floats, -1 for counts, 0 for images).
        """
        return self._select(self.dataset(path), self._keys(path, sel), self._chunks(path))

    def _select(self, d: h5py.Dataset, keys: list[Any], chunks: tuple[int, ...]) -> np.ndarray:
        """select.read, with a missing compression plugin reported as what to install, and any
        other read failure (a damaged chunk, an I/O error) as where it happened."""
        try:
            return select.read(d, keys, chunks)
        except OSError as e:
            missing = missing_plugin(d)
            if missing is not None:
                raise TraceError(f"{self.path}: {d.name}: {plugin_hint(missing)}") from None
            where = ", ".join(f"{axis} {self._coordinate(axis, key)}"
                              for axis, key in zip(self.axes(d.name), keys) if isinstance(key, int))
            cause = "its writer is still running: try again" if self.live else "the file may be damaged there"
            raise TraceError(f"{self.path}: {d.name}{f' at {where}' if where else ''} cannot be read "
                             f"({os_error_reason(e)}): {cause}") from None

    def _coordinate(self, axis: str, index: int) -> Any:
        """The coordinate value at a position of an axis (a sample's id, a branch's name, a layer's
        block index), as users name it; the position itself where the axis has none."""
        values = self.coords.get(axis)
        if values is None or not 0 <= index < len(values):
            return index
        value = values[index]
        return _text(value) if isinstance(value, (bytes, str, np.str_)) else np.asarray(value).item()

    def _chunks(self, path: str) -> tuple[int, ...]:
        """Chunk shape, or for a virtual dataset (joined ranks) the schema's chunk rule."""
        d = self.dataset(path)
        if d.chunks:
            return d.chunks
        spec = find(self.kind, path)
        if spec is not None and spec.chunks is not None:
            return spec.chunk_shape(d.shape)
        return tuple(1 if a in OUTER_AXES else n for a, n in zip(self.axes(path), d.shape))

    def _keys(self, path: str, sel: dict[str, Any]) -> list[Any]:
        axes = self.axes(path)
        unknown = set(sel) - set(axes)
        if unknown:
            raise TraceError(f"{path} has no axis {sorted(unknown)}; axes are {list(axes)}")
        shape = list(self.dataset(path).shape)
        if axes[0] == "event":
            shape[0] = self.n_events
        return [select.resolve(sel.get(ax), ax, n, self.coords.get(ax), ax in VALUE_AXES)
                for ax, n in zip(axes, shape)]

    def routing(self, **sel: Any) -> np.ndarray:
        """Expert ids (uint8). Axes: sample, branch, timestep, layer, step, token (sampling);
        event, layer, step, token (training)."""
        return self.read("/routing/expert", **sel)

    def prob(self, **sel: Any) -> np.ndarray:
        """Gate probabilities (float16), routing axes plus expert."""
        return self.read("/routing/prob", **sel)

    def counts(self, **sel: Any) -> np.ndarray:
        """Expert counts (int32), routing axes with token replaced by expert."""
        return self.read("/routing/counts", **sel)

    def latents(self, **sel: Any) -> np.ndarray:
        """h_l of the stored token subset (float16): ..., stored_token, dim."""
        return self.read("/latents/h", **sel)

    def decoded(self, **sel: Any) -> np.ndarray:
        """Early-exit decoded images (uint8): sample, decoded_branch, timestep, layer, step, H, W, C."""
        return self.read("/decoded/step", **sel)

    def final(self, **sel: Any) -> np.ndarray:
        """Final images (uint8): sample, height, width, channel."""
        return self.read("/decoded/final", **sel)

    def index(self, coord: str, values: Any) -> np.ndarray:
        """Positions of coordinate values, e.g. index('timestep_value', [999, 500])."""
        if coord not in self.coords:
            raise TraceError(f"no coordinate {coord!r}; have {sorted(self.coords)}")
        return select._lookup(np.atleast_1d(values), coord, self.coords[coord])

    def sample_rows(self) -> dict[int, int]:
        """Row of each sample id (`/coords/sample`). Ids and rows differ in rank files and joined
        traces (rank r of W holds ids r, r + W, ...): blocks name samples by id, per-sample tables
        are by row."""
        return {int(i): row for row, i in enumerate(self.coords["sample"])}

    def samples(self) -> dict[str, Any]:
        """Per-sample metadata of the recorded samples: prompt, seed, label, scene (parsed)."""
        n = self.n_samples
        prompt = [_text(x) for x in self.dataset("/samples/prompt")[:n]]
        scene = [_maybe_json(_text(x)) for x in self.dataset("/samples/scene")[:n]]
        return {"sample": self.coords["sample"], "prompt": prompt,
                "seed": self.dataset("/samples/seed")[:n], "label": self.dataset("/samples/label")[:n],
                "scene": scene}

    def scene(self, sample: int) -> Any:
        """One sample's `/samples/scene` (parsed JSON, "" when none), without reading the others."""
        return _maybe_json(_text(self.dataset("/samples/scene")[sample]))

    def events(self) -> dict[str, np.ndarray]:
        """Training events: step, sample, timestep, label (flushed events only)."""
        n = self.n_events
        return {k: self.dataset(f"/events/{k}")[:n] for k in ("step", "sample", "timestep", "label")}

    def train(self) -> dict[str, np.ndarray]:
        """Training scalars by name (loss, balance, ...) plus their training 'step'."""
        n = int(self.dataset("/progress/logs")[0])
        out = {"step": self.dataset("/train/step")[:n]}
        for name, d in self._f["train"].items():
            if name != "step":
                out[name] = self.dataset(d.name)[:n]
        return out

    # Streaming -------------------------------------------------------------------------
    def iter_chunks(self, path: str = "/routing/expert", *, only_written: bool = True,
                    **sel: Any) -> Iterator[Block]:
        """Yield one Block per stored chunk cell (sample x branch x timestep, or event).

        Lets statistics stream over a trace of any size with one chunk in memory; cells not
        yet written (live or killed runs) are skipped unless only_written=False.
        """
        d = self.dataset(path)
        axes = self.axes(path)
        keys = self._keys(path, sel)
        n_outer = next((i for i, a in enumerate(axes) if a not in OUTER_AXES), len(axes))
        outer = [np.atleast_1d(np.arange(k.start, k.stop, k.step) if isinstance(k, slice) else k)
                 for k in keys[:n_outer]]
        mask = self._written_lookup(axes) if only_written else None
        ev = self.events() if self.kind == "training" else None
        chunks = self._chunks(path)  # once: on a joined file it reads HDF5 attributes
        # the outer coordinates as Python values, once per pass (not one .item() per chunk)
        values = {ax: self.coords[ax].tolist() for ax in (*axes[:n_outer], "timestep_value", "sigma")
                  if ax in self.coords}
        for combo in itertools.product(*outer):
            pos = dict(zip(axes[:n_outer], (int(c) for c in combo)))
            if mask is not None and not mask(pos):
                continue
            data = self._select(d, [int(c) for c in combo] + keys[n_outer:], chunks)
            yield Block(data, axes[n_outer:], self._block_coords(pos, axes[n_outer:], keys[n_outer:], ev, values))

    def _written_lookup(self, axes: tuple[str, ...]):
        if self.kind == "sampling" and "sample" in axes and "timestep" in axes:
            w = self.written
            return lambda p: bool(w[p["sample"], p["timestep"]] if "timestep" in p else w[p["sample"]].any())
        if self.kind == "training":
            n = self.n_events
            return lambda p: p["event"] < n
        return None

    def _block_coords(self, pos: dict[str, int], inner: tuple[str, ...], keys: list[Any],
                      ev: dict[str, np.ndarray] | None, values: dict[str, list]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ax, i in pos.items():
            if ax == "event" and ev is not None:
                out.update(event=i, train_step=int(ev["step"][i]), sample=int(ev["sample"][i]),
                           timestep=float(ev["timestep"][i]))
                continue
            c = values.get(ax)
            out[ax] = c[i] if c is not None else i
            if ax == "timestep":
                out["timestep_value"] = float(values["timestep_value"][i])
                out["sigma"] = float(values["sigma"][i])
        for ax, k in zip(inner, keys):
            c = self.coords.get(ax)
            if c is not None:
                out[ax] = c[k] if not isinstance(k, int) else c[k].item()
        return out

    # Live files ---------------------------------------------------------------------------
    def refresh(self) -> int:
        """Pick up what a running writer flushed since; returns the step counter."""
        if self._f.swmr_mode:
            for d in self._ds.values():
                d.refresh()
            self.dataset("/progress/steps").refresh()
            self.dataset("/progress/closed").refresh()
        if self.kind == "sampling":
            self.coords["sample"] = self._f["/coords/sample"][: self.n_samples]
        return self.steps

    def follow(self, poll_s: float = 0.1, idle_timeout_s: float | None = 60.0) -> Iterator[Progress]:
        """Yield Progress whenever the step counter grows; stop when the writer closes
        cleanly, or after idle_timeout_s without growth (a dead writer)."""
        last = 0
        idle_since = time.monotonic()
        while True:
            n = self.refresh()
            closed = self.closed
            if n > last or closed:
                yield Progress(steps=n, new_steps=n - last, closed=closed)
                last, idle_since = n, time.monotonic()
            if closed:
                return
            if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                return
            time.sleep(poll_s)

    # Lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        self._ds.clear()
        self._f.close()

    def __enter__(self) -> "TraceReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TraceReader {self.path} kind={self.kind} steps={self.steps} complete={self.complete}>"


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    f.visititems(lambda _, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _check_rank_file(joined: Path, where: Path, name: str, rows: dict[str, int], run_id: Any,
                     rank: int | None) -> None:
    """One rank file of a joined trace: there, readable, of the same recording, long enough."""
    what = f"{joined}: joined trace whose rank file {name}"
    shown = os.path.normpath(where)
    if not where.is_file():
        raise TraceError(f"{what} is missing (looked for {shown}); keep the rank files where they were "
                         f"relative to the joined file, or join them again")
    try:
        try:
            f = h5py.File(where, "r")
        except OSError:
            f = h5py.File(where, "r", swmr=True)  # a killed rank opens only in SWMR-read mode
    except OSError as exc:
        raise TraceError(f"{what} ({shown}) cannot be opened ({_first_line(exc)})") from None
    with f:
        if _text(f.attrs.get("run_id")) != run_id or (rank is not None and int(f.attrs.get("rank", -2)) != rank):
            raise TraceError(f"{what} ({shown}) is not rank {rank} of this recording (another file in its "
                             f"place); join the right rank files again")
        for dset, n in rows.items():
            if dset not in f or f[dset].shape[0] < n:
                raise TraceError(f"{what} ({shown}) holds less than was joined ({dset}); it was replaced "
                                 f"or truncated: join the rank files again")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _text(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.shape == ():
        return _text(v[()])
    return v


def _maybe_json(s: str) -> Any:
    if not s:
        return None
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def pid_namespace() -> str | None:
    """This process's pid namespace (Linux, e.g. "pid:[4026531836]"), None where there is none to read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True

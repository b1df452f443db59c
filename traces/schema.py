"""The `rsr-trace` HDF5 schema as data: names, versions, and one table of every dataset.

`SAMPLING`, `TRAINING` and `DERIVED` list each dataset once (path, axes, dtype, fill, chunk
rule, filter). The writers create files from these tables, the size estimate prices them,
and the reader takes its required datasets, coordinates and chunk rules from them, so a
schema change is one edit here (plus SCHEMA.md and a version bump when old readers would
misread the file).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

SCHEMA_NAME = "rsr-trace"
SCHEMA_VERSION = 1
WRITER_VERSION = "traces 1.0.0"

KINDS = ("sampling", "training")

# HDF5 file-format bounds: v110 objects stay readable by HDF5 1.10+ tools and wheels,
# and SWMR needs at least v110 (SCHEMA.md, "Durability").
LIBVER = ("v110", "latest")

# `toolkit_version` (the thinking-pixel package that wrote the file) is absent from traces written
# before it was added: readers take it when present and never require it.
ROOT_ATTRS = (
    "schema", "schema_version", "writer_version", "toolkit_version", "created", "kind", "complete",
    "model_config", "rsr_config", "checkpoint_sha256", "command", "seeds", "scheduler",
    "rank", "world_size",
)
JSON_ATTRS = ("model_config", "rsr_config", "seeds", "scheduler", "joined_from")

# Expert ids are uint8 and the top two values are markers, so a model may have at most
# MAX_EXPERTS experts (ids 0..MAX_EXPERTS-1). rsr_model.config imports this limit.
EXPERT_FILL = 255     # unwritten
EXPERT_ABLATED = 254  # an intervention removed the adapter of this token (expert -1 in the model)
MAX_EXPERTS = EXPERT_ABLATED
COUNT_FILL = -1

# Training traces always log these scalars (more may be added per run).
REQUIRED_SCALARS = ("loss", "balance")

# Axes whose integer selections mean coordinate values, not positions (block indices are
# how researchers name layers; a positional 3 that silently meant block 11 would mislead).
VALUE_AXES = ("layer",)

# Axes a writer call holds one index of: one chunk per combination (Block of iter_chunks).
OUTER_AXES = ("sample", "branch", "decoded_branch", "timestep", "event")

# Chunks stay under this many bytes (h5py guidance: 10 KiB .. 1 MiB; every read touches
# whole chunks, so bigger chunks make slice reads slower).
MAX_CHUNK_BYTES = 1 << 20


def chunk_shape(shape: tuple[int, ...], itemsize: int, n_outer: int) -> tuple[int, ...]:
    """Chunk = one cell of the first `n_outer` axes times whole inner axes, shrunk to fit.

    The outer axes are the ones a sampler step writes one index of (sample, branch,
    timestep), so every write covers whole chunks: no partial-chunk rewrites, which bloat
    compressed SWMR files. Inner axes are cut from the left (layer first) only when a chunk
    would exceed MAX_CHUNK_BYTES.
    """
    chunk = [1] * n_outer + [max(1, int(n)) for n in shape[n_outer:]]
    for axis in range(n_outer, len(chunk)):
        if math.prod(chunk) * itemsize <= MAX_CHUNK_BYTES:
            break
        rest = math.prod(chunk[axis + 1:]) * itemsize
        chunk[axis] = max(1, min(chunk[axis], MAX_CHUNK_BYTES // max(rest, 1)))
    return tuple(chunk)


@dataclass(frozen=True)
class Chunking:
    """Chunk rule: `rows` along axis 0 (None: the whole axis), 1 along axes 1..outer-1, whole
    inner axes; `fit` cuts inner axes to stay under MAX_CHUNK_BYTES (see `chunk_shape`)."""

    outer: int = 1
    rows: int | None = 1
    fit: bool = False

    def shape(self, shape: tuple[int, ...], itemsize: int, grows: bool) -> tuple[int, ...]:
        if self.fit:
            inner = chunk_shape(shape, itemsize, self.outer)[1:]
        else:
            inner = (1,) * (self.outer - 1) + tuple(max(1, int(n)) for n in shape[self.outer:])
        rows = shape[0] if self.rows is None else self.rows
        if not grows:  # a fixed-size axis cannot hold a chunk longer than itself
            rows = min(rows, shape[0])
        return (max(1, rows), *inner)


CELL = Chunking(outer=3, fit=True)        # one (sample, branch, timestep) write cell
SAMPLE = Chunking(outer=1, fit=True)      # one sample (or event)
COLUMN = Chunking(rows=4096)              # 1-D coordinates and series
WHOLE = Chunking(rows=None)               # small constant arrays: one chunk

# Filter names (keys of traces.compression.FILTERS): chosen by measurement, SCHEMA.md.
IDS = "blosc-zstd3+bitshuffle"
FLOATS = "blosc-zstd3+shuffle"


@dataclass(frozen=True)
class Dataset:
    """One dataset of the schema.

    role: `grid` (grows along axis 0 as a run writes, `growing` attribute), `coord` (a
    dimension scale; `grows` for event/log coordinates), `table` (written once before SWMR:
    per-sample columns and constants), `counter` (int64 (1,) progress cursor).
    `when` names the layout feature that turns an optional dataset on (None: always present).
    `chunks` None means contiguous (written once, never grown).
    """

    path: str
    axes: tuple[str, ...]
    dtype: str
    fill: Any = None
    chunks: Chunking | None = COLUMN
    filter: str = "none"
    role: str = "grid"
    when: str | None = None
    required: bool = False
    grows: bool = False

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object if self.dtype == "str" else self.dtype)

    def shape(self, lengths: dict[str, int]) -> tuple[int, ...]:
        """Full shape for given axis lengths (a counter is (1,))."""
        return tuple(lengths[a] for a in self.axes) if self.axes else (1,)

    def chunk_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        if self.chunks is None:
            return None
        return self.chunks.shape(shape, self.numpy_dtype.itemsize, self.grows)


def _grid(path: str, axes: tuple[str, ...], dtype: str, fill: Any, chunks: Chunking, filter: str = "none",
          **kw: Any) -> Dataset:
    return Dataset(path, axes, dtype, fill, chunks, filter, role="grid", grows=True, **kw)


def _coord(path: str, axis: str, dtype: str = "int64", **kw: Any) -> Dataset:
    return Dataset(path, (axis,), dtype, role="coord", **kw)


def _counter(path: str) -> Dataset:
    return Dataset(path, (), "int64", 0, Chunking(), role="counter", required=True)


_CELL_AXES = ("sample", "branch", "timestep", "layer", "step")
_EVENT_AXES = ("event", "layer", "step")

SAMPLING: tuple[Dataset, ...] = (
    _coord("/coords/sample", "sample", required=True),
    _coord("/coords/branch", "branch", "str", required=True),
    _coord("/coords/timestep", "timestep", required=True),
    _coord("/coords/timestep_value", "timestep", "float64", required=True),
    _coord("/coords/sigma", "timestep", "float64", required=True),
    _coord("/coords/layer", "layer", required=True),
    _coord("/coords/step", "step", required=True),
    _coord("/coords/token", "token", required=True),
    _coord("/coords/expert", "expert", required=True),
    Dataset("/samples/prompt", ("sample",), "str", chunks=None, role="table", required=True),
    Dataset("/samples/seed", ("sample",), "int64", chunks=None, role="table", required=True),
    Dataset("/samples/label", ("sample",), "int32", chunks=None, role="table", required=True),
    Dataset("/samples/scene", ("sample",), "str", chunks=None, role="table", required=True),
    _grid("/routing/expert", (*_CELL_AXES, "token"), "uint8", EXPERT_FILL, CELL, IDS, required=True),
    _grid("/routing/counts", (*_CELL_AXES, "expert"), "int32", COUNT_FILL, Chunking(), required=True),
    _grid("/routing/prob", (*_CELL_AXES, "token", "expert"), "float16", np.nan, CELL, IDS, when="prob"),
    _coord("/latents/token_index", "stored_token", when="latents"),
    _coord("/coords/dim", "dim", when="latents"),
    _coord("/coords/source_dim", "source_dim", when="projection"),
    Dataset("/latents/projection", ("source_dim", "dim"), "float32", chunks=WHOLE, role="table",
            when="projection"),
    _grid("/latents/h", (*_CELL_AXES, "stored_token", "dim"), "float16", np.nan, CELL, FLOATS, when="latents"),
    _coord("/coords/height", "height", when="images"),
    _coord("/coords/width", "width", when="images"),
    _coord("/coords/channel", "channel", when="images"),
    _coord("/coords/decoded_branch", "decoded_branch", "str", when="decoded_steps"),
    _grid("/decoded/step", ("sample", "decoded_branch", "timestep", "layer", "step", "height", "width", "channel"),
          "uint8", 0, CELL, FLOATS, when="decoded_steps"),
    _grid("/decoded/final", ("sample", "height", "width", "channel"), "uint8", 0, SAMPLE, FLOATS, when="images"),
    _grid("/progress/written", ("sample", "timestep"), "uint8", 0, Chunking(rows=256), required=True),
    _grid("/progress/final_written", ("sample",), "uint8", 0, Chunking(rows=256), required=True),
    _counter("/progress/steps"),
    _counter("/progress/closed"),
)

TRAINING: tuple[Dataset, ...] = (
    _coord("/coords/layer", "layer", required=True),
    _coord("/coords/step", "step", required=True),
    _coord("/coords/token", "token", required=True),
    _coord("/coords/expert", "expert", required=True),
    _coord("/events/step", "event", grows=True, required=True),
    _coord("/events/sample", "event", grows=True, required=True),
    _coord("/events/timestep", "event", "float64", grows=True, required=True),
    _coord("/train/step", "log", grows=True, required=True),
    _grid("/events/label", ("event",), "int32", -1, COLUMN),
    _grid("/routing/expert", (*_EVENT_AXES, "token"), "uint8", EXPERT_FILL, SAMPLE, IDS, required=True),
    _grid("/routing/counts", (*_EVENT_AXES, "expert"), "int32", COUNT_FILL, Chunking(rows=64), required=True),
    _grid("/routing/prob", (*_EVENT_AXES, "token", "expert"), "float16", np.nan, SAMPLE, IDS, when="prob"),
    _grid("/train/{scalar}", ("log",), "float32", np.nan, COLUMN, required=True),  # one per scalar name
    _counter("/progress/steps"),
    _counter("/progress/events"),
    _counter("/progress/logs"),
    _counter("/progress/closed"),
)

# Written into a finished sampling trace by `traces.derived` (probes.projections computes it).
# PCA coordinates have the latents' grid with `component` in place of `dim`.
DERIVED: tuple[Dataset, ...] = (
    Dataset("/derived/pca/coords", (*_CELL_AXES, "stored_token", "component"), "float32", np.nan,
            Chunking(outer=3), "gzip-4", when="pca"),
    Dataset("/derived/pca/components", ("layer", "component", "dim"), "float32", chunks=None, role="table", when="pca"),
    Dataset("/derived/pca/mean", ("layer", "dim"), "float32", chunks=None, role="table", when="pca"),
    Dataset("/derived/pca/explained_variance_ratio", ("layer", "component"), "float32", chunks=None,
            role="table", when="pca"),
    Dataset("/derived/umap/coords", ("point", "component"), "float32", chunks=None, role="table", when="umap"),
    Dataset("/derived/umap/index", ("point", "position"), "int32", chunks=None, role="table", when="umap"),
)
# Attributes of the /derived groups (SCHEMA.md, "Derived projections").
DERIVED_ATTRS: dict[str, tuple[str, ...]] = {
    "/derived": ("source", "created", "trace_steps"),
    "/derived/pca": ("method", "params", "n_components", "fit_points"),
    "/derived/umap": ("method", "params", "index_columns"),
}

TABLES: dict[str, tuple[Dataset, ...]] = {"sampling": SAMPLING, "training": TRAINING, "derived": DERIVED}


def datasets(kind: str, features: set[str] | None = None, scalars: tuple[str, ...] = REQUIRED_SCALARS
             ) -> Iterator[Dataset]:
    """The datasets of a trace kind, in creation order: optional ones only if their feature is
    in `features` (None: all), templated paths expanded (`/train/{scalar}` per scalar)."""
    for spec in TABLES[kind]:
        if spec.when is not None and features is not None and spec.when not in features:
            continue
        if "{scalar}" in spec.path:
            for name in scalars:
                yield dataclasses.replace(spec, path=spec.path.format(scalar=name))
        else:
            yield spec


def find(kind: str, path: str) -> Dataset | None:
    """The table entry of `path` in a trace of `kind` (None if the schema has no such dataset)."""
    for spec in TABLES[kind] + DERIVED:
        if spec.path == path or ("{scalar}" in spec.path and path.startswith(spec.path.split("{")[0])):
            return spec
    return None


REQUIRED: dict[str, tuple[str, ...]] = {
    kind: tuple(s.path for s in datasets(kind) if s.required) for kind in KINDS}

# Axis name -> coordinate datasets attached as dimension scales (first is the primary one).
AXIS_COORDS: dict[str, tuple[str, ...]] = {}
for _spec in SAMPLING + TRAINING:
    if _spec.role == "coord" and _spec.path not in AXIS_COORDS.get(_spec.axes[0], ()):
        AXIS_COORDS[_spec.axes[0]] = AXIS_COORDS.get(_spec.axes[0], ()) + (_spec.path,)

"""Names, versions and axis tables of the `rsr-trace` HDF5 schema (SCHEMA.md documents them).

Everything a reader and writer must agree on lives here, so that a schema change is one
edit plus a version bump.
"""

from __future__ import annotations

import math

SCHEMA_NAME = "rsr-trace"
SCHEMA_VERSION = 1
WRITER_VERSION = "traces 1.0.0"

KINDS = ("sampling", "training")

# HDF5 file-format bounds: v110 objects stay readable by HDF5 1.10+ tools and wheels,
# and SWMR needs at least v110 (SCHEMA.md, "Durability").
LIBVER = ("v110", "latest")

ROOT_ATTRS = (
    "schema", "schema_version", "writer_version", "created", "kind", "complete",
    "model_config", "rsr_config", "checkpoint_sha256", "command", "seeds", "scheduler",
    "rank", "world_size",
)
JSON_ATTRS = ("model_config", "rsr_config", "seeds", "scheduler", "joined_from")

# Fill values: what a reader sees where nothing was written yet.
EXPERT_FILL = 255
EXPERT_ABLATED = 254  # an intervention removed the adapter of this token (expert -1 in the model)
COUNT_FILL = -1

# Axis name -> coordinate datasets attached as dimension scales (first is the primary one).
AXIS_COORDS: dict[str, tuple[str, ...]] = {
    "sample": ("/coords/sample",),
    "branch": ("/coords/branch",),
    "timestep": ("/coords/timestep", "/coords/timestep_value", "/coords/sigma"),
    "layer": ("/coords/layer",),
    "step": ("/coords/step",),
    "token": ("/coords/token",),
    "expert": ("/coords/expert",),
    "stored_token": ("/latents/token_index",),
    "dim": ("/coords/dim",),
    "decoded_branch": ("/coords/decoded_branch",),
    "height": ("/coords/height",),
    "width": ("/coords/width",),
    "channel": ("/coords/channel",),
    "source_dim": ("/coords/source_dim",),
    "event": ("/events/step", "/events/sample", "/events/timestep"),
    "log": ("/train/step",),
}

# Axes whose integer selections mean coordinate values, not positions (block indices are
# how researchers name layers; a positional 3 that silently meant block 11 would mislead).
VALUE_AXES = ("layer",)

# Axes a writer call holds one index of: one chunk per combination (Block of iter_chunks).
OUTER_AXES = ("sample", "branch", "decoded_branch", "timestep", "event")

# Grid datasets and their axes, by trace kind.
SAMPLING_GRID: dict[str, tuple[str, ...]] = {
    "/routing/expert": ("sample", "branch", "timestep", "layer", "step", "token"),
    "/routing/prob": ("sample", "branch", "timestep", "layer", "step", "token", "expert"),
    "/routing/counts": ("sample", "branch", "timestep", "layer", "step", "expert"),
    "/latents/h": ("sample", "branch", "timestep", "layer", "step", "stored_token", "dim"),
    "/decoded/step": ("sample", "decoded_branch", "timestep", "layer", "step", "height", "width", "channel"),
    "/decoded/final": ("sample", "height", "width", "channel"),
    "/progress/written": ("sample", "timestep"),
    "/progress/final_written": ("sample",),
}
TRAINING_GRID: dict[str, tuple[str, ...]] = {
    "/routing/expert": ("event", "layer", "step", "token"),
    "/routing/prob": ("event", "layer", "step", "token", "expert"),
    "/routing/counts": ("event", "layer", "step", "expert"),
    "/events/label": ("event",),
}

REQUIRED: dict[str, tuple[str, ...]] = {
    "sampling": (
        "/routing/expert", "/routing/counts", "/progress/written", "/progress/steps",
        "/progress/closed", "/samples/prompt", "/samples/seed", "/samples/label", "/samples/scene",
        "/coords/sample", "/coords/branch", "/coords/timestep", "/coords/timestep_value",
        "/coords/sigma", "/coords/layer", "/coords/step", "/coords/token", "/coords/expert",
    ),
    "training": (
        "/routing/expert", "/routing/counts", "/events/step", "/events/sample",
        "/events/timestep", "/train/step", "/train/loss", "/train/balance",
        "/progress/steps", "/progress/events", "/progress/logs", "/progress/closed",
        "/coords/layer", "/coords/step", "/coords/token", "/coords/expert",
    ),
}

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

"""What a trace will hold: the selection a recorder fixes before writing anything.

A layout is plain data (no file access), so the same object drives the writer, the size
estimate and the recorder's `--max-gb` check.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from cli_common.jsonable import jsonable

from .errors import TraceError
from .schema import MAX_EXPERTS, REQUIRED_SCALARS


def _ids(x: Sequence[int] | int, what: str) -> np.ndarray:
    arr = np.arange(x) if isinstance(x, (int, np.integer)) else np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise TraceError(f"{what} must be a non-empty 1-D list of integers")
    return arr.astype(np.int64)


def _check_experts(n: int) -> None:
    if not 1 <= n <= MAX_EXPERTS:
        raise TraceError(f"n_experts must be in 1..{MAX_EXPERTS} (uint8 ids; 254 = ablated, "
                         f"255 = unwritten), got {n}")


@dataclass(frozen=True)
class SamplingLayout:
    """Grid of a sampling trace: which timesteps, layers, steps, tokens, and which extras.

    `timesteps` are the scheduler indices of the recorded timesteps; `timestep_values` and
    `sigmas` are their t and sigma (NaN when a scheduler has none). `tokens` are the stored
    token ids (an int means all of 0..n-1). `latent_tokens`/`latent_dim` turn on /latents/h;
    `projection` (source_dim, latent_dim) is stored so a reader can map back. `image_shape`
    (H, W, C) turns on /decoded/step and /decoded/final (uint8).
    """

    n_experts: int
    layers: Sequence[int]
    steps: Sequence[int] | int
    tokens: Sequence[int] | int
    timesteps: Sequence[int]
    timestep_values: Sequence[float] | None = None
    sigmas: Sequence[float] | None = None
    branches: Sequence[str] = ("cond",)
    store_prob: bool = False
    latent_tokens: Sequence[int] | None = None
    latent_dim: int = 0
    projection: np.ndarray | None = None
    image_shape: tuple[int, int, int] | None = None
    decode_steps: bool = True
    decoded_branches: Sequence[str] = ("guided",)
    counts_scope: str = "stored_tokens"

    def __post_init__(self) -> None:
        _check_experts(self.n_experts)
        for name in ("layers", "steps", "tokens", "timesteps"):
            _ids(getattr(self, name), name)
        t = len(self.timesteps)
        for name in ("timestep_values", "sigmas"):
            v = getattr(self, name)
            if v is not None and len(v) != t:
                raise TraceError(f"{name} has {len(v)} entries for {t} timesteps")
        if not self.branches or len(set(self.branches)) != len(self.branches):
            raise TraceError("branches must be distinct names such as ('cond', 'uncond')")
        if self.latent_tokens is not None:
            _ids(self.latent_tokens, "latent_tokens")
            if self.latent_dim <= 0:
                raise TraceError("latent_dim must be positive when latent_tokens is set")
            if self.projection is not None and np.shape(self.projection)[1] != self.latent_dim:
                raise TraceError("projection must have shape (source_dim, latent_dim)")
        if self.image_shape is not None and len(self.image_shape) != 3:
            raise TraceError("image_shape must be (height, width, channels)")

    # Resolved coordinates -------------------------------------------------------------
    @property
    def layer_ids(self) -> np.ndarray:
        return _ids(self.layers, "layers")

    @property
    def step_ids(self) -> np.ndarray:
        return _ids(self.steps, "steps")

    @property
    def token_ids(self) -> np.ndarray:
        return _ids(self.tokens, "tokens")

    @property
    def timestep_ids(self) -> np.ndarray:
        return _ids(self.timesteps, "timesteps")

    @property
    def latent_token_ids(self) -> np.ndarray | None:
        return None if self.latent_tokens is None else _ids(self.latent_tokens, "latent_tokens")

    def cell_shape(self) -> tuple[int, int, int, int, int]:
        """(branches, timesteps, layers, steps, tokens) of one sample."""
        return (len(self.branches), len(self.timestep_ids), len(self.layer_ids),
                len(self.step_ids), len(self.token_ids))

    def features(self) -> set[str]:
        """Optional parts of the schema this layout turns on (`Dataset.when` in traces.schema)."""
        out = set()
        if self.store_prob:
            out.add("prob")
        if self.latent_tokens is not None:
            out.add("latents")
            if self.projection is not None:
                out.add("projection")
        if self.image_shape is not None:
            out.add("images")
            if self.decode_steps:
                out.add("decoded_steps")
        return out

    def axis_lengths(self, n_samples: int) -> dict[str, int]:
        """Length of every axis of a trace holding `n_samples` samples."""
        nb, nt, nl, ns, nn = self.cell_shape()
        out = dict(sample=n_samples, branch=nb, timestep=nt, layer=nl, step=ns, token=nn, expert=self.n_experts,
                   decoded_branch=len(self.decoded_branches))
        if self.latent_tokens is not None:
            out.update(stored_token=len(self.latent_token_ids), dim=self.latent_dim)
        if self.projection is not None:
            out["source_dim"] = int(np.shape(self.projection)[0])
        if self.image_shape is not None:
            out.update(zip(("height", "width", "channel"), self.image_shape))
        return out


@dataclass(frozen=True)
class TrainingLayout:
    """Event axis of a training trace: each event is one (training step, sample, timestep).

    `scalars` name the per-log-step series stored under /train (loss and balance at least).
    """

    n_experts: int
    layers: Sequence[int]
    steps: Sequence[int] | int
    tokens: Sequence[int] | int
    store_prob: bool = False
    scalars: Sequence[str] = ("loss", "balance")
    counts_scope: str = "stored_tokens"

    def __post_init__(self) -> None:
        _check_experts(self.n_experts)
        for name in ("layers", "steps", "tokens"):
            _ids(getattr(self, name), name)
        missing = set(REQUIRED_SCALARS) - set(self.scalars)
        if missing:
            raise TraceError(f"training scalars must include {sorted(missing)}")

    layer_ids = SamplingLayout.layer_ids
    step_ids = SamplingLayout.step_ids
    token_ids = SamplingLayout.token_ids

    def features(self) -> set[str]:
        return {"prob"} if self.store_prob else set()

    def axis_lengths(self, n_events: int = 0, n_logs: int = 0) -> dict[str, int]:
        return dict(event=n_events, log=n_logs, layer=len(self.layer_ids), step=len(self.step_ids),
                    token=len(self.token_ids), expert=self.n_experts)


@dataclass
class TraceMeta:
    """Provenance stored as root attributes; dicts are stored as JSON strings.

    `extra` holds further JSON-serialisable root attributes (e.g. the recorder's
    interventions) under their own names.
    """

    model_config: dict[str, Any] = field(default_factory=dict)
    rsr_config: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str = ""
    command: str | None = None
    seeds: Any = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def command_line(self) -> str:
        return self.command if self.command is not None else shlex.join([sys.executable, *sys.argv])

    @staticmethod
    def to_json(value: Any) -> str:
        try:
            return json.dumps(jsonable(value), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TraceError(f"metadata is not JSON-serialisable: {exc}") from None


@dataclass
class SampleTable:
    """Per-sample metadata, known before sampling starts (written before SWMR begins).

    `sample_id` defaults to 0..n-1 (give global ids per rank when distributed); `label` is the
    class label or -1; `scene` is the ground-truth scene (dict or JSON string) or "".
    """

    prompt: Sequence[str]
    seed: Sequence[int]
    label: Sequence[int] | None = None
    scene: Sequence[Any] | None = None
    sample_id: Sequence[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompt)
        for name in ("seed", "label", "scene", "sample_id"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise TraceError(f"samples: {name} has {len(v)} entries for {n} prompts")

    def __len__(self) -> int:
        return len(self.prompt)

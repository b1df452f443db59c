"""What a pass over a trace is folded against: the options, the trace's grid and the labels.

`TraceGrid` fixes the axes every probe family indexes its tables with (layer, recursion step,
timestep bin, branch, token) and `labels_of` the discrete labels of the mutual-information
probes. Both are read once from the trace's coordinates and sample table before streaming.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from traces import TraceReader
from traces.bins import timestep_bin_edges, timestep_bins

POSITION_GRID = 4  # position labels: at most POSITION_GRID x POSITION_GRID regions


@dataclass
class Options:
    n_bins: int = 4
    n_perm: int = 199
    max_latent_points: int = 20000
    probe_max_samples: int = 2000
    probe_splits: int = 3
    probe_C: float = 0.1  # L2-regularised: converges in ~100 lbfgs iterations on float16 latents
    seed: int = 0
    linear_probes: bool = True


@dataclass
class TraceGrid:
    """The axes of a trace, as the probe tables index them."""

    kind: str  # "sampling" or "training"
    n_experts: int
    layers: list[int]
    steps: list[int]
    tokens: np.ndarray  # stored token ids
    token_grid: tuple[int, int] | None  # (h, w) of the full token grid, if known
    full_grid: bool  # every token of token_grid is stored (spatial probes need it)
    consecutive_steps: bool  # >= 2 recorded recursion steps, consecutive
    n_bins: int
    bin_of: Callable[[dict], int]  # chunk coords -> timestep bin
    bins: list[dict]  # description of every timestep bin (the report's "timestep_bins")
    branches: list[str] = field(default_factory=list)
    timesteps: np.ndarray | None = None  # recorded timesteps (sampling traces)
    timestep_values: np.ndarray | None = None
    timestep_bin: np.ndarray | None = None  # bin of each recorded timestep position (sampling traces)

    @property
    def sampling(self) -> bool:
        return self.kind == "sampling"

    @property
    def n_timesteps(self) -> int:
        return len(self.timesteps) if self.timesteps is not None else 0

    @property
    def n_grid_tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1] if self.token_grid else -1


@dataclass
class Label:
    """A discrete label of the records, for MI(expert; label), lift and the linear probes."""

    name: str
    values: list  # label names, index = code
    kind: str  # "bin", "step", "position", "branch" (one code per chunk cell or axis), "sample", "event"
    codes: Any = None  # per token (position), per sample or per event


@dataclass
class Context:
    """Everything a probe family is built from."""

    trace: TraceReader
    grid: TraceGrid
    labels: list[Label]
    options: Options


def token_grid(tokens: Any, declared: Any = None) -> tuple[int, int] | None:
    """(h, w) of the full token grid: `declared` when it is a pair (a trace's `token_grid`
    attribute, which `probes.record` always writes), else a square grid when `tokens` are exactly
    0..n-1 with n a square, else None (a grid is not guessed from a subset of the tokens). The one
    rule the report, the dashboard and the interventions use."""
    if isinstance(declared, (list, tuple, np.ndarray)) and len(declared) == 2:
        return int(declared[0]), int(declared[1])
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n = int(tokens.max()) + 1 if tokens.size else 0
    side = math.isqrt(n)
    if n and side * side == n and np.array_equal(tokens, np.arange(n)):
        return side, side
    return None


def _token_grid(trace: TraceReader, tokens: np.ndarray) -> tuple[tuple[int, int] | None, bool]:
    grid = token_grid(tokens, trace.attrs.get("token_grid"))
    full = grid is not None and np.array_equal(tokens, np.arange(grid[0] * grid[1]))
    return grid, full


def _refuse_repeated_coordinates(trace: TraceReader) -> None:
    """A coordinate stored twice (a trace recorded with --layers 2,2 before such lists were
    refused) makes two table rows of one hook point; the report would count it twice."""
    from cli_common.errors import UserError

    axes = ["layer", "step", "token"] + (["timestep", "branch"] if trace.kind == "sampling" else [])
    for axis in axes:
        values, counts = np.unique(np.asarray(trace.coords[axis]).astype(str), return_counts=True)
        repeated = values[counts > 1].tolist()
        if repeated:
            raise UserError(f"{trace.path}: {axis} {', '.join(repeated)} is stored more than once (recorded "
                            f"with a repeated selection); record it again with each {axis} once")


def grid_of(trace: TraceReader, options: Options) -> TraceGrid:
    """Sampling traces bin the recorded sampler steps in sampler order (bin 0 = noisiest);
    training traces bin the events' timestep values into equal-width bins (both with
    `traces.bins.timestep_bins`, whose docstring says why the axes differ)."""
    steps = [int(x) for x in trace.coords["step"]]
    tokens = np.asarray(trace.coords["token"], dtype=np.int64)
    _refuse_repeated_coordinates(trace)
    token_grid, full = _token_grid(trace, tokens)
    common = dict(n_experts=int(len(trace.coords["expert"])), layers=[int(x) for x in trace.coords["layer"]],
                  steps=steps, tokens=tokens, token_grid=token_grid, full_grid=full,
                  consecutive_steps=len(steps) >= 2 and all(b == a + 1 for a, b in zip(steps, steps[1:])))
    if trace.kind == "sampling":
        return _sampling_grid(trace, options, common)
    t = np.asarray(trace.events()["timestep"], dtype=float)
    n_bins = max(1, options.n_bins)
    lo, hi = (float(t.min()), float(t.max())) if t.size else (0.0, 1000.0)
    hi = hi if hi > lo else lo + 1.0
    edges = timestep_bin_edges(n_bins, lo, hi)

    def bin_of(coords: dict) -> int:
        return int(timestep_bins(coords["timestep"], n_bins, lo, hi))

    bins = [{"bin": b, "t_min": float(edges[b]), "t_max": float(edges[b + 1])} for b in range(n_bins)]
    return TraceGrid("training", n_bins=n_bins, bin_of=bin_of, bins=bins, branches=["train"], **common)


def _sampling_grid(trace: TraceReader, options: Options, common: dict) -> TraceGrid:
    timesteps = np.asarray(trace.coords["timestep"])
    values = np.asarray(trace.coords["timestep_value"], dtype=float)
    n_t = len(timesteps)
    n_bins = max(1, min(options.n_bins, n_t))
    position = {int(t): i for i, t in enumerate(timesteps)}
    bin_of_position = timestep_bins(np.arange(n_t), n_bins, 0, n_t)  # sampler order: bin 0 the noisiest
    bins = [{"bin": b, "timesteps": timesteps[bin_of_position == b].tolist(),
             "timestep_values": values[bin_of_position == b].tolist(),
             "t_max": float(values[bin_of_position == b].max()), "t_min": float(values[bin_of_position == b].min())}
            for b in range(n_bins)]
    return TraceGrid("sampling", n_bins=n_bins, bin_of=lambda c: int(bin_of_position[position[int(c["timestep"])]]),
                     bins=bins, branches=[str(b) for b in trace.coords["branch"]], timesteps=timesteps,
                     timestep_values=values, timestep_bin=bin_of_position, **common)


# --------------------------------------------------------------------------- labels


def prompt_attributes(scene: Any) -> dict[str, str]:
    """The prompt attributes the task wrote into one sample's `/samples/scene` (its
    `describe(item)["attributes"]`, e.g. colour / shape / count / relation); {} without."""
    if isinstance(scene, (str, bytes)):
        try:
            scene = json.loads(scene) if scene else {}
        except ValueError:
            return {}
    attributes = scene.get("attributes") if isinstance(scene, dict) else None
    if not isinstance(attributes, dict):
        return {}
    return {str(k): str(v) for k, v in attributes.items()}


def prompt_attribute_codes(scenes: Any) -> dict[str, tuple[list[str], np.ndarray]]:
    """Attribute name (in order of first appearance) -> (its values, sorted; (samples,) code of each
    sample's value), from the samples' `/samples/scene`; a sample without the attribute has "?".
    The one coding of prompt attributes: the report's MI labels and the dashboard's colours."""
    per_sample = [prompt_attributes(x) for x in scenes]
    names = list(dict.fromkeys(k for a in per_sample for k in a))
    out = {}
    for name in names:
        values, codes = np.unique(np.asarray([a.get(name, "?") for a in per_sample], dtype=object).astype(str),
                                  return_inverse=True)
        out[name] = (values.tolist(), codes.reshape(-1).astype(np.int64))
    return out


def _position_label(grid: TraceGrid) -> Label:
    h, w = grid.token_grid
    rows, cols = min(POSITION_GRID, h), min(POSITION_GRID, w)
    r, c = grid.tokens // w, grid.tokens % w
    codes = (r * rows // h) * cols + (c * cols // w)
    return Label("position", [f"r{i // cols}c{i % cols}" for i in range(rows * cols)], "position", codes)


def _sample_labels(trace: TraceReader, notes: list[str]) -> list[Label]:
    """Per-sample labels (prompt, prompt attributes, class) with >= 2 values, one per
    partition of the samples (a label that splits the samples like an earlier one is skipped)."""
    samples = trace.samples()
    per_sample: dict[str, list] = {"prompt": list(samples["prompt"])}
    attributes = prompt_attribute_codes(samples["scene"])
    if not attributes:
        notes.append("prompt-attribute MI skipped: /samples/scene holds no attributes (recorded before they were "
                     "written, or a task without them)")
    for name, (values, codes) in attributes.items():
        per_sample[name] = [values[c] for c in codes]
    class_label = np.asarray(samples["label"])
    if class_label.size and (class_label >= 0).all():
        per_sample["class"] = [str(int(x)) for x in class_label]
    out, seen = [], {}
    for name, values in per_sample.items():
        distinct = sorted(set(values))
        if len(distinct) < 2:
            notes.append(f"{name} MI skipped: one value only ({distinct[0] if distinct else 'none'})")
            continue
        code = {v: i for i, v in enumerate(distinct)}
        codes = np.array([code[v] for v in values])
        first: dict = {}
        partition = tuple(first.setdefault(c, len(first)) for c in codes.tolist())
        if partition in seen:
            notes.append(f"{name} MI skipped: same partition of the samples as {seen[partition]}")
            continue
        seen[partition] = name
        out.append(Label(name, distinct, "sample", codes))
    return out


def labels_of(trace: TraceReader, grid: TraceGrid) -> tuple[list[Label], list[str]]:
    """The discrete labels for MI / lift, and notes about the skipped ones."""
    notes: list[str] = []
    out: list[Label] = []
    if grid.n_bins > 1:
        out.append(Label("timestep_bin", list(range(grid.n_bins)), "bin"))
    if len(grid.steps) > 1:
        out.append(Label("recursion_step", grid.steps, "step"))
    if grid.token_grid is not None:
        out.append(_position_label(grid))
    else:
        notes.append("position MI skipped: token grid unknown")
    if grid.sampling:
        if len(grid.branches) > 1:
            out.append(Label("branch", grid.branches, "branch"))
        out += _sample_labels(trace, notes)
        return out, notes
    events = np.asarray(trace.events()["label"])
    if events.size and (events >= 0).all() and len(np.unique(events)) > 1:
        distinct = sorted(np.unique(events).tolist())
        code = {v: i for i, v in enumerate(distinct)}
        out.append(Label("class", [str(u) for u in distinct], "event", np.array([code[v] for v in events.tolist()])))
    return out, notes


def context_of(trace: TraceReader, options: Options) -> tuple[Context, list[str]]:
    """The pass's `Context` (grid and labels of the trace) and the notes the labels left; the
    one-process pass and every worker of the parallel pass build it alike."""
    grid = grid_of(trace, options)
    labels, notes = labels_of(trace, grid)
    return Context(trace, grid, labels, options), notes

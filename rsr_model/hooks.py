"""Hook points: the one primitive every reader and intervention uses.

Modelled on TransformerLens's `HookPoint`, with two differences that matter for a recursive
diffusion model:

- a hook receives the value *and* a `HookContext` (which layer, which recursion step, the
  diffusion timestep, sample ids, training step, guidance branch), because the same point
  fires once per recursion step and once per sampler step;
- `cache()` keeps every call, not only the last one (TransformerLens and baukit overwrite).

A hook is `fn(value, ctx) -> value | None`; returning a tensor replaces the value (force or
ablate experts, patch latents), returning None only reads. With nothing attached a hook point
is a truthiness check on an empty list: the model code guards with `if point.fns:`.

`HOOK_POINTS` lists the points of one RSR layer; `hook_name` is the one place their names
are built, and `hook_table` renders the table the README shows.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

HookFn = Callable[[Any, "HookContext"], Any]


@dataclass(frozen=True)
class HookPointSpec:
    """One hook point of an RSR layer: its name pattern, the value's shape and what it holds."""

    pattern: str  # with {i} for the block index and, per recursion step, {s}
    shape: str  # B batch, N vision tokens, D width, K experts
    value: str

    @property
    def per_step(self) -> bool:
        return "{s}" in self.pattern


# The hook points of the RSR layer on block i, in the order one forward fires them.
HOOK_POINTS: dict[str, HookPointSpec] = {
    "cond": HookPointSpec("blocks.{i}.rsr.cond", "(B, D)",
                          "conditioning c the gate reads (SD3: temb; DiT: timestep + class)"),
    "latent": HookPointSpec("blocks.{i}.rsr.step.{s}.latent", "(B, N, D)",
                            "h_s, the latent entering recursion step s (h_0 = x)"),
    "logits": HookPointSpec("blocks.{i}.rsr.step.{s}.logits", "(B, N, K)",
                            "gate logits (zeros of shape (B, N, 1) without a gate)"),
    "probs": HookPointSpec("blocks.{i}.rsr.step.{s}.probs", "(B, N, K)",
                           "gate probabilities (not the sampled choice; ones without a gate)"),
    "expert": HookPointSpec("blocks.{i}.rsr.step.{s}.expert", "(B, N)",
                            "chosen expert (int64); return a tensor to force (0..K-1), -1 to ablate"),
    "out": HookPointSpec("blocks.{i}.rsr.out", "(B, N, D)", "vision output of the attention (after to_out)"),
}


def hook_name(layer: int | str, point: str, step: int | str | None = None) -> str:
    """Name of hook point `point` (a key of HOOK_POINTS) of block `layer`, at recursion step
    `step` for per-step points. Pass "*" for layer or step to get a glob pattern."""
    spec = HOOK_POINTS.get(point)
    if spec is None:
        raise KeyError(f"no hook point {point!r}; points are {', '.join(HOOK_POINTS)}")
    if spec.per_step != (step is not None):
        raise ValueError(f"hook point {point!r} {'needs' if spec.per_step else 'takes no'} recursion step")
    return spec.pattern.format(i=layer, s=step)


def hook_table() -> str:
    """The markdown table of HOOK_POINTS (the README holds exactly this)."""
    rows = ["| name | shape | value |", "|---|---|---|"]
    rows += [f"| `{spec.pattern}` | {spec.shape} | {spec.value} |" for spec in HOOK_POINTS.values()]
    return "\n".join(rows) + "\n"


@dataclass
class HookContext:
    """Where a hook fired. Fields that the caller did not set are None."""

    name: str
    layer: int | None = None
    step: int | None = None  # recursion step (0-based)
    timestep: torch.Tensor | None = None  # (B,) diffusion timestep values seen by the model
    sample_ids: torch.Tensor | None = None  # (B,) set by the caller (recorder, trainer)
    train_step: int | None = None
    branch: Any = None  # e.g. per-row "cond"/"uncond" labels under classifier-free guidance
    extra: dict = field(default_factory=dict)


class HookPoint:
    """A named place in the forward pass. Not an nn.Module: it owns no weights and must cost nothing."""

    __slots__ = ("name", "fns")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fns: list[HookFn] = []

    def __call__(self, value: Any, ctx: HookContext) -> Any:
        for fn in list(self.fns):
            out = fn(value, ctx)
            if out is not None:
                value = out
        return value

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, hooks={len(self.fns)})"


class HookHandle:
    """Removes exactly the one hook it was returned for."""

    def __init__(self, point: HookPoint, fn: HookFn) -> None:
        self.point, self.fn = point, fn

    def remove(self) -> None:
        # Remove by identity, so two registrations of the same function stay independent.
        for i, f in enumerate(self.point.fns):
            if f is self.fn:
                del self.point.fns[i]
                return


NamesFilter = str | list[str] | Callable[[str], bool] | None


def _matcher(names: NamesFilter) -> Callable[[str], bool]:
    if names is None:
        return lambda n: True
    if callable(names):
        return names
    patterns = [names] if isinstance(names, str) else list(names)
    return lambda n: any(fnmatch.fnmatchcase(n, p) for p in patterns)


class HookRegistry:
    """All hook points of one installed model, addressed by dotted name and glob selection."""

    def __init__(self) -> None:
        self.points: dict[str, HookPoint] = {}

    def point(self, name: str) -> HookPoint:
        if name in self.points:
            raise ValueError(f"hook point {name!r} registered twice")
        hp = self.points[name] = HookPoint(name)
        return hp

    def names(self, names: NamesFilter = None) -> list[str]:
        match = _matcher(names)
        return [n for n in self.points if match(n)]

    def add(self, names: NamesFilter, fn: HookFn, first: bool = False) -> list[HookHandle]:
        """Attach `fn` to every point whose name matches; a pattern that matches nothing is an error.

        Hooks run in the order attached; `first` puts `fn` before those already there. Hooks that
        change the value (forcing experts) go first, so every reader sees what the model uses."""
        selected = self.names(names)
        if not selected:
            raise KeyError(f"no hook point matches {names!r}; see .names() for the list")
        handles = []
        for n in selected:
            if first:
                self.points[n].fns.insert(0, fn)
            else:
                self.points[n].fns.append(fn)
            handles.append(HookHandle(self.points[n], fn))
        return handles

    @contextlib.contextmanager
    def hooks(self, fwd: dict[str, HookFn] | list[tuple[NamesFilter, HookFn]],
              first: bool = False) -> Iterator[list[HookHandle]]:
        """Attach hooks for the duration of a `with` block; removes exactly those it added.
        `first`: before the hooks already attached (in the given order), as `add`."""
        items = fwd.items() if isinstance(fwd, dict) else fwd
        handles: list[HookHandle] = []
        try:
            for names, fn in (reversed(list(items)) if first else items):
                handles += self.add(names, fn, first=first)
            yield handles
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def cache(self, names: NamesFilter = None, device: str | torch.device = "cpu") -> Iterator[dict[str, list]]:
        """Record every call of the selected points: name -> list of (ctx, detached value)."""
        store: dict[str, list] = {}

        def save(value: Any, ctx: HookContext) -> None:
            v = value.detach().to(device) if isinstance(value, torch.Tensor) else value
            store.setdefault(ctx.name, []).append((ctx, v))

        with self.hooks([(names, save)]):
            yield store

    def clear(self) -> None:
        for hp in self.points.values():
            hp.fns.clear()

    @property
    def active(self) -> bool:
        return any(hp.fns for hp in self.points.values())

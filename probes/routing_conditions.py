"""The routing conditions of `probes.routing_value`: what replaces the gate's choice, and where.

Every condition is one function on the expert hook points, `fn(ids, ctx) -> ids`. A scope says which
(layer, recursion step) points are perturbed; every other point either keeps whatever the gate does
on the perturbed input (`replay=False`, the behaviour of schema version 1) or is forced to the ids the
gate chose on the unperturbed pass of the same batch (`replay=True`). With replay, perturbing step s
changes step s only: the later steps' gates read the perturbed h and could otherwise route tokens to
other experts, so a per-step value would mix step s's routing with the later steps' reaction to it
(finding 2 of issue 19). Earlier steps are unaffected either way (their input is the clean one).

Perturbations (each given the point's ids (B, N) and its HookContext):

    sampled        a draw from the gate's own probabilities at that point (what training's hard
                   Gumbel routing does: argmax(logits + Gumbel) is a sample of softmax(logits))
    random_token   i.i.d. per token from the gate's load share of that (layer, step)
    random_image   one expert per sample per (layer, step), from the same load share: the same load,
                   and every token of an image on one expert, as a gate that reads t and c alone does
    forced k       expert k everywhere; -1 (`none`) is no adapter, the frozen base
    oracle         a given expert per sample (the best forced expert of its timestep bin and step)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Key = tuple[int, int]  # (layer, recursion step)
Perturb = Callable[[torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class Scope:
    """The points a condition perturbs (None: every point), and whether the others replay the clean pass."""

    name: str
    points: frozenset[Key] | None
    replay: bool

    def covers(self, key: Key) -> bool:
        return self.points is None or key in self.points


def scopes(layers: list[int], steps: int) -> list[Scope]:
    """Each layer's step alone when there are several layers, each recursion step alone (every layer's),
    then every point ("all"); the single-point scopes come first because the others' oracle is built
    from their forced losses. Single-step scopes replay the other points."""
    out = []
    if len(layers) > 1:  # each layer's own routing too: a verdict must not borrow another layer's value
        out += [Scope(f"{i}.{s}", frozenset({(i, s)}), True) for i in layers for s in range(steps)]
    out += [Scope(str(s), frozenset((i, s) for i in layers), True) for s in range(steps)]
    return out + [Scope("all", None, False)]


def single_point_scope(key: Key, layers: list[int]) -> str:
    """The name of the scope that perturbs exactly `key` (the source of its oracle choice)."""
    return f"{key[0]}.{key[1]}" if len(layers) > 1 else str(key[1])


def router(scope: Scope, perturb: Perturb, clean: dict[Key, torch.Tensor] | None) -> Callable:
    """The expert hook of one condition: `perturb` inside the scope; outside it the clean pass's ids
    when the scope replays (`clean`), else the gate's own choice."""
    def fn(ids: torch.Tensor, ctx) -> torch.Tensor | None:
        key = (ctx.layer, ctx.step)
        if scope.covers(key):
            return perturb(ids, ctx)
        if scope.replay and clean is not None:
            return clean[key]
        return None
    return fn


def forced(expert: int) -> Perturb:
    return lambda ids, ctx: torch.full_like(ids, expert)


def random_token(load: dict[Key, torch.Tensor], gen: torch.Generator) -> Perturb:
    def fn(ids: torch.Tensor, ctx) -> torch.Tensor:
        share = load[(ctx.layer, ctx.step)]
        return torch.multinomial(share, ids.numel(), replacement=True, generator=gen).view_as(ids)
    return fn


def random_image(load: dict[Key, torch.Tensor], gen: torch.Generator) -> Perturb:
    def fn(ids: torch.Tensor, ctx) -> torch.Tensor:
        share = load[(ctx.layer, ctx.step)]
        per_image = torch.multinomial(share, ids.shape[0], replacement=True, generator=gen)  # (B,)
        return per_image[:, None].expand_as(ids).clone()
    return fn


class Sampled:
    """Routing sampled from the gate's probabilities: the probs hook keeps the point's probabilities,
    the expert hook (which fires right after it in the same routing call) draws from them."""

    def __init__(self, gen: torch.Generator) -> None:
        self.gen, self.probs = gen, {}

    def keep(self, probs: torch.Tensor, ctx) -> None:
        self.probs[(ctx.layer, ctx.step)] = probs

    def __call__(self, ids: torch.Tensor, ctx) -> torch.Tensor:
        p = self.probs[(ctx.layer, ctx.step)].reshape(-1, self.probs[(ctx.layer, ctx.step)].shape[-1])
        return torch.multinomial(p.float(), 1, generator=self.gen).view_as(ids)


def oracle(choice: dict[Key, torch.Tensor]) -> Perturb:
    """`choice[(layer, step)]` is (B,) the expert of each sample at that point."""
    return lambda ids, ctx: choice[(ctx.layer, ctx.step)][:, None].expand_as(ids).clone()

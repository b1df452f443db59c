"""The contract of a probe family: fold chunk cells, report its part of the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...stats.running import Stat
from ..chunk import Chunk
from ..setup import Context


@dataclass
class Part:
    """A family's share of the report.

    `top` holds top-level keys ("checks" and "global" are merged with the other families'),
    `layers[layer index]` keys of `layers.<layer>`, `steps[(layer index, step index)]` keys of
    `layers.<layer>.steps.<step>`; `notes` go to the report's notes.
    """

    top: dict[str, Any] = field(default_factory=dict)
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    steps: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class ProbeFamily(Stat):
    """One family of probes over the stream (a `Stat`: update / merge / result / state_dict).

    A family is built from the pass's `Context`; when it cannot run on this trace, its
    constructor sets `skipped` to the reason (a report note) and the pass never feeds it.
    `needs` names the datasets beyond /routing/expert and /routing/counts it reads (the pass
    reads a dataset only if some running family needs it). `update(chunk)` folds one chunk
    cell (keep it vectorised: a few whole-array operations per chunk, no loop over tokens);
    `result()` returns the family's `Part` of the report.
    """

    name: str = ""
    needs: tuple[str, ...] = ()

    def __init__(self, context: Context) -> None:
        self.context = context
        self.grid = context.grid
        self.skipped: str | None = None

    def update(self, chunk: Chunk) -> None:
        raise NotImplementedError

    def result(self) -> Part:
        raise NotImplementedError

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

    A family is built from the pass's `Context`: `unavailable(context)` says why it cannot
    run on this trace (the reason becomes a report note and the pass never feeds it),
    otherwise `setup()` allocates its tables.
    `needs` names the datasets beyond /routing/expert and /routing/counts it reads (the pass
    reads a dataset only if some running family needs it). `update(chunk)` folds one chunk
    cell (keep it vectorised: a few whole-array operations per chunk, no loop over tokens);
    `result()` returns the family's `Part` of the report.
    A family that looks across samples (stability's seeds) also implements `start_at(row)`
    and `finish()`, so that a worker of a parallel pass (`probes.analysis.parallel`) can fold
    a range of samples and hand over a state that merges into the whole pass's.
    """

    name: str = ""
    needs: tuple[str, ...] = ()
    constants: tuple[str, ...] = ()  # array attributes set up once (index grids): not state, never merged
    sampling_only = False  # compares samples / timesteps: not for training traces

    def __init__(self, context: Context) -> None:
        self.context = context
        self.grid = context.grid
        self.skipped = self.unavailable(context)
        if self.skipped is None:
            self.setup()

    @classmethod
    def unavailable(cls, context: Context) -> str | None:
        """Why this family cannot run on the trace, or None."""
        if cls.sampling_only and not context.grid.sampling:
            return f"{cls.name} skipped: it needs a sampling trace"
        return None

    def setup(self) -> None:
        """Allocate the tables (only when the family runs)."""

    def _state(self) -> dict:
        return {k: v for k, v in super()._state().items() if k not in self.constants}

    def cells(self) -> list[tuple[int, int]]:
        """(layer index, step index) of every recorded cell, in report order."""
        return [(li, si) for li in range(len(self.grid.layers)) for si in range(len(self.grid.steps))]

    def update(self, chunk: Chunk) -> None:
        raise NotImplementedError

    def start_at(self, row: int) -> None:
        """Begin the fold at sample row `row` (of a sampling trace) in the state the one-process
        pass has there, for what the family carries from sample to sample."""

    def finish(self) -> None:
        """The stream ended: fold in whatever the family holds back (result() calls it too)."""

    def result(self) -> Part:
        raise NotImplementedError

"""One chunk cell of the stream, with the tables every probe family reads from it.

A chunk cell is one (sample, branch, timestep) of a sampling trace or one event of a training
trace: expert ids of shape (layer, step, token). The shared per-chunk work is done once here:
the ids clipped to K (any id >= K, unwritten 255 or ablated 254, becomes the extra slot K,
which every table drops, so nothing needs masking) and one histogram per (layer, step,
position region, expert) by a single `np.bincount`. Families that pair two routings of the
same tokens (transitions, stability) count the pairs with `ChunkTables.pairs`, again one
`np.bincount`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .setup import Label, TraceGrid


class ChunkTables:
    """The combined bincount keys of a grid's (layer, step[, position]) cells, computed once."""

    def __init__(self, grid: TraceGrid, labels: list[Label]) -> None:
        n_layers, n_steps, slots = len(grid.layers), len(grid.steps), grid.n_experts + 1
        self.shape = (n_layers, n_steps)
        self.n_experts = grid.n_experts
        label = next((lab for lab in labels if lab.kind == "position"), None)
        position = label.codes if label is not None else None
        # every region of the label, also those no stored token falls in (a trace of a few
        # explicit --tokens): the tables are sized by the label's values, not by the codes seen
        self.n_positions = len(label.values) if label is not None else 1
        cell = np.arange(n_layers).reshape(-1, 1, 1) * n_steps + np.arange(n_steps).reshape(1, -1, 1)
        position_part = (np.asarray(position, dtype=np.intp).reshape(1, 1, -1) if position is not None
                         else np.zeros((1, 1, 1), np.intp))
        self._histogram_key = ((cell * self.n_positions + position_part) * slots).astype(np.intp)
        self._histogram_size = n_layers * n_steps * self.n_positions * slots
        self._pair_key = (cell * slots**2).astype(np.intp)  # (layer, step, 1)
        self._pair_size = n_layers * n_steps * slots**2

    def histogram(self, clipped: np.ndarray) -> np.ndarray:
        """Counts (layer, step, position region, K + 1) of clipped ids; slot K = invalid."""
        flat = np.bincount((self._histogram_key + clipped).reshape(-1), minlength=self._histogram_size)
        return flat.reshape(*self.shape, self.n_positions, self.n_experts + 1)

    def pairs(self, first: np.ndarray, second: np.ndarray, shift: int = 0) -> np.ndarray:
        """Joint counts (layer, step, K, K) of two clipped routings of the same tokens, valid
        pairs only; `shift=1` pairs step s of `first` with step s+1 of `second` (transitions;
        the last step's row stays empty)."""
        n_steps, slots = self.shape[1], self.n_experts + 1
        if shift:
            first, second = first[:, :-shift], second[:, shift:]
        key = np.multiply(first, slots, dtype=np.intp)
        key += self._pair_key[:, : n_steps - shift]
        key += second
        table = np.bincount(key.reshape(-1), minlength=self._pair_size).reshape(*self.shape, slots, slots)
        return table[..., : self.n_experts, : self.n_experts]


@dataclass
class Chunk:
    """One chunk cell and what every family reads from it."""

    coords: dict
    ids: np.ndarray  # (layer, step, token) as stored
    counts: np.ndarray  # /routing/counts (layer, step, K)
    prob: np.ndarray | None  # /routing/prob (layer, step, token, K) when a family asked for it
    latents: np.ndarray | None  # /latents/h (layer, step, stored latent token, dim)
    timestep_bin: int
    branch: int  # index into grid.branches (0 in training traces)
    timestep: int | None  # index into the recorded timesteps (sampling traces)
    clipped: np.ndarray  # ids with every invalid id set to K
    histogram: np.ndarray  # (layer, step, position region, K): valid ids only
    expert_counts: np.ndarray  # (layer, step, K): valid ids only
    n_invalid: int
    tables: ChunkTables

    @property
    def all_valid(self) -> bool:
        return self.n_invalid == 0

    @property
    def sample(self) -> int:
        return int(self.coords["sample"])


def make_chunk(grid: TraceGrid, tables: ChunkTables, coords: dict, ids: np.ndarray, counts: np.ndarray,
               prob: np.ndarray | None, latents: np.ndarray | None) -> Chunk:
    k = grid.n_experts
    clipped = np.minimum(ids, k)
    histogram = tables.histogram(clipped)
    if grid.sampling:
        branch = grid.branches.index(str(coords["branch"]))
        timestep = int(np.nonzero(grid.timesteps == coords["timestep"])[0][0])
    else:
        branch, timestep = 0, None
    return Chunk(coords, ids, counts, prob, latents, grid.bin_of(coords), branch, timestep, clipped,
                 histogram[..., :k], histogram[..., :k].sum(axis=2), int(histogram[..., k].sum()), tables)

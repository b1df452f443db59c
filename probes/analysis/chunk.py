"""One chunk cell of the stream, with the tables every probe family reads from it.

A chunk cell is one (sample, branch, timestep) of a sampling trace or one event of a training
trace: expert ids of shape (layer, step, token). The shared per-chunk work is done once here:
the ids clipped to K (any id >= K, unwritten 255 or ablated 254, becomes the extra slot K,
which every table drops, so nothing needs masking) and one `np.bincount` on a combined key
that gives both the histogram per (layer, step, position region, expert) and the joint counts
of (expert at step s, expert at step s+1) per (layer, step pair) that the transitions read:
the histogram of steps 0..S-2 is the pair table's row sum, that of step S-1 its column sum
(when that table is no larger than the chunk; else two counts).
Families that pair two routings of the same tokens (stability, expert change) read what
agreement and kappa need, `ChunkTables.agreement`: the tokens with the same expert and each
routing's expert counts over the valid pairs. Where both routings are wholly valid that is one
equality count per (layer, step) beside the counts the chunks already have; otherwise the
joint table of the valid pairs (`ChunkTables.pairs`, one `np.bincount`). Either is counted once
per pair of chunks and shared between the families that ask. Keys are built in the smallest
unsigned dtype that holds them (uint16 for the usual grids), so building one costs a few byte
passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stats.running import count_true
from ..stats.stability import joint_margins
from .setup import Label, TraceGrid


def position_histogram(counted: np.ndarray) -> np.ndarray:
    """The histogram (layer, step, position region, K + 1) from what `ChunkTables.count`
    returned as `counted` (or a sum of such tables): the joint table's margins, or the
    histogram itself."""
    if counted.ndim == 4:
        return counted
    n_layers, n_pairs, n_positions, slots, _ = counted.shape
    histogram = np.empty((n_layers, n_pairs + 1, n_positions, slots), np.int64)
    np.einsum("lspba->lspa", counted, out=histogram[:, :-1])  # step s: the first of the pair (s, s+1)
    np.einsum("lpba->lpb", counted[:, -1], out=histogram[:, -1])  # the last step: the second of the last pair
    return histogram


def _key_dtype(size: int) -> type:
    """Smallest unsigned dtype holding every key below `size` (np.bincount takes any of them)."""
    return np.uint16 if size <= 1 << 16 else np.uint32 if size <= 1 << 32 else np.intp


class ChunkTables:
    """The combined bincount keys of a grid's (layer, step[, position]) cells, computed once."""

    def __init__(self, grid: TraceGrid, labels: list[Label]) -> None:
        n_layers, n_steps, slots = len(grid.layers), len(grid.steps), grid.n_experts + 1
        self.shape = (n_layers, n_steps)
        self.n_experts = self.k = grid.n_experts
        label = next((lab for lab in labels if lab.kind == "position"), None)
        position = label.codes if label is not None else None
        # every region of the label, also those no stored token falls in (a trace of a few
        # explicit --tokens): the tables are sized by the label's values, not by the codes seen
        self.n_positions = len(label.values) if label is not None else 1
        position_part = (np.asarray(position, dtype=np.intp).reshape(1, 1, -1) if position is not None
                         else np.zeros((1, 1, 1), np.intp))
        cell = np.arange(n_layers).reshape(-1, 1, 1) * n_steps + np.arange(n_steps).reshape(1, -1, 1)
        self._histogram_size = n_layers * n_steps * self.n_positions * slots
        self._histogram_key = ((cell * self.n_positions + position_part) * slots).astype(
            _key_dtype(self._histogram_size))
        self._pair_size = n_layers * n_steps * slots**2
        self._pair_dtype = _key_dtype(self._pair_size)
        self._pair_key = (cell * slots**2).astype(self._pair_dtype)  # (layer, step, 1)
        self._joint_size = n_layers * (n_steps - 1) * self.n_positions * slots**2
        # one count for both only where its table is no larger than the records it counts
        self.joint = n_steps >= 2 and self._joint_size <= n_layers * (n_steps - 1) * len(grid.tokens)
        self._timestep_index = ({t: i for i, t in enumerate(np.asarray(grid.timesteps).tolist())}
                                if grid.timesteps is not None else {})
        if self.joint:
            pair_cell = (np.arange(n_layers).reshape(-1, 1, 1) * (n_steps - 1)
                         + np.arange(n_steps - 1).reshape(1, -1, 1))
            self._joint_dtype = _key_dtype(self._joint_size)
            self._joint_key = ((pair_cell * self.n_positions + position_part) * slots**2).astype(self._joint_dtype)
        # this chunk's counted pairs: (first, second, shift, table), shift -1 for an agreement triple
        self._memo: list[tuple[object, object, int, object]] = []

    @property
    def counted_shape(self) -> tuple[int, ...]:
        """The shape of what `count` returns as `counted`: the joint table, or the histogram."""
        (n_layers, n_steps), slots = self.shape, self.n_experts + 1
        return ((n_layers, n_steps - 1, self.n_positions, slots, slots) if self.joint
                else (n_layers, n_steps, self.n_positions, slots))

    def histogram(self, clipped: np.ndarray) -> np.ndarray:
        """Counts (layer, step, position region, K + 1) of clipped ids; slot K = invalid."""
        flat = np.bincount((self._histogram_key + clipped).reshape(-1), minlength=self._histogram_size)
        return flat.reshape(*self.shape, self.n_positions, self.n_experts + 1)

    def count(self, clipped: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The chunk's counts: `(counted, experts, step_pairs)`. `counted` is the joint table
        (layer, step pair, region, K + 1 at s+1, K + 1 at s) from one bincount, or where that
        is not used (one step, or a table larger than the chunk) the histogram (layer, step,
        region, K + 1); `position_histogram` turns either into the histogram, which only the
        position label reads (it adds up `counted` and takes the margins once, at the end).
        `experts` (layer, step, K + 1) counts each expert, slot K the invalid ids; `step_pairs`
        (layer, step pair, K, K) the valid pairs of steps s, s+1 (None without a joint
        table). Starts a new chunk: forgets the pair tables of the previous one."""
        self._memo = []
        if not self.joint:
            histogram = self.histogram(clipped)
            return histogram, histogram.sum(axis=2), None
        n_layers, n_steps = self.shape
        slots = self.n_experts + 1
        # key (layer, step pair, region, expert at s+1, expert at s): the sums below run over
        # leading axes (fast reductions), not over a short last axis
        key = np.multiply(clipped[:, 1:], slots, dtype=self._joint_dtype, casting="unsafe")
        np.add(key, clipped[:, :-1], out=key, casting="unsafe")
        np.add(key, self._joint_key, out=key, casting="unsafe")
        table = np.bincount(key.reshape(-1), minlength=self._joint_size).reshape(
            n_layers, n_steps - 1, self.n_positions, slots, slots)
        pairs = table.sum(axis=2)  # (layer, step pair, expert at s+1, expert at s)
        experts = np.empty((n_layers, n_steps, slots), np.int64)
        pairs.sum(axis=-2, out=experts[:, :-1])  # step s: the first of the pair (s, s+1)
        pairs[:, -1].sum(axis=-1, out=experts[:, -1])  # the last step: the second of the last pair
        k = self.n_experts
        return table, experts, pairs.swapaxes(-1, -2)[..., :k, :k]

    def timestep_index(self, timestep) -> int:
        """Position of a recorded timestep in the grid's timesteps."""
        return self._timestep_index[timestep.item() if isinstance(timestep, np.generic) else timestep]

    def agreement(self, first: "Routing", second: "Routing") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What agreement and kappa of two routings of the same tokens read, per (layer, step):
        the valid pairs with the same expert (layer, step) and the expert counts (layer, step,
        K) of `first` and of `second` over the valid pairs. Counted once per chunk for the same
        two routings (stability and expert change both pair a chunk with its previous
        timestep); read-only."""
        for a, b, s, counted in self._memo:
            if a is first and b is second and s == -1:
                return counted
        if first.all_valid and second.all_valid:  # every token pairs: the margins are the chunks' counts
            counted = (count_true(first.clipped == second.clipped), first.expert_counts, second.expert_counts)
        else:
            counted = joint_margins(self.pairs(first.clipped, second.clipped))
        self._memo.append((first, second, -1, counted))
        return counted

    def pairs(self, first: np.ndarray, second: np.ndarray, shift: int = 0) -> np.ndarray:
        """Joint counts (layer, step, K, K) of two clipped routings of the same tokens, valid
        pairs only; `shift=1` pairs step s of `first` with step s+1 of `second` (the last
        step's row stays empty). Within one chunk the table of the same two arrays is counted
        once (stability and expert change both pair a chunk with its previous timestep);
        it is read-only."""
        for a, b, s, table in self._memo:
            if a is first and b is second and s == shift:
                return table
        n_steps, slots = self.shape[1], self.n_experts + 1
        a, b = (first[:, :-shift], second[:, shift:]) if shift else (first, second)
        key = np.multiply(a, slots, dtype=self._pair_dtype, casting="unsafe")
        np.add(key, b, out=key, casting="unsafe")
        np.add(key, self._pair_key[:, : n_steps - shift], out=key, casting="unsafe")
        table = np.bincount(key.reshape(-1), minlength=self._pair_size).reshape(*self.shape, slots, slots)
        table = table[..., : self.n_experts, : self.n_experts]
        table.flags.writeable = False
        self._memo.append((first, second, shift, table))
        return table


@dataclass(frozen=True, eq=False)
class Routing:
    """One chunk cell's routing as families keep it to pair with a later chunk."""

    clipped: np.ndarray  # (layer, step, token): ids with every invalid id set to K
    expert_counts: np.ndarray  # (layer, step, K): valid ids only
    all_valid: bool


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
    counted: np.ndarray  # the joint table or the histogram of the clipped ids (ChunkTables.count)
    expert_counts: np.ndarray  # (layer, step, K): valid ids only
    n_invalid: int
    tables: ChunkTables
    step_pairs: np.ndarray | None = None  # (layer, step pair, K, K): valid pairs of steps s, s+1
    _routing: Routing | None = None

    @property
    def all_valid(self) -> bool:
        return self.n_invalid == 0

    @property
    def histogram(self) -> np.ndarray:
        """(layer, step, position region, K): valid ids only."""
        return position_histogram(self.counted)[..., : self.tables.n_experts]

    @property
    def routing(self) -> Routing:
        """The routing to keep for pairing with later chunks (one object per chunk: pair
        tables are shared by identity)."""
        if self._routing is None:
            self._routing = Routing(self.clipped, self.expert_counts, self.all_valid)
        return self._routing

    @property
    def sample(self) -> int:
        return int(self.coords["sample"])

    def transitions(self) -> np.ndarray:
        """(layer, step pair, K, K) joint counts of the experts at steps s and s+1."""
        if self.step_pairs is not None:
            return self.step_pairs
        return self.tables.pairs(self.clipped, self.clipped, shift=1)[:, :-1]


def make_chunk(grid: TraceGrid, tables: ChunkTables, coords: dict, ids: np.ndarray, counts: np.ndarray,
               prob: np.ndarray | None, latents: np.ndarray | None) -> Chunk:
    k = grid.n_experts
    clipped = ids if ids.size and ids.max() < k else np.minimum(ids, k)  # a copy only with invalid ids
    counted, experts, step_pairs = tables.count(clipped)
    if grid.sampling:
        branch = grid.branches.index(str(coords["branch"]))
        timestep = tables.timestep_index(coords["timestep"])
    else:
        branch, timestep = 0, None
    return Chunk(coords, ids, counts, prob, latents, grid.bin_of(coords), branch, timestep, clipped,
                 counted, experts[..., :k], int(experts[..., k].sum()), tables, step_pairs)

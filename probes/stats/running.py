"""Streaming accumulators shared by the probe statistics.

Every probe in :mod:`probes.stats` is split into two halves, in the style of
baukit's ``runningstats``:

* an *accumulator* with ``update(chunk...)`` that folds one chunk of records into
  a small fixed-size state (counts, sums) and ``result()`` that turns that state
  into statistics; memory is bounded by the chunk size plus the state, never by
  the size of the data set;
* pure *functions* on the state (count tables, sums), so the statistics can also
  be computed from tables loaded elsewhere.

The workhorse is :class:`GroupedCounts`: a joint histogram of one or more small
categorical variables (expert id, label, next expert ...) for every cell of a
grid of group keys (layer, recursion step, timestep bin ...).  Counting is a
single ``np.bincount`` on a combined integer key,

    key = ((g_0 * G_1 + g_1) * ... ) * (V_0 * V_1 ...) + (v_0 * V_1 + v_1) ...,

which runs at a few nanoseconds per record.  Group indices may be broadcastable
to the values (e.g. a ``(rows, 1)`` array of layer indices against ``(rows,
tokens)`` expert ids), so per-row keys never have to be materialised per token
by the caller.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import numpy as np

_UNSIGNED = ((np.uint8, 255), (np.uint16, 65535), (np.uint32, 2**32 - 1))


def _index_dtype(bound: int) -> type:
    """Smallest unsigned dtype holding values below ``bound`` (intermediate keys)."""
    for dt, top in _UNSIGNED:
        if bound <= top:
            return dt
    return np.intp


def _flat_key(
    parts: Sequence[np.ndarray | int], sizes: Sequence[int], shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Mixed-radix combination of integer arrays (Horner scheme), broadcasting.

    ``key = (...((p_0 * s_1 + p_1) * s_2 + p_2) ...)`` with ``parts[i]`` in
    ``[0, sizes[i])``.  Intermediate keys use the smallest unsigned dtype that
    holds them and are updated in place; only the final key is ``intp`` (what
    ``np.bincount`` needs), so each full-size step costs one or two cheap passes.
    """
    key: np.ndarray | None = None
    bound = 1
    last = len(parts) - 1
    for i, (part, size) in enumerate(zip(parts, sizes)):
        bound *= int(size)
        dt = np.intp if i == last else _index_dtype(bound)
        p = np.asarray(part)
        if key is None:
            key = p.astype(dt)
            continue
        if key.dtype == dt and key.shape == np.broadcast_shapes(key.shape, p.shape):
            np.multiply(key, size, out=key, casting="unsafe")  # in place: key * size
        else:
            key = np.multiply(key, size, dtype=dt, casting="unsafe")
        if key.shape == np.broadcast_shapes(key.shape, p.shape):
            np.add(key, p, out=key, dtype=dt, casting="unsafe")  # in place; ranges checked
        else:
            key = np.add(key, p, dtype=dt, casting="unsafe")
    if key is None:
        key = np.zeros((), dtype=np.intp)
    if shape is not None and key.shape != shape:
        key = np.broadcast_to(key, shape)
    return key


def count_true(mask: np.ndarray) -> np.ndarray:
    """Number of True along the last axis, as int64 (summed as bytes: no bool-to-int copy)."""
    if mask.shape[-1] == 0:
        return np.zeros(mask.shape[:-1], np.int64)
    acc = np.uint16 if mask.shape[-1] < 1 << 16 else np.int64
    return mask.view(np.uint8).sum(axis=-1, dtype=acc).astype(np.int64)


class Stat:
    """The one contract of every streaming statistic (after baukit's ``runningstats.Stat``).

    * ``update(...)`` folds one chunk into a fixed-size state;
    * ``merge(other)`` adds the state of the same statistic fed from another stream;
    * ``result(...)`` gives the statistics of everything folded in so far;
    * ``state_dict()`` / ``load_state_dict(state)`` save and restore that state as named
      numpy arrays (e.g. to resume a pass or combine passes run in other processes).

    The state is every numpy-array attribute plus every nested ``Stat`` attribute (their
    arrays under ``"name.field"``); merging adds the arrays.  A subclass with other state
    (running maxima, lists) overrides ``merge`` / ``state_dict`` / ``load_state_dict``.
    """

    def update(self, *args, **kwargs) -> None:
        raise NotImplementedError

    def result(self, *args, **kwargs):
        raise NotImplementedError

    def _state(self) -> dict:
        return {k: v for k, v in vars(self).items() if isinstance(v, (np.ndarray, Stat))}

    def merge(self, other: "Stat") -> None:
        """Add ``other``'s state (same class, same shapes) to this one."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        theirs = other._state()
        for name, mine in self._state().items():
            if isinstance(mine, Stat):
                mine.merge(theirs[name])
            elif mine.shape != theirs[name].shape:
                raise ValueError("cannot merge accumulators of different shape")
            else:
                mine += theirs[name]

    def state_dict(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, value in self._state().items():
            if isinstance(value, Stat):
                out.update({f"{name}.{k}": a for k, a in value.state_dict().items()})
            else:
                out[name] = value.copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name, value in self._state().items():
            if isinstance(value, Stat):
                prefix = name + "."
                value.load_state_dict({k[len(prefix):]: a for k, a in state.items() if k.startswith(prefix)})
                continue
            loaded = np.asarray(state[name])
            if loaded.shape != value.shape:
                raise ValueError(f"state {name!r} has shape {loaded.shape}, expected {value.shape}")
            value[...] = loaded


class GroupedCounts(Stat):
    """Joint counts of categorical ``values`` for every cell of a group grid.

    Parameters
    ----------
    value_sizes:
        Number of categories of each counted variable, e.g. ``(K,)`` for expert
        load or ``(K, M)`` for an expert x label contingency table.
    group_shape:
        Shape of the grid of group keys, e.g. ``(n_layers, n_steps, n_tbins)``;
        ``()`` for a single global group.

    ``result()`` returns an ``int64`` array of shape ``group_shape + value_sizes``;
    marginals over group axes (per layer, per step, global) are plain sums over
    the leading axes, so one accumulator at the finest grouping serves them all.
    """

    def __init__(self, value_sizes: Sequence[int], group_shape: Sequence[int] = ()) -> None:
        self.value_sizes = tuple(int(v) for v in value_sizes)
        self.group_shape = tuple(int(g) for g in group_shape)
        self._n_cells = int(np.prod(self.group_shape + self.value_sizes, dtype=np.int64))
        self._counts = np.zeros(self._n_cells, dtype=np.int64)

    @property
    def n(self) -> int:
        """Number of records folded in so far."""
        return int(self._counts.sum())

    def update(
        self,
        values: Sequence[np.ndarray],
        groups: Sequence[np.ndarray | int] = (),
    ) -> None:
        """Count one chunk.

        ``values`` are integer arrays (one per counted variable, same shape);
        ``groups`` are integer arrays (one per group axis) broadcastable to that
        shape, or plain ints.  Values outside their range raise ``ValueError``
        only through an out-of-range total key; callers should pass valid ids.
        """
        if len(values) != len(self.value_sizes):
            raise ValueError(f"expected {len(self.value_sizes)} value arrays, got {len(values)}")
        if len(groups) != len(self.group_shape):
            raise ValueError(f"expected {len(self.group_shape)} group arrays, got {len(groups)}")
        shape = np.broadcast_shapes(*(np.shape(v) for v in values), *(np.shape(g) for g in groups))
        if int(np.prod(shape)) == 0:
            return
        parts = list(groups) + list(values)
        sizes = self.group_shape + self.value_sizes
        for part, size in zip(parts, sizes):
            p = np.asarray(part)
            if p.size and (p.max() >= size or (p.dtype.kind == "i" and p.min() < 0)):
                raise ValueError(f"index out of range [0, {size})")
        # Combine broadcast (small) parts first and full-size parts last, so that
        # each full-size part costs one pass; count in that permuted cell order
        # and transpose the (small) table back to the canonical order.
        full = [int(np.size(p)) == int(np.prod(shape)) and np.ndim(p) == len(shape) for p in parts]
        order = [i for i in range(len(parts)) if not full[i]] + [i for i in range(len(parts)) if full[i]]
        key = _flat_key([parts[i] for i in order], [sizes[i] for i in order], shape).reshape(-1)
        counts = np.bincount(key, minlength=self._n_cells)
        if order != list(range(len(parts))):
            counts = counts.reshape([sizes[i] for i in order]).transpose(np.argsort(order)).reshape(-1)
        self._counts += counts

    def add_counts(self, counts: np.ndarray, at: tuple | None = None) -> None:
        """Fold in already counted records.

        Without ``at``, ``counts`` is a whole table of shape ``group_shape + value_sizes``.
        With ``at``, an index into that table (ints and slices, e.g.
        ``(slice(None), slice(None), tbin, slice(None), label)``), ``counts`` is added to
        that part only (it must broadcast to it): a chunk whose group or label is one
        value is folded in from its per-expert counts without counting records again.
        """
        c = np.asarray(counts)
        if c.dtype.kind not in "iub":
            raise ValueError("counts must be integers")
        if at is None:
            self._counts += c.astype(np.int64, copy=False).reshape(-1)
            return
        view = self._counts.reshape(self.group_shape + self.value_sizes)  # a view: updated in place
        view[at] += c

    def add_grouped(self, counts: np.ndarray, groups: Sequence[np.ndarray | int]) -> None:
        """Fold in counts of shape ``lead + value_sizes`` whose group indices (one array or
        int per group axis, broadcastable to ``lead``) are given: ``counts[i]`` is added to
        the table row of group ``groups[i]``.  For small pre-counted tables (e.g. per map)."""
        c = np.asarray(counts)
        nv = len(self.value_sizes)
        if c.shape[c.ndim - nv:] != self.value_sizes:
            raise ValueError(f"counts must end with the value axes {self.value_sizes}")
        lead = c.shape[: c.ndim - nv]
        view = self._counts.reshape((-1,) + self.value_sizes)
        if len(groups) != len(self.group_shape):
            raise ValueError(f"expected {len(self.group_shape)} group arrays, got {len(groups)}")
        for part, size in zip(groups, self.group_shape):
            p = np.asarray(part)
            if p.size and (p.max() >= size or p.min() < 0):
                raise ValueError(f"index out of range [0, {size})")
        key = _flat_key(list(groups), self.group_shape, lead).reshape(-1) if groups else np.zeros(
            int(np.prod(lead)), dtype=np.intp)
        np.add.at(view, key, c.reshape((-1,) + self.value_sizes))

    def result(self) -> np.ndarray:
        """Counts of shape ``group_shape + value_sizes`` (a copy)."""
        return self._counts.reshape(self.group_shape + self.value_sizes).copy()


class GroupedSums(Stat):
    """Per-group sums of float vectors (e.g. gate probabilities, entropies).

    ``update(x, groups)`` with ``x`` of shape ``(..., width)`` and group arrays
    broadcastable to ``x.shape[:-1]``; ``result()`` gives ``(sums, counts)`` of
    shapes ``group_shape + (width,)`` and ``group_shape``.  Sums are float64, so
    means stay accurate over billions of records.
    """

    def __init__(self, width: int, group_shape: Sequence[int] = ()) -> None:
        self.width = int(width)
        self.group_shape = tuple(int(g) for g in group_shape)
        self._n_groups = int(np.prod(self.group_shape, dtype=np.int64))
        self._sums = np.zeros((self._n_groups, self.width), dtype=np.float64)
        self._counts = np.zeros(self._n_groups, dtype=np.int64)

    def update(self, x: np.ndarray, groups: Sequence[np.ndarray | int] = ()) -> None:
        x = np.asarray(x)
        if x.shape[-1] != self.width:
            raise ValueError(f"last axis must have width {self.width}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.width)
        if len(self.group_shape) == 0:
            self._sums[0] += flat.sum(axis=0, dtype=np.float64)
            self._counts[0] += flat.shape[0]
            return
        key = _flat_key(list(groups), self.group_shape, lead).reshape(-1)
        self._counts += np.bincount(key, minlength=self._n_groups)
        for j in range(self.width):  # one weighted bincount per column
            self._sums[:, j] += np.bincount(key, weights=flat[:, j], minlength=self._n_groups)

    def add_at(self, sums: np.ndarray, counts: np.ndarray | int, at: tuple) -> None:
        """Fold in per-group sums of one block of the group grid: ``at`` indexes it (ints and
        slices, as `GroupedCounts.add_counts`), ``sums`` has the block's shape + ``(width,)``
        and ``counts`` (records per group) broadcasts to the block."""
        self._sums.reshape(self.group_shape + (self.width,))[at] += sums
        self._counts.reshape(self.group_shape)[at] += counts

    def add_columns(self, at: tuple, *columns: np.ndarray | int, count: np.ndarray | int = 1) -> None:
        """`add_at` with the sums given column by column (each broadcast to the block), so the
        caller does not stack them; ``count`` records per group."""
        block = self._sums.reshape(self.group_shape + (self.width,))[at]
        for j, column in enumerate(columns):
            block[..., j] += column
        self._counts.reshape(self.group_shape)[at] += count

    def add_rows(self, sums: np.ndarray, counts: np.ndarray, groups: Sequence[np.ndarray | int] = ()) -> None:
        """Fold in sums already taken over the records of each row: ``sums`` of shape
        ``lead + (width,)`` and ``counts`` (records per row) of shape ``lead``, with group
        indices broadcastable to ``lead`` (several rows may share a group)."""
        s = np.asarray(sums, dtype=np.float64)
        if s.shape[-1] != self.width:
            raise ValueError(f"last axis must have width {self.width}")
        lead = s.shape[:-1]
        if len(groups) != len(self.group_shape):
            raise ValueError(f"expected {len(self.group_shape)} group arrays, got {len(groups)}")
        key = (_flat_key(list(groups), self.group_shape, lead).reshape(-1) if self.group_shape
               else np.zeros(int(np.prod(lead)), dtype=np.intp))
        np.add.at(self._sums, key, s.reshape(-1, self.width))
        np.add.at(self._counts, key, np.broadcast_to(np.asarray(counts, dtype=np.int64), lead).reshape(-1))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            self._sums.reshape(self.group_shape + (self.width,)).copy(),
            self._counts.reshape(self.group_shape).copy(),
        )

    def mean(self) -> np.ndarray:
        """Per-group means (NaN for empty groups)."""
        s, c = self.result()
        with np.errstate(invalid="ignore", divide="ignore"):
            return s / c[..., None]


def group_axis_names(group_names: Sequence[str] | None, n_axes: int) -> tuple[str, ...]:
    """Names of the group axes: ``group_names`` checked against the grid, or ``g0, g1, ...``."""
    names = tuple(str(x) for x in group_names) if group_names else tuple(f"g{i}" for i in range(n_axes))
    if len(names) != n_axes:
        raise ValueError("group_names must match group_shape")
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be distinct, got {names}")
    return names


def sum_groups(arr: np.ndarray, group_names: Sequence[str], keep: Sequence[str] | None) -> np.ndarray:
    """Marginal of a per-group array (group axes first, named ``group_names``) over the
    group axes *not* in ``keep``; ``keep=None`` keeps every axis, ``keep=()`` sums them all.
    Kept axes stay in their original order.  Unknown names raise ``ValueError``."""
    a = np.asarray(arr)
    if keep is None:
        return a
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    unknown = [k for k in keep if k not in group_names]
    if unknown:
        raise ValueError(f"unknown group axis {unknown[0]!r}; the group axes are {tuple(group_names)}")
    drop = tuple(i for i, name in enumerate(group_names) if name not in keep)
    return a.sum(axis=drop) if drop else a


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise ``num / den`` with NaN where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return np.where(den == 0, np.nan, out)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats, ``H = -sum_k p_k log p_k`` with ``0 log 0 = 0``.

    ``p`` may be unnormalised counts; it is normalised along ``axis`` first.
    An all-zero vector has entropy NaN.
    """
    p = np.asarray(p, dtype=np.float64)
    tot = p.sum(axis=axis, keepdims=True)
    q = safe_div(p, tot)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(q > 0, -q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    h = terms.sum(axis=axis)
    return np.where(np.squeeze(tot, axis=axis) > 0, h, np.nan)


class ArrayResult:
    """Base of the result dataclasses: `to_dict()` gives every field as nested lists (JSON-ready)."""

    def to_dict(self) -> dict:
        return {k: np.asarray(v).tolist() for k, v in asdict(self).items()}

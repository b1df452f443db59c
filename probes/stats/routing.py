"""Expert load and router health: how evenly the gate spreads tokens over experts.

Notation: ``K`` experts, ``N_k`` tokens routed (hard assignment) to expert ``k``,
``f_k = N_k / N`` the *load share*, ``P_k`` the mean gate probability of expert
``k`` (the *gate mass*).  All load statistics are computed from count vectors
of shape ``(..., K)``; leading axes are group keys (layer, recursion step,
timestep bin ...) and every function is vectorised over them.  Hard load and
soft gate mass are kept apart (they disagree exactly when the router is
uncertain or when routing is sampled).

References for the definitions: Switch Transformer (balance loss ``K sum f P``),
ST-MoE (router z-loss), Shazeer et al. 2017 / V-MoE (CV of the load), DeepSeek
loss-free balancing (MaxVio), OLMoE / NeMo (dead experts, utilisation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.special import logsumexp

from .running import ArrayResult, GroupedCounts, GroupedSums, Stat, entropy, group_axis_names, safe_div, sum_groups

# --------------------------------------------------------------------------- closed-form statistics


@dataclass
class LoadStats(ArrayResult):
    """Load statistics per group; every field has the group shape (``share`` adds ``K``).

    share:            f_k = N_k / N, the load share of each expert.
    utilisation:      K f_k, load relative to the balanced 1/K (1 = ideal, 0 = unused).
    dead:             boolean, f_k <= dead_threshold (expert receives (almost) no tokens).
    n_dead:           number of dead experts.
    cv:               coefficient of variation std_k(N_k)/mean_k(N_k) (population std):
                      0 when balanced, sqrt(K-1) at full collapse onto one expert.
    max_vio:          MaxVio = max_k N_k / mean_k N_k - 1 = K max_k f_k - 1: 0 balanced, K-1 collapsed.
    norm_entropy:     H(f)/log K in [0, 1]: 1 balanced, 0 collapsed.
    effective_experts: exp H(f), the number of equally used experts with the same entropy.
    n:                number of tokens in the group.
    """

    share: np.ndarray
    utilisation: np.ndarray
    dead: np.ndarray
    n_dead: np.ndarray
    cv: np.ndarray
    max_vio: np.ndarray
    norm_entropy: np.ndarray
    effective_experts: np.ndarray
    n: np.ndarray


def counts_from_ids(
    ids: np.ndarray, n_experts: int, groups: Sequence[np.ndarray | int] = (), group_shape: Sequence[int] = ()
) -> np.ndarray:
    """Count expert ids (optionally per group) into an array ``group_shape + (K,)``."""
    acc = GroupedCounts((n_experts,), group_shape)
    acc.update([ids], groups)
    return acc.result()


def load_stats(counts: np.ndarray, dead_threshold: float = 0.0) -> LoadStats:
    """Load statistics from expert counts of shape ``(..., K)`` (see :class:`LoadStats`).

    ``dead_threshold`` is the share at or below which an expert counts as dead
    (0 means: received no token at all).  Empty groups give NaN statistics.
    """
    c = np.asarray(counts, dtype=np.float64)
    k = c.shape[-1]
    n = c.sum(axis=-1)
    share = safe_div(c, n[..., None])
    mean = n / k
    # population std of the counts: sqrt(mean_k (N_k - mean)^2)
    std = np.sqrt(np.mean((c - mean[..., None]) ** 2, axis=-1))
    cv = safe_div(std, mean)
    max_vio = safe_div(c.max(axis=-1), mean) - 1.0  # max_k N_k / mean N - 1
    h = entropy(c, axis=-1)
    norm_h = h / np.log(k) if k > 1 else np.zeros_like(h)
    dead = np.where(n[..., None] > 0, share <= dead_threshold, False)
    return LoadStats(
        share=share,
        utilisation=k * share,
        dead=dead,
        n_dead=dead.sum(axis=-1),
        cv=cv,
        max_vio=max_vio,
        norm_entropy=norm_h,
        effective_experts=np.exp(h),
        n=n.astype(np.int64),
    )


def balance_monitor(load_share: np.ndarray, gate_mass: np.ndarray) -> np.ndarray:
    """Switch-style balance monitor ``K sum_k f_k P_k`` (without the coefficient alpha).

    ``f`` is the hard load share, ``P`` the mean gate probability.  Equals 1 when
    both are uniform and K at full collapse (f = P = one-hot).  With top-1 routing
    it can stay near 1 while the load is imbalanced (f skewed but P flat), so
    read it next to the CV / entropy of ``f``.
    """
    f = np.asarray(load_share, dtype=np.float64)
    p = np.asarray(gate_mass, dtype=np.float64)
    return f.shape[-1] * np.sum(f * p, axis=-1)


def z_loss(logits: np.ndarray) -> float:
    """ST-MoE router z-loss monitor ``mean_x (logsumexp_k logit_k(x))^2``.

    Large values mean large router logits (sharp, numerically fragile softmax).
    """
    lse = logsumexp(np.asarray(logits, dtype=np.float64), axis=-1)
    return float(np.mean(lse**2))


def gate_entropy(probs: np.ndarray, normalised: bool = False) -> np.ndarray:
    """Per-token entropy of the gate distribution ``-sum_k p_k log p_k``: in nats, or with
    ``normalised=True`` divided by ``log K`` (K = ``probs.shape[-1]``; 0 = one-hot, 1 = uniform
    gate), the one normalisation the training curves and the evaluation's routing figures use.
    Tokens whose stored id is invalid (unwritten, ablated) are the caller's to leave out of a mean."""
    h = entropy(probs, axis=-1)
    k = np.shape(probs)[-1]
    return h / np.log(k) if normalised and k > 1 else h


def top1_margin(probs: np.ndarray) -> np.ndarray:
    """Per-token margin ``p_(1) - p_(2)`` between the two largest gate probabilities.

    Near 0: the router hesitates between two experts; near 1: a confident choice.
    """
    p = np.asarray(probs)
    top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]).astype(np.float64)


def sampling_disagreement(sampled_ids: np.ndarray, probs_or_logits: np.ndarray) -> float:
    """Share of tokens whose sampled expert differs from ``argmax`` of the router.

    With hard Gumbel-softmax routing the forward choice is a sample from
    softmax(logits) whatever the temperature, so in training traces this is the
    rate at which training routing and eval (argmax) routing differ.
    """
    am = np.argmax(probs_or_logits, axis=-1)
    return float(np.mean(np.asarray(sampled_ids) != am))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax along the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- float16 gate sums

FLOAT16_FINITE_END = 0x7C00  # float16 bit patterns below this are the finite values >= +0
ROW_BLOCK_RECORDS = 16384  # records per block of rows: the float64 temporaries stay in cache


@functools.cache
def _neg_p_log_p() -> np.ndarray:
    """``-p log p`` (0 at p = 0) of every finite non-negative float16 bit pattern, in float64."""
    value = np.arange(FLOAT16_FINITE_END, dtype=np.uint16).view(np.float16).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(value > 0, -value * np.log(np.where(value > 0, value, 1.0)), 0.0)


def _top_two(columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second largest (with multiplicity) of ``len(columns)`` >= 2 arrays, elementwise,
    by a tournament of maxima and minima; the values are >= 0 (a missing opponent is 0)."""
    level = [(np.maximum(a, b), np.minimum(a, b)) for a, b in zip(columns[0::2], columns[1::2])]
    if len(columns) % 2:
        level.append((columns[-1], np.zeros_like(columns[-1])))
    while len(level) > 1:
        merged = [(np.maximum(a, c), np.maximum(np.minimum(a, c), np.maximum(b, d)))
                  for (a, b), (c, d) in zip(level[0::2], level[1::2])]
        level = merged + level[len(merged) * 2:]
    return level[0]


def float16_row_sums(probs: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """`GateAccumulator`'s per-record columns of stored float16 probabilities ``(rows..., T, K)``
    and their valid ids ``(rows..., T)``, summed over the T records of each row: ``(rows...,
    K + 6)``; None where this path does not apply (a negative, infinite or NaN probability, a
    token whose probabilities are all 0, an id >= K, K < 2: `GateAccumulator.update` then takes
    the general path).

    The same quantities as the general path, computed from the float16 bit patterns a few rows
    at a time: the sums of P_k and of the margin are exact either way (sums of float16 values in
    float64); the entropy is ``log S + sum_k (-p_k log p_k) / S`` with ``S = sum_k p_k`` (the
    general path's entropy of p / S, rearranged), ``-p log p`` looked up per bit pattern, so it
    agrees with the general path to float64 rounding; argmax is the first column holding the
    largest value, as ``np.argmax``.
    """
    k, n_tokens = probs.shape[-1], probs.shape[-2]
    bits = probs.view(np.uint16)
    if k < 2 or bits.size == 0 or bits.max() >= FLOAT16_FINITE_END or ids.max() >= k:
        return None
    rows = probs.shape[:-2]
    bits, ids = bits.reshape(-1, n_tokens, k), ids.reshape(-1, n_tokens)
    out = np.zeros((bits.shape[0], k + 6))
    step = max(1, ROW_BLOCK_RECORDS // n_tokens)
    for r0 in range(0, bits.shape[0], step):
        if not _row_block_sums(bits[r0:r0 + step], ids[r0:r0 + step], out[r0:r0 + step]):
            return None
    out[:, k + 5] = n_tokens  # has_ids; lse^2 and has_logits stay 0
    return out.reshape(rows + (k + 6,))


def _row_block_sums(bits: np.ndarray, ids: np.ndarray, out: np.ndarray) -> bool:
    """`float16_row_sums` of a block of rows (``bits`` (rows, T, K)) into ``out``; False where a
    token's probabilities are all 0 (its entropy is NaN: the general path's business)."""
    k = bits.shape[-1]
    columns = np.ascontiguousarray(np.moveaxis(bits, -1, 0))  # (K, rows, T): one array per expert
    total, plogp, v, h = (np.empty(columns.shape[1:]) for _ in range(4))
    for j, column in enumerate(columns):
        np.copyto(v if j else total, column.view(np.float16))  # float16 -> float64 is exact
        np.take(_neg_p_log_p(), column, out=h if j else plogp)
        out[:, j] = (v if j else total).sum(axis=-1)
        if j:
            total += v
            plogp += h
    if not (total > 0).all():
        return False
    entropy_ = np.log(total)
    entropy_ += np.divide(plogp, total, out=plogp)
    out[:, k] = entropy_.sum(axis=-1)
    top, second = _top_two(list(columns))
    np.copyto(v, top.view(np.float16))
    np.copyto(h, second.view(np.float16))
    out[:, k + 1] = v.sum(axis=-1) - h.sum(axis=-1)  # both sums exact: the sum of the margins
    out[:, k + 3] = _disagreements(columns, top, second, ids)
    return True


def _disagreements(columns: np.ndarray, top: np.ndarray, second: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, the records whose argmax (the first of ``columns`` holding the largest value)
    is not their id: with one largest value, those whose id's value is not it; with a tie,
    ``np.argmax`` over the columns of those records."""
    k, n = columns.shape[0], top.size
    flat_ids = ids.reshape(-1)
    at = flat_ids.astype(np.intp)
    at *= n
    at += np.arange(n)
    wrong = columns.reshape(-1)[at] != top.reshape(-1)
    tie = np.flatnonzero(top.reshape(-1) == second.reshape(-1))
    if tie.size:
        wrong[tie] = columns.reshape(k, n)[:, tie].argmax(axis=0) != flat_ids[tie]
    return wrong.reshape(top.shape).sum(axis=-1)


# --------------------------------------------------------------------------- accumulators


class LoadAccumulator(Stat):
    """Streaming expert counts per group; ``result()`` gives :class:`LoadStats`.

    >>> acc = LoadAccumulator(8, group_shape=(n_layers, n_steps, n_tbins))
    >>> acc.update(ids, layer_idx, step_idx, tbin_idx)   # group arrays broadcast to ids
    >>> acc.result(keep=("layer",))  # marginal per layer; keep=() for global

    ``group_names`` names the group axes so ``result(keep=...)`` can sum out the
    others; the default names are ``g0, g1, ...``.
    """

    def __init__(
        self,
        n_experts: int,
        group_shape: Sequence[int] = (),
        group_names: Sequence[str] | None = None,
        dead_threshold: float = 0.0,
    ) -> None:
        self.n_experts = int(n_experts)
        self.counts = GroupedCounts((self.n_experts,), group_shape)
        self.group_names = group_axis_names(group_names, len(self.counts.group_shape))
        self.dead_threshold = dead_threshold

    def update(self, ids: np.ndarray, *groups: np.ndarray | int) -> None:
        """Fold in expert ids (any shape) with one group-index array per group axis."""
        self.counts.update([ids], groups)

    def update_counts(self, counts: np.ndarray) -> None:
        """Fold in pre-computed counts of shape ``group_shape + (K,)``."""
        self.counts.add_counts(counts)

    def table(self, keep: Sequence[str] | None = None) -> np.ndarray:
        """Counts, summed over the group axes not in ``keep`` (``None`` keeps all)."""
        return sum_groups(self.counts.result(), self.group_names, keep)

    def result(self, keep: Sequence[str] | None = None) -> LoadStats:
        return load_stats(self.table(keep), self.dead_threshold)


@dataclass
class GateStats(ArrayResult):
    """Router statistics per group (from gate probabilities and/or logits).

    gate_mass:            P_k, mean gate probability per expert (shape group + (K,)).
    load_share:           f_k from the hard choice (given ids, else argmax of probs).
    mean_entropy:         mean per-token H(p(x)) in nats; low = confident router.
    mean_norm_entropy:    mean_entropy / log K.
    mean_margin:          mean top-1 margin p_(1) - p_(2).
    balance:              K sum_k f_k P_k (1 balanced, K collapsed).
    z_loss:               mean (logsumexp logits)^2 (NaN without logits).
    disagreement:         share of tokens where the given (sampled) id != argmax p (NaN without ids).
    soft_mi:              H(mean_x p(x)) - mean_x H(p(x)) in nats: the soft mutual
                          information between token and expert (ModuleFormer); high
                          when each token is routed confidently *and* the experts are
                          used evenly overall.
    n:                    tokens per group.
    """

    gate_mass: np.ndarray
    load_share: np.ndarray
    mean_entropy: np.ndarray
    mean_norm_entropy: np.ndarray
    mean_margin: np.ndarray
    balance: np.ndarray
    z_loss: np.ndarray
    disagreement: np.ndarray
    soft_mi: np.ndarray
    n: np.ndarray


class GateAccumulator(Stat):
    """Streaming router-confidence, balance and z-loss monitors per group.

    ``update(probs=..., logits=..., ids=..., groups=(...))``: give ``logits`` (then
    probabilities are their softmax) or ``probs`` of shape ``(..., K)``;
    optionally the routed (e.g. Gumbel-sampled) ``ids`` of shape ``(...)`` for
    the hard load and the sampling-disagreement rate.  Group arrays broadcast to
    ``probs.shape[:-1]``.

    State per group: sums of P_k, of f_k one-hots, of H(p), of the margin, of
    lse^2, of disagreements and token counts, so memory is O(groups x K).

    ``group_names`` names the group axes (default ``g0, g1, ...``) so that
    ``result(keep=...)`` gives the statistics of the marginal groups, e.g.
    ``result(keep=("layer",))`` per layer, ``result(keep=())`` global.  Marginals
    are computed from the pooled sums (token-weighted), not by averaging group means.
    """

    def __init__(self, n_experts: int, group_shape: Sequence[int] = (),
                 group_names: Sequence[str] | None = None) -> None:
        self.n_experts = int(n_experts)
        self.group_shape = tuple(int(g) for g in group_shape)
        self.group_names = group_axis_names(group_names, len(self.group_shape))
        # columns: P_1..P_K, H, margin, lse^2, disagree, has_logits, has_ids
        self._sums = GroupedSums(self.n_experts + 6, self.group_shape)
        self._load = GroupedCounts((self.n_experts,), self.group_shape)

    def update(
        self,
        probs: np.ndarray | None = None,
        logits: np.ndarray | None = None,
        ids: np.ndarray | None = None,
        groups: Sequence[np.ndarray | int] = (),
        expert_counts: np.ndarray | None = None,
    ) -> None:
        """Fold in one chunk. Stored (float16) probabilities with valid ids and groups that are
        constant along the token axis (the second to last axis of ``probs``, e.g. one (layer,
        step) per row) take `float16_row_sums`: the same sums, by row, without float64 copies
        of every probability; ``expert_counts`` (rows + (K,)), the ids' counts per row when the
        caller has them, then saves counting the ids again."""
        if probs is None and logits is None:
            raise ValueError("give probs or logits")
        if logits is None and ids is not None and self._update_rows(probs, ids, groups, expert_counts):
            return
        if logits is not None:
            logits = np.asarray(logits, dtype=np.float64)
            lse = logsumexp(logits, axis=-1)
            p = np.exp(logits - lse[..., None])
            lse2 = lse**2
            has_logits = np.ones_like(lse)
        else:
            p = np.asarray(probs, dtype=np.float64)
            lse2 = np.zeros(p.shape[:-1])
            has_logits = np.zeros(p.shape[:-1])
        am = np.argmax(p, axis=-1)
        if ids is not None:
            hard = np.asarray(ids)
            disagree = (hard != am).astype(np.float64)
            has_ids = np.ones(p.shape[:-1])
        else:
            hard = am
            disagree = np.zeros(p.shape[:-1])
            has_ids = np.zeros(p.shape[:-1])
        cols = np.concatenate(
            [
                p,
                gate_entropy(p)[..., None],
                top1_margin(p)[..., None],
                lse2[..., None],
                disagree[..., None],
                has_logits[..., None],
                has_ids[..., None],
            ],
            axis=-1,
        )
        self._sums.update(cols, groups)
        self._load.update([hard], groups)

    def _update_rows(self, probs, ids, groups, expert_counts) -> bool:
        """The float16 path of `update`; False (nothing folded) where it does not apply."""
        p, hard = np.asarray(probs), np.asarray(ids)
        if p.dtype != np.float16 or p.ndim < 2 or hard.shape != p.shape[:-1] or p.shape[-1] != self.n_experts:
            return False
        if any(np.ndim(g) and np.shape(g)[-1] != 1 for g in groups):
            return False  # a group that varies along the tokens
        sums = float16_row_sums(p, hard)
        if sums is None:
            return False
        rows = p.shape[:-2]
        row_groups = [np.asarray(g)[..., 0] if np.ndim(g) else g for g in groups]
        self._sums.add_rows(sums, p.shape[-2], row_groups)
        if expert_counts is None:
            self._load.update([hard], groups)
        else:
            self._load.add_grouped(np.broadcast_to(expert_counts, rows + (self.n_experts,)), row_groups)
        return True

    def result(self, keep: Sequence[str] | None = None) -> GateStats:
        """Statistics per group; ``keep`` names the group axes to keep (the others are
        summed out; ``None`` keeps all, ``()`` gives the global statistics)."""
        k = self.n_experts
        sums, n = self._sums.result()
        sums = sum_groups(sums, self.group_names, keep)
        n = sum_groups(n, self.group_names, keep)
        mean = safe_div(sums, n[..., None])
        gate_mass = mean[..., :k]
        load = sum_groups(self._load.result(), self.group_names, keep)
        f = safe_div(load, load.sum(axis=-1, keepdims=True))
        mean_h = mean[..., k]
        # soft MI = H(mean_x p(x)) - mean_x H(p(x))  (entropy is concave, so >= 0)
        soft = entropy(gate_mass, axis=-1) - mean_h
        z = np.where(sums[..., k + 4] == n, mean[..., k + 2], np.nan)
        dis = np.where(sums[..., k + 5] == n, mean[..., k + 3], np.nan)
        return GateStats(
            gate_mass=gate_mass,
            load_share=f,
            mean_entropy=mean_h,
            mean_norm_entropy=mean_h / np.log(k),
            mean_margin=mean[..., k + 1],
            balance=balance_monitor(f, gate_mass),
            z_loss=z,
            disagreement=dis,
            soft_mi=soft,
            n=n,
        )

"""Mutual information between the routed expert and a discrete label, from count tables.

Everything is computed from a contingency table ``N[e, y]`` (expert x label) that
is accumulated chunk by chunk (:class:`ContingencyAccumulator`), so MI over a
billion records costs K x |Y| integers of memory.  The label can be anything
discrete: timestep bin, recursion step, token position, prompt attribute,
class, guidance branch.

Estimators (all in nats; divide by ``log 2`` for bits):

* plug-in  ``I = sum_{e,y} p(e,y) log p(e,y) / (p(e) p(y))``.  Biased upwards:
  under independence ``E[I] ~ (K-1)(M-1) / (2N)``.
* Miller-Madow: each entropy gets ``+(m-1)/(2N)`` with ``m`` the number of
  non-empty cells, so ``I_MM = I + ((m_E-1) + (m_Y-1) - (m_EY-1)) / (2N)``.
* permutation-null corrected: ``I - mean(I_null)`` where ``I_null`` is the MI of
  tables drawn under the null (see below).
* adjusted MI (Vinh, Epps & Bailey 2010, the quantity of
  ``sklearn.metrics.adjusted_mutual_info_score`` with arithmetic mean):
  ``AMI = (I - E[I]) / (mean(H_E, H_Y) - E[I])`` with the *analytic* expected MI
  under the hypergeometric (fixed-margin) model, computed here from the margins
  only, so no records have to be kept.
* p-value of the permutation test: ``(1 + #{I_null >= I}) / (1 + n_perm)``.

Null tables.  Permuting the labels of N records keeps both margins fixed and
makes the table multivariate-hypergeometric (the Fisher-Freeman-Halton null).
Instead of permuting records we draw such tables directly from the margins,
cell by cell: for row ``e`` with ``r`` records still to place and columns with
``c_j`` records still free, ``N[e, j] ~ Hypergeometric(good=c_j,
bad=sum_{j'>j} c_{j'}, draws=r - sum_{j'<j} N[e, j'])``.  This is the exact
permutation distribution and costs ``K x M`` vectorised hypergeometric draws per
batch of permutations, independent of N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.special import gammaln

from .running import ArrayResult, GroupedCounts, Stat, entropy, safe_div

# --------------------------------------------------------------------------- plug-in quantities


def mutual_information(table: np.ndarray) -> np.ndarray:
    """Plug-in MI (nats) of count tables ``(..., A, B)``; NaN for empty tables.

    ``I = H(A) + H(B) - H(A, B)``.
    """
    t = np.asarray(table, dtype=np.float64)
    lead = t.shape[:-2]
    h_a = entropy(t.sum(axis=-1), axis=-1)
    h_b = entropy(t.sum(axis=-2), axis=-1)
    h_ab = entropy(t.reshape(lead + (-1,)), axis=-1)
    return np.maximum(h_a + h_b - h_ab, 0.0)


def miller_madow_mi(table: np.ndarray) -> np.ndarray:
    """Miller-Madow corrected MI (nats): ``I + ((m_A-1)+(m_B-1)-(m_AB-1)) / (2N)``.

    ``m`` counts non-empty cells of each margin and of the joint table.  Removes
    the first-order bias ``(K-1)(M-1)/(2N)`` of the plug-in estimate; may be
    slightly negative under independence.
    """
    t = np.asarray(table, dtype=np.float64)
    n = t.sum(axis=(-2, -1))
    m_a = (t.sum(axis=-1) > 0).sum(axis=-1)
    m_b = (t.sum(axis=-2) > 0).sum(axis=-1)
    m_ab = (t > 0).sum(axis=(-2, -1))
    return mutual_information(t) + safe_div((m_a - 1) + (m_b - 1) - (m_ab - 1), 2.0 * n)


def conditional_entropy(table: np.ndarray) -> np.ndarray:
    """``H(B | A) = H(A, B) - H(A)`` (nats) from count tables ``(..., A, B)``."""
    t = np.asarray(table, dtype=np.float64)
    lead = t.shape[:-2]
    return entropy(t.reshape(lead + (-1,)), axis=-1) - entropy(t.sum(axis=-1), axis=-1)


def lift_table(table: np.ndarray) -> np.ndarray:
    """Specialization lift ``P(e | y) / P(e) = N_ey N / (N_e N_y)`` for tables ``(..., K, M)``.

    1 means label ``y`` uses expert ``e`` at its overall rate; 3 means three times
    as often.  NaN where the expert or the label never occurs.  Unlike min-max
    normalised heatmaps it keeps imbalance and specialization apart.
    """
    t = np.asarray(table, dtype=np.float64)
    n = t.sum(axis=(-2, -1), keepdims=True)
    n_e = t.sum(axis=-1, keepdims=True)
    n_y = t.sum(axis=-2, keepdims=True)
    return safe_div(t * n, n_e * n_y)


def soft_mutual_information(probs: np.ndarray) -> float:
    """Soft MI between token and expert: ``H(mean_x p(x)) - mean_x H(p(x))`` (nats).

    From gate distributions ``(..., K)``.  It is the MI between the token index
    and an expert drawn from its gate distribution (ModuleFormer's objective):
    0 when every token has the same gate distribution, ``log K`` when every
    token picks one expert surely and experts are used evenly.  Streaming
    version: :class:`probes.stats.routing.GateAccumulator` (``soft_mi``).
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])
    return float(entropy(p.mean(axis=0)) - entropy(p, axis=-1).mean())


# --------------------------------------------------------------------------- null model


_LG_SWITCH = 1.0e4  # log-gamma differences: scipy's gammaln below, Stirling differences above


def _lgamma_diff(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``lgamma(u) - lgamma(v)`` without the cancellation of two ~``u log u`` values.

    Above ``_LG_SWITCH`` it uses Stirling's series in difference form,
    ``(u - 1/2) log1p((u - v) / v) + (u - v) log v - (u - v) + c(u) - c(v)`` with
    ``c(z) = 1/(12 z) - 1/(360 z^3) + 1/(1260 z^5)`` (truncation error < 1e-24 there).
    """
    big = np.minimum(u, v) >= _LG_SWITCH
    out = np.empty(np.broadcast(u, v).shape)
    if not big.all():
        us, vs = np.where(big, 1.0, u), np.where(big, 1.0, v)
        out[...] = gammaln(us) - gammaln(vs)
    if big.any():
        ub, vb = np.where(big, u, _LG_SWITCH), np.where(big, v, _LG_SWITCH)
        d = ub - vb
        iu, iv = 1.0 / ub, 1.0 / vb
        cu = iu * (1.0 / 12.0 - iu * iu * (1.0 / 360.0 - iu * iu / 1260.0))
        cv = iv * (1.0 / 12.0 - iv * iv * (1.0 / 360.0 - iv * iv / 1260.0))
        st = (ub - 0.5) * np.log1p(d / vb) + d * np.log(vb) - d + (cu - cv)
        out = np.where(big, st, out)
    return out


def _emi_cells(nf, A, B, lo, hi, h, mode, width) -> float:
    """``sum_cells E[n log(N n / (a b))]`` over a group of cells (see expected_mutual_information)."""
    k = lo[:, None] + h[:, None] * np.arange(width, dtype=np.float64)[None, :]  # (cells, width)
    valid = k <= hi[:, None]
    k = np.where(valid, k, mode[:, None])
    Ac, Bc, m = A[:, None], B[:, None], mode[:, None]
    C = nf - Ac - Bc
    # log P(k) - log P(mode) = -[lg(k+1) + lg(A-k+1) + lg(B-k+1) + lg(C+k+1)] + same at the mode
    logw = -(_lgamma_diff(k + 1.0, m + 1.0) + _lgamma_diff(Ac - k + 1.0, Ac - m + 1.0)
             + _lgamma_diff(Bc - k + 1.0, Bc - m + 1.0) + _lgamma_diff(C + k + 1.0, C + m + 1.0))
    w = np.where(valid, np.exp(np.minimum(logw, 700.0)), 0.0)
    f = k * np.log(nf * np.maximum(k, 1.0) / (Ac * Bc))  # 0 at k = 0
    return float(np.sum((w * f).sum(axis=1) / w.sum(axis=1)))


def expected_mutual_information(
    row_sums: np.ndarray, col_sums: np.ndarray, n_sd: float = 12.0, points_per_sd: float = 4.0,
    min_sd_stride: float = 32.0,
) -> float:
    """Expected plug-in MI (nats) under the fixed-margin (hypergeometric) null.

    ``E[I] = sum_{i,j} sum_n (n/N) log(N n / (a_i b_j)) P_hyper(n; N, a_i, b_j)``
    (Vinh et al. 2010).  The inner sum runs over ``mean +- n_sd`` standard
    deviations of each hypergeometric (clipped to its support); the omitted tail
    mass is negligible (a Gaussian tail at 12 sd is ~1e-33), so the result
    matches the exact sum (checked against sklearn in the tests).

    All cells are evaluated at once.  The pmf is taken relative to the cell's
    mode, ``log P(n) - log P(mode)`` from log-gamma *differences* (accurate for
    any N, see :func:`_lgamma_diff`), and normalised over the window.  Cells whose
    standard deviation is at least ``min_sd_stride`` (and whose window is inside
    the support) are summed on every ``h``-th integer, ``h = floor(sd /
    points_per_sd)``: the summand is a smooth, Gaussian-like function of n, for
    which the strided (trapezoid) sum equals the full integer sum up to
    ``~exp(-2 pi^2 points_per_sd^2) ~ 1e-137`` (Poisson summation), so the cost per
    cell is bounded (~100 terms) instead of growing like sqrt(N).  Small cells use
    every integer of the window.
    """
    a = np.asarray(row_sums, dtype=np.int64)
    b = np.asarray(col_sums, dtype=np.int64)
    a = a[a > 0]
    b = b[b > 0]
    n = int(a.sum())
    if n <= 1:
        return 0.0
    nf = float(n)
    A = np.repeat(a, len(b)).astype(np.float64)  # cells (i, j), row-major
    B = np.tile(b, len(a)).astype(np.float64)
    mu = A * B / nf
    sd = np.sqrt((A / nf) * (B / nf) * (nf - A) * (nf - B) / (nf - 1.0))
    s_lo = np.maximum(A + B - nf, 0.0)  # support (k = 0 carries probability, not MI)
    s_hi = np.minimum(A, B)
    lo = np.maximum(s_lo, np.floor(mu - n_sd * sd))
    hi = np.minimum(s_hi, np.ceil(mu + n_sd * sd))
    inside = (lo > s_lo) & (hi < s_hi)
    h = np.where(inside & (sd >= min_sd_stride), np.maximum(np.floor(sd / points_per_sd), 1.0), 1.0)
    mode = np.clip(np.floor((A + 1.0) * (B + 1.0) / (nf + 2.0)), lo, hi)
    lo = mode - h * np.floor((mode - lo) / h)  # grid through the mode
    steps = np.floor((hi - lo) / h)
    emi = 0.0
    # cells in groups of similar window length (few padded terms)
    order = np.argsort(steps, kind="stable")
    for part in np.array_split(order, max(1, min(len(order), 4))):
        if part.size == 0:
            continue
        emi += _emi_cells(nf, A[part], B[part], lo[part], hi[part], h[part], mode[part], int(steps[part].max()) + 1)
    emi /= nf
    return max(emi, 0.0)


def sample_null_tables(
    row_sums: np.ndarray, col_sums: np.ndarray, n_tables: int, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """Draw ``n_tables`` contingency tables with the given margins, uniformly over
    label permutations (exact multivariate-hypergeometric sampling, see module doc).

    ``row_sums`` ``(..., K)`` and ``col_sums`` ``(..., M)`` may carry leading group
    axes (same total per group): the tables of every group are drawn together, one
    vectorised hypergeometric draw per cell over all groups and tables.

    Returns an ``int64`` array ``(n_tables, K, M)``, or ``group + (n_tables, K, M)``.
    """
    rng = np.random.default_rng(rng)
    rows = np.asarray(row_sums, dtype=np.int64)
    cols = np.asarray(col_sums, dtype=np.int64)
    lead = rows.shape[:-1]
    if cols.shape[:-1] != lead:
        raise ValueError("margins must have the same group shape")
    if (rows.sum(axis=-1) != cols.sum(axis=-1)).any():
        raise ValueError("margins must have the same total")
    k, m = rows.shape[-1], cols.shape[-1]
    rows2 = rows.reshape(-1, k)
    cols2 = cols.reshape(-1, m)
    g = rows2.shape[0]
    out = np.zeros((g, n_tables, k, m), dtype=np.int64)
    # records still free in each column, and in the columns after j (suffix sums)
    free = np.broadcast_to(cols2[:, None, :], (g, n_tables, m)).copy()
    for i in range(k):
        if i == k - 1:  # the last row takes what is left
            out[:, :, i, :] = free
            break
        if not rows2[:, i].any():
            continue
        left = np.broadcast_to(rows2[:, i, None], (g, n_tables)).copy()  # records of row i still to place
        rest = free.sum(axis=2)  # free records in columns j..m-1
        for j in range(m - 1):
            rest -= free[:, :, j]  # now: free records in columns j+1..m-1
            x = rng.hypergeometric(free[:, :, j], rest, left)
            out[:, :, i, j] = x
            free[:, :, j] -= x
            left -= x
        out[:, :, i, m - 1] = left
        free[:, :, m - 1] -= left
    return out.reshape(lead + (n_tables, k, m))


# --------------------------------------------------------------------------- summary


@dataclass
class MIResult(ArrayResult):
    """MI summary for one or more tables (fields have the group shape), nats unless noted.

    mi:            plug-in estimate.
    mi_mm:         Miller-Madow corrected.
    mi_corrected:  plug-in minus the permutation-null mean (NaN if n_perm == 0).
    null_mean, null_std: mean and std of the null MI (NaN if n_perm == 0).
    p_value:       permutation p-value (1 + #null >= observed) / (1 + n_perm).
    emi:           analytic expected MI under the fixed-margin null.
    ami:           adjusted MI (I - EMI) / (mean(H_E, H_Y) - EMI), as sklearn's default.
    nmi:           I / mean(H_E, H_Y) (normalised, not chance-corrected).
    h_e, h_y:      plug-in entropies of the expert and of the label.
    mi_bits:       plug-in MI in bits.
    n:             records in the table.
    """

    mi: np.ndarray
    mi_mm: np.ndarray
    mi_corrected: np.ndarray
    null_mean: np.ndarray
    null_std: np.ndarray
    p_value: np.ndarray
    emi: np.ndarray
    ami: np.ndarray
    nmi: np.ndarray
    h_e: np.ndarray
    h_y: np.ndarray
    mi_bits: np.ndarray
    n: np.ndarray


def mi_summary(
    table: np.ndarray, n_perm: int = 199, seed: int | None = 0, analytic_emi: bool = True
) -> MIResult:
    """All MI estimators for count tables ``(..., K, M)`` (see :class:`MIResult`).

    ``n_perm`` null tables per group are drawn with fixed margins (0 skips the
    permutation test).  ``analytic_emi=False`` skips the expected MI (and AMI),
    which costs ``O(K M)`` small hypergeometric sums per group.
    """
    t = np.asarray(table, dtype=np.int64)
    lead = t.shape[:-2]
    flat = t.reshape((-1,) + t.shape[-2:])
    rng = np.random.default_rng(seed)
    mi = mutual_information(flat)
    mm = miller_madow_mi(flat)
    h_e = entropy(flat.sum(axis=-1), axis=-1)
    h_y = entropy(flat.sum(axis=-2), axis=-1)
    g = flat.shape[0]
    null_mean = np.full(g, np.nan)
    null_std = np.full(g, np.nan)
    pval = np.full(g, np.nan)
    emi = np.full(g, np.nan)
    rows_all, cols_all = flat.sum(axis=2), flat.sum(axis=1)
    live = np.flatnonzero(rows_all.sum(axis=1) > 0)
    if n_perm > 0 and live.size:
        # all groups' null tables in one vectorised draw
        null = mutual_information(sample_null_tables(rows_all[live], cols_all[live], n_perm, rng))  # (g', n_perm)
        null_mean[live] = null.mean(axis=1)
        null_std[live] = null.std(axis=1, ddof=1) if n_perm > 1 else 0.0
        # tolerance so that tables with the same MI up to rounding count as ties
        obs = mi[live]
        pval[live] = (1 + np.sum(null >= (obs - 1e-12 * np.maximum(1.0, obs))[:, None], axis=1)) / (1 + n_perm)
    if analytic_emi:
        memo: dict[bytes, float] = {}  # identical margins (e.g. repeated tables) computed once
        for i in live.tolist():
            key = rows_all[i].tobytes() + b"|" + cols_all[i].tobytes()
            if key not in memo:
                memo[key] = expected_mutual_information(rows_all[i], cols_all[i])
            emi[i] = memo[key]
    avg_h = 0.5 * (h_e + h_y)
    den = avg_h - emi
    den = np.where(den < 0, np.minimum(den, -np.finfo(float).eps), np.maximum(den, np.finfo(float).eps))
    ami = np.where(avg_h == 0, 1.0, (mi - emi) / den)  # both constant: identical partitions
    nmi = np.where(avg_h > 0, safe_div(mi, avg_h), 1.0)
    shape = lambda x: np.asarray(x).reshape(lead)
    return MIResult(
        mi=shape(mi),
        mi_mm=shape(mm),
        mi_corrected=shape(mi - null_mean),
        null_mean=shape(null_mean),
        null_std=shape(null_std),
        p_value=shape(pval),
        emi=shape(emi),
        ami=shape(ami),
        nmi=shape(nmi),
        h_e=shape(h_e),
        h_y=shape(h_y),
        mi_bits=shape(mi / np.log(2.0)),
        n=shape(flat.sum(axis=(-2, -1))),
    )


class ContingencyAccumulator(Stat):
    """Streaming expert x label count table (optionally per group).

    >>> acc = ContingencyAccumulator(n_experts=8, n_labels=10, group_shape=(n_layers,))
    >>> for ids, labels, layer in chunks: acc.update(ids, labels, layer)
    >>> acc.result(n_perm=199)   # MIResult per layer
    >>> acc.lift()               # P(e|y)/P(e) per layer, shape (n_layers, 8, 10)
    """

    def __init__(self, n_experts: int, n_labels: int, group_shape: Sequence[int] = ()) -> None:
        self.counts = GroupedCounts((n_experts, n_labels), group_shape)

    def update(self, ids: np.ndarray, labels: np.ndarray, *groups: np.ndarray | int) -> None:
        """Fold in expert ids and labels (broadcastable to each other), one group array per axis."""
        self.counts.update([ids, labels], groups)

    def add_counts(self, counts: np.ndarray, at: tuple | None = None) -> None:
        """Fold in pre-counted records (see :meth:`GroupedCounts.add_counts`), e.g. a chunk
        whose label is one value: ``acc.add_counts(expert_counts, at=(..., slice(None), label))``."""
        self.counts.add_counts(counts, at)

    def table(self) -> np.ndarray:
        """Counts ``group_shape + (K, M)``."""
        return self.counts.result()

    def lift(self) -> np.ndarray:
        return lift_table(self.table())

    def result(self, n_perm: int = 199, seed: int | None = 0, analytic_emi: bool = True) -> MIResult:
        return mi_summary(self.table(), n_perm=n_perm, seed=seed, analytic_emi=analytic_emi)

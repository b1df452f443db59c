"""Known-answer tests for probes.stats: each fails if the statistic is computed wrongly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.linalg import subspace_angles
from sklearn.metrics import adjusted_mutual_info_score

from probes.stats import (
    TRAJECTORY_LABELS,
    AgreementAccumulator,
    AgreementCounts,
    ContingencyAccumulator,
    ConvergenceAccumulator,
    EffectAccumulator,
    GateAccumulator,
    GroupedCounts,
    LoadAccumulator,
    SpatialCoherenceAccumulator,
    TransitionAccumulator,
    agreement_stats,
    balance_monitor,
    convergence_metrics,
    effect_summary,
    expected_mutual_information,
    lift_table,
    linear_probe,
    load_stats,
    mi_summary,
    pca,
    routing_agreement,
    sample_null_tables,
    sampling_disagreement,
    soft_mutual_information,
    softmax,
    top1_margin,
    z_loss,
)


def noisy_channel_mi(k: int, eps: float) -> float:
    """I(E;Y) for Y uniform on k, E = Y w.p. 1-eps else uniform on k (nats)."""
    a = 1 - eps + eps / k
    b = eps / k
    return np.log(k) + a * np.log(a) + (k - 1) * b * np.log(b)


def noisy_channel_chunks(n: int, chunk: int, k: int, eps: float, rng: np.random.Generator):
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        y = rng.integers(0, k, m, dtype=np.uint8)
        e = np.where(rng.random(m) < eps, rng.integers(0, k, m, dtype=np.uint8), y)
        yield e, y


# ---------------------------------------------------------------- mutual information


def test_noisy_channel_mi_streamed_within_1pct():
    truth = noisy_channel_mi(4, 0.5)
    assert truth == pytest.approx(0.3128, abs=5e-5)
    acc = ContingencyAccumulator(4, 4)
    for e, y in noisy_channel_chunks(1_000_000, 100_000, 4, 0.5, np.random.default_rng(1)):
        acc.update(e, y)
    r = acc.result(n_perm=20)
    assert r.n == 1_000_000
    assert abs(r.mi - truth) / truth < 0.01
    assert abs(r.mi_mm - truth) / truth < 0.01
    assert abs(r.mi_corrected - truth) / truth < 0.01
    assert r.mi_bits == pytest.approx(0.4512, rel=0.01)
    assert r.p_value == pytest.approx(1 / 21)  # no null table comes near
    # lift: P(e=y|y)/P(e) = (0.5 + 0.5/4) / (1/4) = 2.5 on the diagonal, 0.5 off it
    lift = acc.lift()
    assert np.allclose(np.diag(lift), 2.5, atol=0.03)
    assert np.allclose(lift[~np.eye(4, dtype=bool)], 0.5, atol=0.03)


def test_independent_labels_corrected_mi_near_zero():
    k, m, n = 8, 5, 1_000_000
    rng = np.random.default_rng(2)
    acc = ContingencyAccumulator(k, m)
    for start in range(0, n, 250_000):
        acc.update(rng.integers(0, k, 250_000), rng.integers(0, m, 250_000))
    r = acc.result(n_perm=50)
    bias = (k - 1) * (m - 1) / (2 * n)  # E[plug-in] under independence
    sd = np.sqrt(2 * (k - 1) * (m - 1)) / (2 * n)  # 2N I ~ chi2((k-1)(m-1))
    assert abs(r.mi - bias) < 5 * sd
    assert abs(r.mi_mm) < 5 * sd
    assert abs(r.mi_corrected) < 5 * sd
    assert r.null_mean == pytest.approx(bias, abs=2 * sd)
    assert r.emi == pytest.approx(bias, rel=0.02)
    assert abs(r.ami) < 1e-4


def test_permutation_pvalues_uniform_under_independence():
    rng = np.random.default_rng(3)
    tables = np.stack(
        [np.histogram2d(rng.integers(0, 4, 400), rng.integers(0, 3, 400), bins=(4, 3), range=((0, 4), (0, 3)))[0]
         for _ in range(120)]
    ).astype(np.int64)
    r = mi_summary(tables, n_perm=99, seed=4, analytic_emi=False)
    p = r.p_value
    assert p.shape == (120,)
    assert np.mean(p <= 0.05) < 0.13
    assert 0.4 < p.mean() < 0.6
    assert sps.kstest(p, "uniform").pvalue > 0.001
    # a dependent table must be significant
    dep = np.array([[50, 5, 5], [5, 50, 5], [5, 5, 50]])
    assert mi_summary(dep, n_perm=99).p_value == pytest.approx(0.01)


def test_null_tables_keep_margins_and_have_hypergeometric_mean():
    rows, cols = np.array([30, 0, 50, 20]), np.array([10, 60, 30])
    t = sample_null_tables(rows, cols, 4000, rng=5)
    assert (t.sum(axis=2) == rows).all() and (t.sum(axis=1) == cols).all()
    expected = np.outer(rows, cols) / rows.sum()
    assert np.allclose(t.mean(axis=0), expected, atol=0.25)


def test_analytic_ami_matches_sklearn():
    rng = np.random.default_rng(6)
    e = rng.integers(0, 5, 300)
    y = np.where(rng.random(300) < 0.3, e % 3, rng.integers(0, 3, 300))
    acc = ContingencyAccumulator(5, 3)
    acc.update(e, y)
    r = acc.result(n_perm=0)
    assert r.ami == pytest.approx(adjusted_mutual_info_score(y, e), abs=1e-7)
    table = acc.table()
    assert expected_mutual_information(table.sum(1), table.sum(0)) == pytest.approx(r.emi)


def test_expected_mi_matches_sklearn_and_exact_sum():
    """The log-gamma EMI equals sklearn's EMI (1e-9) and the exact full-support sum with
    scipy's hypergeometric pmf, also for large N where the +-12 sd window is used."""
    from sklearn.metrics.cluster._expected_mutual_info_fast import expected_mutual_information as sk_emi

    rng = np.random.default_rng(11)
    for n, k, m in [(2, 2, 2), (50, 3, 7), (300, 5, 3), (2000, 8, 16)]:
        e, y = rng.integers(0, k, n), rng.integers(0, m, n)
        table = np.zeros((k, m), np.int64)
        np.add.at(table, (e, y), 1)
        got = expected_mutual_information(table.sum(1), table.sum(0))
        assert got == pytest.approx(sk_emi(table[table.sum(1) > 0][:, table.sum(0) > 0], n), rel=1e-9, abs=1e-12)
    rows, cols = np.array([400_000, 250_000, 0, 350_000]), np.array([600_000, 400_000])
    n = int(rows.sum())
    exact = 0.0
    for a in rows[rows > 0]:
        for b in cols:
            nij = np.arange(max(1, a + b - n), min(a, b) + 1)
            pmf = sps.hypergeom.pmf(nij, n, a, b)
            exact += float(np.sum(pmf * nij / n * np.log(n * nij / (float(a) * float(b)))))
    assert expected_mutual_information(rows, cols) == pytest.approx(exact, rel=1e-6)
    assert exact == pytest.approx((len(rows) - 2) * (len(cols) - 1) / (2 * n), rel=1e-3)  # ~ (K-1)(M-1)/2N


def test_lift_and_soft_mi():
    table = np.array([[30, 10], [10, 50]])
    lift = lift_table(table)
    assert lift[0, 0] == pytest.approx((30 / 40) / (40 / 100))
    # soft MI: every token sure of one expert, experts even -> log K; identical gates -> 0
    k = 4
    sure = np.eye(k)[np.arange(1000) % k]
    assert soft_mutual_information(sure) == pytest.approx(np.log(k))
    same = np.tile(softmax(np.array([1.0, 0.0, -1.0, 2.0])), (50, 1))
    assert soft_mutual_information(same) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- load and router


def test_load_closed_forms_uniform_and_collapse():
    u = load_stats(np.full(8, 100))
    assert u.cv == pytest.approx(0) and u.norm_entropy == pytest.approx(1) and u.max_vio == pytest.approx(0)
    assert u.effective_experts == pytest.approx(8) and u.n_dead == 0
    assert balance_monitor(u.share, np.full(8, 1 / 8)) == pytest.approx(1)
    c = load_stats(np.array([800, 0, 0, 0, 0, 0, 0, 0]))
    assert c.cv == pytest.approx(np.sqrt(7))
    assert c.norm_entropy == pytest.approx(0) and c.max_vio == pytest.approx(7)
    assert c.effective_experts == pytest.approx(1) and c.n_dead == 7
    assert balance_monitor(c.share, np.eye(8)[0]) == pytest.approx(8)
    assert np.allclose(c.utilisation, [8, 0, 0, 0, 0, 0, 0, 0])


def test_load_accumulator_groups_and_marginals_agree_with_ids():
    rng = np.random.default_rng(7)
    n_layers, n_steps, n_tb, k = 2, 3, 4, 6
    acc = LoadAccumulator(k, (n_layers, n_steps, n_tb), ("layer", "step", "tbin"))
    all_ids, all_keys = [], []
    for _ in range(3):
        ids = rng.integers(0, k, (10, n_layers, n_steps, 16)).astype(np.uint8)
        tb = rng.integers(0, n_tb, (10, 1, 1, 1))
        layer = np.arange(n_layers).reshape(1, -1, 1, 1)
        step = np.arange(n_steps).reshape(1, 1, -1, 1)
        acc.update(ids, layer, step, tb)
        all_ids.append(ids)
        all_keys.append(np.broadcast_to(tb, ids.shape))
    ids = np.concatenate(all_ids)
    tb = np.concatenate(all_keys)
    full = acc.table()
    assert full.sum() == ids.size
    # counts agree with the ids, cell by cell
    for lay in range(n_layers):
        for st in range(n_steps):
            for t in range(n_tb):
                sel = ids[:, lay, st][tb[:, lay, st] == t]
                assert (full[lay, st, t] == np.bincount(sel, minlength=k)).all()
    per_layer = acc.result(keep=("layer",))
    assert per_layer.share.shape == (n_layers, k)
    assert np.allclose(per_layer.share.sum(-1), 1)
    assert np.allclose(acc.result(keep=()).share, np.bincount(ids.ravel(), minlength=k) / ids.size)


def test_gate_accumulator_monitors():
    rng = np.random.default_rng(8)
    k, n = 4, 20000
    logits = rng.normal(0, 1.5, (n, k))
    p = softmax(logits)
    # Gumbel-max sample = sample from softmax(logits)
    sampled = np.argmax(logits + rng.gumbel(size=logits.shape), axis=-1)
    group = (np.arange(n) % 2)
    acc = GateAccumulator(k, (2,))
    for sl in np.array_split(np.arange(n), 4):
        acc.update(logits=logits[sl], ids=sampled[sl], groups=(group[sl],))
    r = acc.result()
    g0 = group == 0
    h = -(p * np.log(p)).sum(-1)
    assert r.mean_entropy[0] == pytest.approx(h[g0].mean())
    assert r.mean_margin[1] == pytest.approx(top1_margin(p[~g0]).mean())
    assert r.gate_mass[0] == pytest.approx(p[g0].mean(0))
    assert r.z_loss[0] == pytest.approx(z_loss(logits[g0]))
    assert r.disagreement[1] == pytest.approx(sampling_disagreement(sampled[~g0], p[~g0]))
    # expected disagreement of a sample from p with argmax p is 1 - E[max p]
    assert r.disagreement[0] == pytest.approx(1 - p[g0].max(1).mean(), abs=0.015)
    f = np.bincount(sampled[g0], minlength=k) / g0.sum()
    assert r.balance[0] == pytest.approx(k * np.sum(f * p[g0].mean(0)))
    assert r.soft_mi[0] == pytest.approx(soft_mutual_information(p[g0]))
    # uniform router: balance 1, entropy log K, margin 0, z-loss log(K)^2 for zero logits
    u = GateAccumulator(k)
    u.update(logits=np.zeros((100, k)), ids=np.arange(100) % k)
    ru = u.result()
    assert ru.balance == pytest.approx(1) and ru.mean_norm_entropy == pytest.approx(1)
    assert ru.z_loss == pytest.approx(np.log(k) ** 2) and ru.mean_margin == pytest.approx(0)


# ---------------------------------------------------------------- transitions, spatial, stability


def test_gate_and_spatial_marginals_equal_pooled_accumulation():
    """result(keep=...) of the gate and spatial accumulators equals accumulating with the
    coarser grouping directly (pooled sums, not averaged group means)."""
    rng = np.random.default_rng(21)
    k, h, w = 4, 4, 5
    fine_g = GateAccumulator(k, (2, 3), ("layer", "bin"))
    layer_g, glob_g = GateAccumulator(k, (2,)), GateAccumulator(k)
    fine_s = SpatialCoherenceAccumulator(k, (h, w), (2, 3), ("layer", "bin"))
    bin_s, glob_s = SpatialCoherenceAccumulator(k, (h, w), (3,)), SpatialCoherenceAccumulator(k, (h, w))
    for _ in range(6):
        n = int(rng.integers(5, 40))
        p = softmax(rng.normal(size=(n, k)) * 2)
        ids = np.array([rng.choice(k, p=q) for q in p])
        lay, b = rng.integers(0, 2, n), rng.integers(0, 3, n)
        fine_g.update(probs=p, ids=ids, groups=(lay, b))
        layer_g.update(probs=p, ids=ids, groups=(lay,))
        glob_g.update(probs=p, ids=ids)
        maps = rng.integers(0, k, (3, h * w))
        ml, mb = rng.integers(0, 2, 3), rng.integers(0, 3, 3)
        fine_s.update(maps, ml, mb)
        bin_s.update(maps, mb)
        glob_s.update(maps)
    for got, want in [(fine_g.result(keep=("layer",)), layer_g.result()), (fine_g.result(keep=()), glob_g.result())]:
        for f in ("gate_mass", "load_share", "mean_entropy", "mean_margin", "balance", "disagreement", "soft_mi", "n"):
            np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-12, atol=1e-12)
    assert fine_g.result(keep=("layer", "bin")).n.shape == (2, 3) == fine_g.result().n.shape
    for got, want in [(fine_s.result(keep=("bin",)), bin_s.result()), (fine_s.result(keep=()), glob_s.result())]:
        for f in ("same", "same_h", "same_v", "chance", "lift", "kappa", "n_pairs"):
            np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown group axis"):
        fine_g.result(keep=("step",))
    with pytest.raises(ValueError):
        GateAccumulator(k, (2,), ("a", "b"))
    # pre-counted expert counts give the same state as counting the maps
    maps = rng.integers(0, k, (2, 3, h * w))
    a = SpatialCoherenceAccumulator(k, (h, w), (2, 3))
    b = SpatialCoherenceAccumulator(k, (h, w), (2, 3))
    lg, sg = np.arange(2).reshape(-1, 1), np.arange(3).reshape(1, -1)
    a.update(maps, lg, sg)
    b.update(maps, lg, sg, expert_counts=(maps[..., None] == np.arange(k)).sum(-2))
    for f in ("same", "chance", "kappa", "n_pairs"):
        np.testing.assert_array_equal(getattr(a.result(), f), getattr(b.result(), f))


def test_add_counts_at_a_block_equals_counting_records():
    """Folding a chunk whose label is one value from its expert counts (add_counts(at=...))
    gives the same table as counting its records."""
    rng = np.random.default_rng(22)
    k, m = 5, 3
    a, b = ContingencyAccumulator(k, m, (2, 4)), ContingencyAccumulator(k, m, (2, 4))
    for _ in range(5):
        ids = rng.integers(0, k, (2, 50))
        label, grp = int(rng.integers(0, m)), int(rng.integers(0, 4))
        a.update(ids, label, np.arange(2).reshape(-1, 1), grp)
        per = (ids[..., None] == np.arange(k)).sum(-2)  # (2, K)
        b.add_counts(per, at=(slice(None), grp, slice(None), label))
    np.testing.assert_array_equal(a.table(), b.table())
    with pytest.raises(ValueError):
        b.add_counts(np.ones((2, k)) * 0.5, at=(slice(None), 0, slice(None), 0))


def test_markov_chain_transitions_recovered():
    rng = np.random.default_rng(9)
    T = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.05, 0.05, 0.8, 0.1], [0.25, 0.25, 0.25, 0.25]])
    k, L, n = 4, 5, 40_000
    w, v = np.linalg.eig(T.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi /= pi.sum()
    ids = np.empty((n, L), dtype=np.uint8)
    ids[:, 0] = rng.choice(k, n, p=pi)
    cum = np.cumsum(T, axis=1)
    for l in range(1, L):
        u = rng.random(n)
        ids[:, l] = (u[:, None] > cum[ids[:, l - 1]]).sum(1)
    acc = TransitionAccumulator(k, (L - 1,))
    for sl in np.array_split(np.arange(n), 3):
        # (rows, L, tokens=1): the step axis is 1
        acc.update_steps(ids[sl][:, :, None], 1)
    joint = acc.table().sum(0)
    r = acc.result()
    pooled = joint / joint.sum(1, keepdims=True)
    se = np.sqrt(T * (1 - T) / joint.sum(1, keepdims=True))
    assert (np.abs(pooled - T) < 5 * se).all()
    for l in range(L - 1):  # each step separately, too
        se_l = np.sqrt(T * (1 - T) / acc.table()[l].sum(1, keepdims=True))
        assert (np.abs(r.matrix[l] - T) < 5 * se_l).all()
    h_cond = -np.sum(pi[:, None] * T * np.log(T))
    assert np.allclose(r.cond_entropy, h_cond, atol=0.01)
    assert np.allclose(r.persistence, np.sum(pi * np.diag(T)), atol=0.01)
    assert np.allclose(r.chance, np.sum(pi**2), atol=0.01)
    # independent steps: persistence at chance, conditional entropy = marginal entropy
    ind = TransitionAccumulator(k)
    a, b = rng.integers(0, k, 50_000), rng.integers(0, k, 50_000)
    ind.update(a, b)
    ri = ind.result()
    assert ri.persistence == pytest.approx(ri.chance, abs=0.01)
    assert ri.cond_entropy == pytest.approx(np.log(k), abs=0.01)


def test_spatial_coherence_known_maps():
    h, w, k = 8, 6, 4
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    checker = ((rr + cc) % 2).astype(np.uint8)
    const = np.full((h, w), 3, dtype=np.uint8)
    rng = np.random.default_rng(10)
    rand = rng.integers(0, k, (2000, h * w)).astype(np.uint8)  # flat token order
    acc = SpatialCoherenceAccumulator(k, (h, w), (3,))
    acc.update(np.stack([checker, checker]), np.array([0, 0]))
    acc.update(const[None], 1)
    acc.update(rand, 2)
    r = acc.result()
    assert r.same[0] == 0 and r.chance[0] == pytest.approx(0.5) and r.kappa[0] == pytest.approx(-1)
    assert r.same[1] == 1 and r.same_h[1] == 1 and r.same_v[1] == 1
    n_pairs = 2000 * (h * (w - 1) + (h - 1) * w)
    assert r.n_pairs[2] == n_pairs
    assert abs(r.same[2] - r.chance[2]) < 5 * np.sqrt(0.25 * 0.75 / n_pairs)
    # a map made of horizontal stripes: all horizontal pairs same, no vertical pair same
    stripes = (rr % 2).astype(np.uint8)
    s = SpatialCoherenceAccumulator(2, (h, w))
    s.update(stripes)
    rs = s.result()
    assert rs.same_h == 1 and rs.same_v == 0


def test_routing_stability_kappa():
    rng = np.random.default_rng(11)
    k, n = 8, 200_000
    a = rng.integers(0, k, n)
    b = np.where(rng.random(n) < 0.6, a, rng.integers(0, k, n))
    acc = AgreementAccumulator(k)
    for sl in np.array_split(np.arange(n), 4):
        acc.update(a[sl], b[sl])
    r = acc.result()
    # agreement = 0.6 + 0.4/k; chance = 1/k; kappa = 0.6
    assert r.agreement == pytest.approx(0.6 + 0.4 / k, abs=0.005)
    assert r.chance == pytest.approx(1 / k, abs=0.002)
    assert r.kappa == pytest.approx(0.6, abs=0.006)
    assert routing_agreement(a, a, k).kappa == pytest.approx(1)
    assert abs(routing_agreement(a, rng.integers(0, k, n), k).kappa) < 0.01


def test_agreement_from_the_trace_and_margins_equals_the_whole_table():
    """The stream's agreement (same-expert pairs and the two routings' counts, AgreementCounts)
    gives the figures of the K x K table, per group and pooled, folded in blocks or as tables."""
    rng = np.random.default_rng(13)
    k, groups = 6, (3, 2)
    a = rng.integers(0, k, (3, 2, 500))
    b = np.where(rng.random(a.shape) < 0.5, a, rng.integers(0, k, a.shape))
    b[0, 0] = 0  # a collapsed routing: kappa against chance 1/k of a
    table = np.zeros(groups + (k, k), np.int64)
    np.add.at(table, (np.arange(3)[:, None, None], np.arange(2)[None, :, None], a, b), 1)
    counts = AgreementCounts(k, groups)
    onehot = lambda x: (x[..., None] == np.arange(k)).sum(axis=-2)
    for half in (slice(0, 250), slice(250, 500)):
        x, y = a[..., half], b[..., half]
        counts.add((x == y).sum(axis=-1), onehot(x), onehot(y))
    from_table = AgreementCounts(k, groups)
    from_table.add_table(table[:, 0], at=(slice(None), 0))
    from_table.add_table(table[:, 1], at=(slice(None), 1))
    want, pooled = agreement_stats(table), agreement_stats(table.sum(axis=1))
    for acc in (counts, from_table):
        got = acc.result()
        for field in ("agreement", "chance", "kappa", "n"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field
            assert np.array_equal(getattr(acc.summed((1,)), field), getattr(pooled, field)), field
        assert got.confusion is None


def test_grouped_counts_streaming_equals_one_shot():
    rng = np.random.default_rng(12)
    v = rng.integers(0, 5, (40, 7))
    g = rng.integers(0, 3, (40, 1))
    one = GroupedCounts((5,), (3,))
    one.update([v], [g])
    two = GroupedCounts((5,), (3,))
    two.update([v[:13]], [g[:13]])
    part = GroupedCounts((5,), (3,))
    part.update([v[13:]], [g[13:]])
    two.merge(part)
    assert (one.result() == two.result()).all()
    with pytest.raises(ValueError):
        one.update([np.array([5])], [np.array([0])])


def _split_feeds(rng: np.random.Generator):
    """(fresh accumulator, feed(acc, chunk index)) for every accumulator of probes.stats."""
    k = 4
    ids = rng.integers(0, k, (2, 3, 16))
    other = np.where(rng.random(ids.shape) < 0.3, rng.integers(0, k, ids.shape), ids)
    probs = softmax(rng.normal(size=ids.shape + (k,)))
    lat = rng.normal(size=(2, 6, 5, 8))
    y, z = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5, 3))
    layer = np.arange(2).reshape(-1, 1, 1)
    return [
        (lambda: LoadAccumulator(k, (2,)), lambda a, i: a.update(ids[i], 0)),
        (lambda: ContingencyAccumulator(k, 3, (2,)), lambda a, i: a.update(ids[i], ids[i] % 3, 1)),
        (lambda: AgreementAccumulator(k, (2,)), lambda a, i: a.update(ids[i], other[i], 0)),
        (lambda: TransitionAccumulator(k), lambda a, i: a.update(ids[i, :-1], ids[i, 1:])),
        (lambda: GateAccumulator(k, (2,)), lambda a, i: a.update(probs=probs[i], ids=ids[i], groups=(layer[i],))),
        (lambda: SpatialCoherenceAccumulator(k, (4, 4)), lambda a, i: a.update(ids[i])),
        (lambda: ConvergenceAccumulator(5, (2,)), lambda a, i: a.update(lat[i], 1)),
        (lambda: EffectAccumulator(), lambda a, i: a.update(y[i], z[i])),
    ]


def _same(a, b) -> bool:
    a, b = (x.to_dict() if hasattr(x, "to_dict") else {"v": np.asarray(x).tolist()} for x in (a, b))
    return all(np.allclose(np.asarray(a[f], float), np.asarray(b[f], float), equal_nan=True) for f in a)


@pytest.mark.parametrize("case", range(8))
def test_every_accumulator_has_the_stat_contract(case):
    """update / merge / result / state_dict / load_state_dict: two halves merged, or a state
    saved and loaded into a fresh accumulator, give the statistics of one pass."""
    make, feed = _split_feeds(np.random.default_rng(case))[case]
    whole, first, second, restored = make(), make(), make(), make()
    for i in range(2):
        feed(whole, i)
    feed(first, 0)
    feed(second, 1)
    first.merge(second)
    assert _same(whole.result(), first.result())
    restored.load_state_dict(whole.state_dict())
    assert _same(whole.result(), restored.result())
    with pytest.raises(ValueError):
        restored.merge(object())


# ---------------------------------------------------------------- latent dynamics


def spiral(rho: float, theta: float, d: int = 32, L: int = 10, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """s_{l+1} = s* + rho R(theta) (s_l - s*) in a random 2-plane of R^d."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, 2)))
    s_star = rng.normal(size=d) * 3
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    z = np.array([1.5, -0.5])
    traj = []
    for _ in range(L):
        traj.append(s_star + basis @ z)
        z = rho * R @ z
    out = np.array(traj)
    return out + noise * rng.normal(size=out.shape)


def test_latent_dynamics_rho_cosine_and_labels():
    fixed = spiral(0.6, 0.4, seed=1)
    orbit = spiral(1.0, 0.7, seed=2)
    v = np.random.default_rng(3).normal(size=32)
    drift = np.cumsum(np.tile(v, (10, 1)), axis=0) + np.random.default_rng(4).normal(size=32)
    m = convergence_metrics(np.stack([fixed, orbit, drift]))
    assert m.rho[0] == pytest.approx(0.6, rel=1e-6)
    assert np.allclose(m.step_cos[0], np.cos(0.4)) and np.allclose(m.contraction[0], 0.6)
    assert m.rho[1] == pytest.approx(1.0, rel=1e-6) and np.allclose(m.step_cos[1], np.cos(0.7))
    assert m.rho[2] == pytest.approx(1.0) and np.allclose(m.step_cos[2], 1.0)
    assert [TRAJECTORY_LABELS[i] for i in m.label] == ["fixed_point", "orbit", "drift"]
    assert m.dist_to_last.shape == (3, 10) and np.allclose(m.dist_to_last[:, -1], 0)
    # relative step size, by hand
    assert m.rel_step[2, 0] == pytest.approx(np.linalg.norm(v) / np.linalg.norm(drift[0]))
    # growing steps are drift; a little noise does not change the labels
    grow = spiral(1.3, 0.9, seed=5)
    noisy = convergence_metrics(np.stack([spiral(0.6, 0.4, noise=1e-4), spiral(1.0, 0.7, noise=1e-3), grow]))
    assert noisy.rho[0] == pytest.approx(0.6, rel=0.05)
    assert list(noisy.label) == [0, 1, 2]
    # streaming summary: label shares and per-step means
    acc = ConvergenceAccumulator(10, (2,))
    acc.update(np.stack([fixed, orbit, drift]), np.array([0, 1, 1]))
    s = acc.result()
    assert np.allclose(s.label_share[0], [1, 0, 0]) and np.allclose(s.label_share[1], [0, 0.5, 0.5])
    assert np.allclose(s.contraction[0], 0.6) and s.log_rho_mean[0] == pytest.approx(np.log(0.6))


def test_pca_recovers_planted_plane():
    rng = np.random.default_rng(13)
    d = 64
    basis, _ = np.linalg.qr(rng.normal(size=(d, 2)))
    X = (rng.normal(size=(2000, 2)) * [3, 2]) @ basis.T + 0.01 * rng.normal(size=(2000, d))
    for method in ("randomized", "incremental"):
        p = pca(X.astype(np.float32), n_components=5, method=method, batch_size=500)
        assert p.explained_variance_ratio[:2].sum() > 0.99
        assert np.max(subspace_angles(p.components[:2].T.astype(np.float64), basis)) < 0.01
        assert p.coords.shape == (2000, 5) and p.params["solver"] == method


# ---------------------------------------------------------------- decoding, causal


def test_linear_probe_reaches_bayes_accuracy():
    rng = np.random.default_rng(14)
    n, dim, d, sigma = 4000, 5, 1.5, 1.0
    y = rng.integers(0, 2, n)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    X = rng.normal(0, sigma, (n, dim)) + np.outer(y, direction) * d
    bayes = sps.norm.cdf(d / (2 * sigma))  # 0.7734
    r = linear_probe(X, y, n_splits=5, seed=0)
    se = np.sqrt(bayes * (1 - bayes) / n)
    assert abs(r.accuracy - bayes) < 4 * se + 0.01
    assert abs(r.baseline - 0.5) < 0.05
    assert r.chance == pytest.approx(max(np.mean(y), 1 - np.mean(y)))


def test_effect_summary():
    rng = np.random.default_rng(15)
    y = rng.normal(size=(10, 3, 4))
    z = y * 1.1  # relative change 0.1 for every sample
    s = effect_summary(y, z)
    assert s.relative_change == pytest.approx(0.1) and s.pooled_relative_change == pytest.approx(0.1)
    assert s.mse == pytest.approx(np.mean((0.1 * y) ** 2))
    acc = EffectAccumulator()
    acc.update(y[:4], z[:4])
    acc.update(y[4:], z[4:])
    assert acc.result().mse == pytest.approx(s.mse) and acc.result().n_samples == 10


def _reference_null_tables(rows, cols, n_tables, rng):
    """The original one-table-at-a-time sequential hypergeometric sampler (reference)."""
    out = np.zeros((n_tables, len(rows), len(cols)), np.int64)
    free = np.broadcast_to(cols, (n_tables, len(cols))).copy()
    for i in range(len(rows)):
        left = np.full(n_tables, rows[i], np.int64)
        for j in range(len(cols)):
            x = left.copy() if j == len(cols) - 1 else rng.hypergeometric(free[:, j], free[:, j + 1:].sum(1), left)
            out[:, i, j] = x
            free[:, j] -= x
            left -= x
    return out


def test_vectorised_null_sampler_keeps_margins_and_matches_reference():
    from probes.stats import mutual_information

    rows = np.array([[30, 0, 50, 20], [5, 5, 80, 10]])
    cols = np.array([[10, 60, 30], [40, 40, 20]])
    t = sample_null_tables(rows, cols, 3000, rng=8)
    assert t.shape == (2, 3000, 4, 3)
    assert (t.sum(axis=3) == rows[:, None]).all() and (t.sum(axis=2) == cols[:, None]).all()
    assert (t >= 0).all()
    for g in range(2):
        new = mutual_information(t[g])
        ref = mutual_information(_reference_null_tables(rows[g], cols[g], 3000, np.random.default_rng(9)))
        se = np.sqrt(new.var() / len(new) + ref.var() / len(ref))
        assert abs(new.mean() - ref.mean()) < 4 * se
        assert new.std() == pytest.approx(ref.std(), rel=0.1)
        assert sps.ks_2samp(new, ref).pvalue > 1e-3
    # grouped mi_summary equals per-table calls in distribution: margins of a batch
    tables = np.array([[[20, 5], [5, 20]], [[10, 10], [10, 10]]])
    r = mi_summary(tables, n_perm=199, seed=1)
    assert r.p_value[0] < 0.02 and r.p_value[1] > 0.3


def test_strided_expected_mi_equals_full_sum():
    """The strided (Poisson-summation) EMI for large cells equals the unit-stride sum."""
    rng = np.random.default_rng(12)
    for n, k, m in [(7_000_000, 8, 16), (36_000_000, 8, 5), (200_000, 4, 64)]:
        rows = rng.multinomial(n, rng.dirichlet(np.full(k, 3.0)))
        cols = rng.multinomial(n, rng.dirichlet(np.full(m, 3.0)))
        fast = expected_mutual_information(rows, cols)
        full = expected_mutual_information(rows, cols, min_sd_stride=np.inf)
        assert fast == pytest.approx(full, rel=1e-9)
        assert fast == pytest.approx((k - 1) * (m - 1) / (2 * n), rel=0.02)

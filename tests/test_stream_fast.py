"""The streaming pass's fast per-chunk paths equal the definitions they replace (issue 23).

The pass counts each chunk with one joint bincount (histogram and step pairs), shares pair
tables between families, counts neighbour pairs on the flat token axis and sums stored float16
gate probabilities by row from their bit patterns. Each is checked here against the plain
definition on real traces: the tiny model's recorded trace (probabilities, 144 tokens, two seeds
per prompt) and a benchmark-layout trace from the real `SamplingWriter` (4096 tokens, where the
joint count applies; two branches, repeated prompts, probabilities, some ablated ids).
"""

import h5py
import numpy as np
import pytest

import probes.stats.routing as routing
from probes.analysis import Options, analyze, jsonable
from probes.analysis.chunk import ChunkTables, make_chunk, position_histogram
from probes.analysis.run import SampleCounts
from probes.analysis.setup import grid_of, labels_of
from probes.stats import GateAccumulator
from probes.stats.spatial import neighbour_agreement
from traces import SampleTable, SamplingLayout, SamplingWriter, open_trace
from traces.synthetic import cell_routing, gate_probs


@pytest.fixture(scope="module")
def layout_trace(tmp_path_factory):
    """Benchmark layout, small: 2 layers x 3 steps x 4096 tokens, K = 8, 2 branches, 4 timesteps,
    4 samples of 2 prompts, gate probabilities; some ids ablated (254) in a copy."""
    d = tmp_path_factory.mktemp("stream_fast")
    lo = SamplingLayout(n_experts=8, layers=[3, 9], steps=3, tokens=4096, timesteps=list(range(4)),
                        timestep_values=[1.0, 0.75, 0.5, 0.25], store_prob=True, branches=("cond", "uncond"))
    table = SampleTable(prompt=[f"prompt {i % 2}" for i in range(4)], seed=list(range(4)))
    rng = np.random.default_rng(5)
    path = d / "layout.h5"
    with SamplingWriter(path, lo, table) as w:
        for b0 in (0, 2):
            w.begin_batch(2)
            for t in range(4):
                e = cell_routing(7, b0, t, (2, 2, 2, 3, 4096), 8)
                w.write_timestep(t, e, prob=gate_probs(rng, e, 8))
    ablated = d / "ablated.h5"
    ablated.write_bytes(path.read_bytes())
    with h5py.File(ablated, "r+") as f:
        ids = f["routing/expert"][()]  # (sample, branch, timestep, layer, step, token)
        ids[1, 0, 2, 0, 1, ::7] = 254
        ids[3, 1, 3, 1, 2, :100] = 254
        f["routing/expert"][...] = ids
        f["routing/counts"][...] = (ids[..., None] == np.arange(8)).sum(axis=-2)  # as the recorder counts them
    return {"clean": path, "ablated": ablated}


def reference_report(path, monkeypatch) -> dict:
    """The report with the general paths: gate sums from float64 probabilities, the histogram
    and the step pairs counted apart (ChunkTables.histogram, ChunkTables.pairs(shift=1))."""
    with monkeypatch.context() as m:
        m.setattr(routing, "float16_row_sums", lambda probs, ids: None)
        init = ChunkTables.__init__

        def general(self, grid, labels):  # the histogram and the step pairs counted apart
            init(self, grid, labels)
            self.joint = False

        m.setattr(ChunkTables, "__init__", general)
        return jsonable(analyze(str(path), Options(n_perm=19, linear_probes=False)))


def assert_same_report(got, want, where="report"):
    """Equal keys and integers; floats equal to float64 rounding (the gate entropy is summed in
    another order and rearranged: log S + sum(-p log p) / S)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same_report(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_report(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), where
    else:
        assert got == want, where


@pytest.mark.parametrize("name", ["tiny", "clean", "ablated"])
def test_report_equals_the_general_paths(name, layout_trace, monkeypatch, request):
    path = request.getfixturevalue("tiny_trace") if name == "tiny" else layout_trace[name]
    fast = jsonable(analyze(str(path), Options(n_perm=19, linear_probes=False)))
    assert_same_report(fast, reference_report(path, monkeypatch))
    assert fast["global"]["gate"]["n"] > 0 and fast["checks"]["counts_vs_ids_max_abs_diff"] == 0
    if name == "ablated":
        assert fast["checks"]["invalid_records"] == len(range(0, 4096, 7)) + 100


def chunks_of(trace):
    """(grid, tables, chunks) of every chunk cell of an open trace, as the pass builds them."""
    grid = grid_of(trace, Options(linear_probes=False))
    labels = labels_of(trace, grid)[0]
    tables = ChunkTables(grid, labels)
    counts = SampleCounts(trace, tables)
    cells = [make_chunk(grid, tables, b.coords, b.data, counts.cell(b.coords), None, None)
             for b in trace.iter_chunks("/routing/expert")]
    return grid, labels, tables, cells


def count_pairs(a, b, k):
    """(layer, step, K, K) joint counts of two id arrays (layer, step, token), valid pairs only."""
    out = np.zeros(a.shape[:2] + (k, k), np.int64)
    for li, si, t in zip(*np.nonzero((a < k) & (b < k))):
        out[li, si, a[li, si, t], b[li, si, t]] += 1
    return out


@pytest.mark.parametrize("name", ["clean", "ablated"])
def test_chunk_tables_equal_counting_each_record(name, layout_trace):
    with open_trace(layout_trace[name]) as trace:
        grid, labels, tables, cells = chunks_of(trace)
        counts = trace.counts()
        rows = {int(s): r for r, s in enumerate(trace.coords["sample"])}
    k = grid.n_experts
    assert tables.joint  # this layout takes the one-count path
    codes = next(lab.codes for lab in labels if lab.kind == "position")
    for c in cells:
        ids = c.ids.astype(np.int64)  # (layer, step, token)
        onehot = ids[..., None] == np.arange(k)  # ids >= K match no expert
        want = np.stack([onehot[:, :, codes == r].sum(axis=2) for r in range(tables.n_positions)], axis=2)
        assert np.array_equal(c.histogram, want)
        assert c.n_invalid == int((ids >= k).sum())
        steps = count_pairs(ids[:, :-1], ids[:, 1:], k)
        assert np.array_equal(c.step_pairs, steps)
        assert np.array_equal(tables.pairs(c.clipped, c.clipped, shift=1)[:, :-1], steps)
        assert np.array_equal(c.counts, counts[rows[c.sample], c.branch, c.timestep])
    earlier, now = cells[-2], cells[-1]  # the last sample's last branch: its last two timesteps
    assert (now.sample, now.branch, now.timestep) == (earlier.sample, earlier.branch, earlier.timestep + 1)
    table = tables.pairs(earlier.clipped, now.clipped)
    assert np.array_equal(table, count_pairs(earlier.ids.astype(np.int64), now.ids.astype(np.int64), k))
    assert tables.pairs(earlier.clipped, now.clipped) is table  # counted once per chunk, read-only
    assert not table.flags.writeable
    # what agreement reads, over the pairs valid at both: the same-expert pairs and both margins
    same, first, second = tables.agreement(earlier.routing, now.routing)
    assert np.array_equal(same, np.trace(table, axis1=-2, axis2=-1))
    assert np.array_equal(first, table.sum(axis=-1)) and np.array_equal(second, table.sum(axis=-2))
    assert tables.agreement(earlier.routing, now.routing)[0] is same  # counted once per chunk
    # the position histogram from a sum of counted tables is the sum of the histograms
    assert np.array_equal(position_histogram(earlier.counted + now.counted)[..., :k],
                          earlier.histogram + now.histogram)


def test_neighbour_agreement_equals_the_grid_definition():
    rng = np.random.default_rng(3)
    for shape in [(3, 4, 5, 6), (2, 1, 7), (2, 7, 1), (1, 1), (4, 64, 64), (2, 300, 300)]:
        maps = rng.integers(0, 3, shape).astype(np.uint8)
        for m in (maps, np.swapaxes(maps, -1, -2)):  # also a non-contiguous view
            same_h = np.count_nonzero(m[..., :, 1:] == m[..., :, :-1], axis=(-2, -1))
            same_v = np.count_nonzero(m[..., 1:, :] == m[..., :-1, :], axis=(-2, -1))
            got_h, got_v = neighbour_agreement(m)
            assert np.array_equal(got_h, same_h) and np.array_equal(got_v, same_v), shape


def gate_pair(k, shape):
    """Two accumulators over (row group, timestep bin) groups."""
    return GateAccumulator(k, shape, ("row", "bin")), GateAccumulator(k, shape, ("row", "bin"))


def assert_same_gate(a, b):
    ra, rb = a.result(), b.result()
    for field in ("gate_mass", "load_share", "mean_margin", "balance", "disagreement", "n"):
        assert np.array_equal(getattr(ra, field), getattr(rb, field), equal_nan=True), field  # exact sums
    for field in ("mean_entropy", "mean_norm_entropy", "soft_mi"):
        np.testing.assert_allclose(getattr(ra, field), getattr(rb, field), rtol=1e-12, atol=1e-15)
    assert np.array_equal(a._load.result(), b._load.result())


@pytest.mark.parametrize("k", [2, 3, 6, 8])
def test_float16_gate_rows_equal_the_float64_definition(k):
    """Stored float16 probabilities (with exact ties, zeros, one-hots, uniform rows, values that
    do not sum to 1) give the same gate sums by row as their float64 copy through the general path."""
    rng = np.random.default_rng(k)
    rows, tokens = 6, 500
    logits = rng.normal(0, 2, (rows, tokens, k))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float16)
    p[0, :50] = np.float16(1.0 / k)  # every expert tied
    p[1, :50, :2] = p[1, :50, :2].max(-1, keepdims=True)  # the two first experts tied (maybe at the top)
    p[2, :50] = 0
    p[2, :50, rng.integers(0, k, 50)] = 1  # one-hot (k - 1 exact zeros)
    p[3] = np.round(p[3].astype(np.float32) * 64) / 64  # coarse values: many ties below the top
    ids = rng.integers(0, k, (rows, tokens)).astype(np.uint8)
    ids[4] = np.argmax(p[4], axis=-1)  # a row routed by argmax: no disagreement but ties
    row = np.arange(rows).reshape(-1, 1) % 3
    fast, general = gate_pair(k, (3, 2))
    fast.update(probs=p, ids=ids, groups=(row, 1))
    general.update(probs=p.astype(np.float64), ids=ids, groups=(row, 1))
    assert fast._sums.result()[1].sum() == rows * tokens
    assert_same_gate(fast, general)
    counts = (ids[..., None] == np.arange(k)).sum(axis=1)  # expert_counts given: the same load
    given, _ = gate_pair(k, (3, 2))
    given.update(probs=p, ids=ids, groups=(row, 1), expert_counts=counts)
    assert_same_gate(given, general)


def test_float16_gate_rows_leave_what_they_cannot_sum_to_the_general_path():
    """NaN, negative or infinite probabilities, a token whose probabilities are all 0 and an
    invalid id are not summed by row (None); GateAccumulator then takes the general path and
    ends in the same state as from float64 (NaN sums included), or raises as it does."""
    rng = np.random.default_rng(9)
    k, rows = 4, np.arange(3).reshape(-1, 1)
    base = rng.dirichlet(np.ones(k), (3, 40)).astype(np.float16)
    ids = rng.integers(0, k, (3, 40))
    for bad in (np.nan, -0.25, np.inf, None):
        p = base.copy()
        if bad is None:
            p[1, 3] = 0
        else:
            p[1, 3, 2] = bad
        assert routing.float16_row_sums(p, ids) is None
        fast, general = GateAccumulator(k, (3,)), GateAccumulator(k, (3,))
        with np.errstate(invalid="ignore", divide="ignore"):
            fast.update(probs=p, ids=ids, groups=(rows,))
            general.update(probs=p.astype(np.float64), ids=ids, groups=(rows,))
        assert np.array_equal(fast._sums.result()[0], general._sums.result()[0], equal_nan=True), bad
    invalid = np.where(ids == 0, k, ids)
    assert routing.float16_row_sums(base, invalid) is None
    for probs in (base, base.astype(np.float64)):
        with pytest.raises(ValueError, match="out of range"):
            GateAccumulator(k, (3,)).update(probs=probs, ids=invalid, groups=(rows,))
    per_token = (np.arange(40) % 3,)  # groups that vary along the tokens: the general path
    fast, general = GateAccumulator(k, (3,)), GateAccumulator(k, (3,))
    fast.update(probs=base, ids=ids, groups=per_token)
    general.update(probs=base.astype(np.float64), ids=ids, groups=per_token)
    assert np.array_equal(fast._sums.result()[0], general._sums.result()[0])


def test_joined_and_rank_traces_read_counts_by_sample(tmp_path, monkeypatch):
    """Counts are read one sample at a time by sample id: a rank file (ids 4, 5 in rows 0, 1)
    and the joined virtual trace give counts that match their ids, and the general paths' report."""
    from traces import join_ranks

    layout = SamplingLayout(n_experts=8, layers=[2, 4], steps=2, tokens=64, timesteps=[0, 5, 9],
                            branches=("cond", "uncond"))
    paths = []
    for rank, ids in ((0, [0, 1, 2, 3]), (1, [4, 5])):
        paths.append(tmp_path / f"run.rank{rank}.h5")
        table = SampleTable(prompt=[f"p{i % 3}" for i in ids], seed=ids, sample_id=ids)
        with SamplingWriter(paths[-1], layout, table, rank=rank, world_size=2, run_id="run-a") as w:
            for b0 in range(0, len(ids), 2):
                w.begin_batch(2)
                for t in range(3):
                    w.write_timestep(t, cell_routing(rank, b0, t, (2, 2, 2, 2, 64)))
    joined = join_ranks(paths, tmp_path / "run.h5")
    for path in (paths[1], joined):
        fast = jsonable(analyze(str(path), Options(n_perm=19, linear_probes=False)))
        assert fast["checks"]["counts_vs_ids_max_abs_diff"] == 0 and fast["checks"]["counts_vs_ids_cells"] > 0
        assert_same_report(fast, reference_report(path, monkeypatch))

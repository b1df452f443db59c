"""Round trips: every dataset reads back exactly, selections match NumPy on what was written."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from traces import (
    SampleTable,
    SamplingLayout,
    SamplingWriter,
    TraceError,
    TraceMeta,
    TrainingLayout,
    TrainingWriter,
    open_trace,
)
from traces.synthetic import coherent_routing, gate_probs

K = 8


def _layout(**kw) -> SamplingLayout:
    base = dict(n_experts=K, layers=[3, 7], steps=3, tokens=[0, 2, 4, 6, 8, 10, 12, 14, 16],
                timesteps=[10, 20, 30], timestep_values=[999.0, 500.0, 1.0], sigmas=[1.0, 0.5, 0.01],
                branches=("cond", "uncond"), store_prob=True, latent_tokens=[0, 4], latent_dim=3,
                projection=np.eye(6, 3), image_shape=(4, 5, 3))
    base.update(kw)
    return SamplingLayout(**base)


@pytest.fixture()
def written(tmp_path):
    """A complete small trace plus the full arrays that were written into it."""
    rng = np.random.default_rng(1)
    lo = _layout()
    table = SampleTable(prompt=["a cat", "ünïcode dog", "", "x"], seed=[11, 12, 13, 14],
                        label=[0, -1, 3, 4], scene=[{"o": [1, 2]}, "", '{"k": 1}', {"z": None}])
    meta = TraceMeta(model_config={"dim": 64}, rsr_config={"K": K, "L": 3}, checkpoint_sha256="ab" * 32,
                     command="probes.record --x", seeds=[11, 12, 13, 14], scheduler={"name": "euler"},
                     extra={"interventions": [{"force_expert": 2}]})
    S, B, T, Ly, L, N = 4, 2, 3, 2, 3, 9
    full = {"expert": np.zeros((S, B, T, Ly, L, N), np.uint8), "prob": np.zeros((S, B, T, Ly, L, N, K), np.float16),
            "latents": np.zeros((S, B, T, Ly, L, 2, 3), np.float16),
            "decoded": np.zeros((S, 1, T, Ly, L, 4, 5, 3), np.uint8), "final": np.zeros((S, 4, 5, 3), np.uint8)}
    path = tmp_path / "t.h5"
    with SamplingWriter(path, lo, table, meta) as w:
        for b0 in (0, 2):
            sl = w.begin_batch(2)
            assert sl == slice(b0, b0 + 2)
            for t in range(T):
                e = rng.integers(0, K, (2, B, Ly, L, N), dtype=np.uint8)
                p = gate_probs(rng, e, K)
                src = rng.normal(size=(2, B, Ly, L, 2, 6))
                d = rng.integers(0, 256, (2, 1, Ly, L, 4, 5, 3), dtype=np.uint8)
                w.write_timestep(t, e, prob=p, latents=src, decoded=d)
                full["expert"][sl, :, t] = e
                full["prob"][sl, :, t] = p
                full["latents"][sl, :, t] = (src @ np.eye(6, 3)).astype(np.float16)
                full["decoded"][sl, :, t] = d
            f = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
            w.write_final(f)
            full["final"][sl] = f
    return path, full, table


def test_all_datasets_round_trip(written):
    path, full, table = written
    with open_trace(path) as r:
        assert r.kind == "sampling" and r.complete and r.closed
        assert r.attrs["schema"] == "rsr-trace" and r.attrs["schema_version"] == 1
        assert r.attrs["model_config"] == {"dim": 64} and r.attrs["scheduler"] == {"name": "euler"}
        assert r.attrs["seeds"] == [11, 12, 13, 14] and r.attrs["command"] == "probes.record --x"
        assert r.attrs["checkpoint_sha256"] == "ab" * 32
        assert r.attrs["interventions"] == [{"force_expert": 2}]  # extra JSON attributes come back decoded
        assert r.steps == 2 * 3 + 2
        np.testing.assert_array_equal(r.routing(), full["expert"])
        np.testing.assert_array_equal(r.prob(), full["prob"])
        np.testing.assert_array_equal(r.latents(), full["latents"])
        np.testing.assert_array_equal(r.decoded(), full["decoded"])
        np.testing.assert_array_equal(r.final(), full["final"])
        counts = np.stack([(full["expert"] == k).sum(-1) for k in range(K)], -1)
        np.testing.assert_array_equal(r.counts(), counts)
        assert r.written.all() and r.final_written.all()
        s = r.samples()
        assert s["prompt"] == list(table.prompt)
        assert s["scene"] == [{"o": [1, 2]}, None, {"k": 1}, {"z": None}]
        assert [r.scene(i) for i in range(4)] == s["scene"]  # one row at a time, the same values
        np.testing.assert_array_equal(s["seed"], [11, 12, 13, 14])
        np.testing.assert_array_equal(s["label"], [0, -1, 3, 4])
        c = r.coords
        assert list(c["branch"]) == ["cond", "uncond"]
        np.testing.assert_array_equal(c["layer"], [3, 7])
        np.testing.assert_array_equal(c["timestep_value"], [999.0, 500.0, 1.0])
        np.testing.assert_array_equal(c["stored_token"], [0, 4])
        np.testing.assert_array_equal(r.dataset("/latents/projection")[()], np.eye(6, 3))


def test_every_axis_has_a_dimension_scale(written):
    path, _, _ = written
    with h5py.File(path, "r") as f:
        for name in ("/routing/expert", "/routing/prob", "/routing/counts", "/latents/h", "/decoded/step"):
            d = f[name]
            for i, dim in enumerate(d.dims):
                assert dim.label == d.attrs["axes"][i]
                assert len(dim) >= 1, f"{name} axis {dim.label} has no scale"
        assert [s.name for s in f["/routing/expert"].dims[2].values()] == [
            "/coords/timestep", "/coords/timestep_value", "/coords/sigma"]


@pytest.mark.parametrize("sel", [
    dict(sample=1, timestep=2, layer=7, step=0),
    dict(sample=[3, 0, 3], branch="uncond", token=[8, 0, 1]),
    dict(sample=slice(1, 4, 2), timestep=[2, 0], layer=[7, 3], step=slice(None, None, -1)),
    dict(branch=["uncond", "cond"], token=slice(2, 7)),
    dict(sample=np.array([True, False, True, False]), step=-1, token=[-1]),
    dict(timestep=1, layer=3),
])
def test_selection_matches_numpy(written, sel):
    path, full, _ = written
    order = ("sample", "branch", "timestep", "layer", "step", "token")
    layer_pos = {3: 0, 7: 1}
    idx = []
    for ax in order:
        v = sel.get(ax, slice(None))
        if ax == "layer" and not isinstance(v, slice):
            v = [layer_pos[x] for x in v] if isinstance(v, list) else layer_pos[v]
        if ax == "branch" and isinstance(v, (str, list)):
            names = ["cond", "uncond"]
            v = names.index(v) if isinstance(v, str) else [names.index(x) for x in v]
        idx.append(v)
    expected = full["expert"]
    for axis in reversed(range(len(idx))):  # apply one axis at a time: NumPy semantics per axis
        key = [slice(None)] * expected.ndim
        key[axis] = idx[axis]
        expected = expected[tuple(key)]
    with open_trace(path) as r:
        got = r.routing(**sel)
    np.testing.assert_array_equal(got, expected)


def test_bad_selections_are_trace_errors(written):
    path, _, _ = written
    with open_trace(path) as r:
        with pytest.raises(TraceError, match="layer 5 not in trace"):
            r.routing(layer=5)
        with pytest.raises(TraceError, match="no axis"):
            r.routing(expert=1)
        with pytest.raises(TraceError, match="out of range"):
            r.routing(sample=9)
        np.testing.assert_array_equal(r.index("timestep_value", [1.0, 999.0]), [2, 0])


def test_iter_chunks_streams_every_written_cell(written):
    path, full, _ = written
    with open_trace(path) as r:
        blocks = list(r.iter_chunks(layer=[7], token=slice(0, 4)))
    assert len(blocks) == 4 * 2 * 3
    for b in blocks:
        assert b.dims == ("layer", "step", "token")
        s, br, t = b.coords["sample"], ["cond", "uncond"].index(b.coords["branch"]), [10, 20,
                                                                                      30].index(b.coords["timestep"])
        np.testing.assert_array_equal(b.data, full["expert"][s, br, t, 1:2, :, 0:4])
        np.testing.assert_array_equal(b.coords["token"], [0, 2, 4, 6])
        assert b.coords["sigma"] in (1.0, 0.5, 0.01)


def test_write_errors_are_one_line(tmp_path):
    lo = _layout(store_prob=False)
    table = SampleTable(prompt=["a"], seed=[0])
    with SamplingWriter(tmp_path / "w.h5", lo, table) as w:
        with pytest.raises(TraceError, match="before begin_batch"):
            w.write_timestep(0, np.zeros((1, 2, 2, 3, 9), np.uint8))
        w.begin_batch(1)
        with pytest.raises(TraceError, match="expected"):
            w.write_timestep(0, np.zeros((1, 2, 2, 3, 8), np.uint8))
        with pytest.raises(TraceError, match="store_prob=False"):
            w.write_timestep(0, np.zeros((1, 2, 2, 3, 9), np.uint8), prob=np.zeros((1, 2, 2, 3, 9, K)))
        with pytest.raises(TraceError, match="exceeds"):
            w.begin_batch(1)
    with pytest.raises(TraceError, match="exists"):
        SamplingWriter(tmp_path / "w.h5", lo, table)


def test_unclean_exit_leaves_incomplete_but_readable(tmp_path):
    lo = _layout(store_prob=False, latent_tokens=None, image_shape=None)
    path = tmp_path / "crash.h5"
    with pytest.raises(RuntimeError):
        with SamplingWriter(path, lo, SampleTable(prompt=["a", "b"], seed=[0, 1])) as w:
            w.begin_batch(2)
            w.write_timestep(1, np.ones((2, 2, 2, 3, 9), np.uint8))
            raise RuntimeError("sampler crashed")
    with open_trace(path) as r:
        assert not r.complete
        np.testing.assert_array_equal(r.written, [[False, True, False]] * 2)
        assert (r.routing(timestep=1) == 1).all() and (r.routing(timestep=0) == 255).all()


def test_training_trace_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    lo = TrainingLayout(n_experts=K, layers=[5], steps=2, tokens=16, store_prob=True, scalars=("loss", "balance", "lr"))
    path = tmp_path / "train.h5"
    experts, probs = [], []
    with TrainingWriter(path, lo, TraceMeta(rsr_config={"K": K})) as w:
        for step in (100, 200):
            e = coherent_routing(rng, (3, 1, 2, 16))
            p = gate_probs(rng, e, K)
            w.write_events(step, sample=[step + 1, step + 2, step + 3], timestep=[0.1, 0.5, 0.9], expert=e,
                           label=[1, 2, 3], prob=p)
            w.log(step, loss=1.0 / step, balance=0.5, lr=1e-4)
            experts.append(e)
            probs.append(p)
    with open_trace(path) as r:
        assert r.kind == "training" and r.complete and r.n_events == 6
        np.testing.assert_array_equal(r.routing(), np.concatenate(experts))
        np.testing.assert_array_equal(r.prob(event=[4, 0]), np.concatenate(probs)[[4, 0]])
        np.testing.assert_array_equal(r.routing(event=slice(3, None), layer=5, step=1),
                                      np.concatenate(experts)[3:, 0, 1])
        ev = r.events()
        np.testing.assert_array_equal(ev["step"], [100] * 3 + [200] * 3)
        np.testing.assert_array_equal(ev["label"], [1, 2, 3] * 2)
        np.testing.assert_allclose(ev["timestep"], [0.1, 0.5, 0.9] * 2)
        tr = r.train()
        np.testing.assert_array_equal(tr["step"], [100, 200])
        np.testing.assert_allclose(tr["loss"], [0.01, 0.005])
        assert set(tr) == {"step", "loss", "balance", "lr"}
        blocks = list(r.iter_chunks())
        assert len(blocks) == 6 and blocks[4].coords["train_step"] == 200 and blocks[4].coords["sample"] == 202
        counts = r.counts(event=0)
        np.testing.assert_array_equal(counts.sum(-1), 16)

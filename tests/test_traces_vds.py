"""Two rank files joined through virtual datasets read as one trace."""

from __future__ import annotations

import numpy as np
import pytest

from traces import SampleTable, SamplingLayout, SamplingWriter, TraceError, join_ranks, open_trace
from traces.synthetic import cell_routing

LAYOUT = SamplingLayout(n_experts=8, layers=[2, 4], steps=2, tokens=64, timesteps=[0, 5, 9],
                        branches=("cond", "uncond"), store_prob=False, image_shape=(4, 4, 3))
CELL = (2, 2, 2, 2, 64)


def _rank(path, rank: int, ids: list[int], finish: bool = True):
    table = SampleTable(prompt=[f"p{i}" for i in ids], seed=ids, sample_id=ids)
    w = SamplingWriter(path, LAYOUT, table, rank=rank, world_size=2, run_id="run-a")
    for b0 in range(0, len(ids), 2):
        w.begin_batch(2)
        for t in range(3):
            w.write_timestep(t, cell_routing(rank, b0, t, CELL))
        w.write_final(np.full((2, 4, 4, 3), rank + 1, np.uint8))
    if finish:
        w.close()
    return w


def test_two_ranks_read_as_one(tmp_path):
    r0 = tmp_path / "run.rank0.h5"
    r1 = tmp_path / "run.rank1.h5"
    _rank(r0, 0, [0, 1, 2, 3])
    _rank(r1, 1, [4, 5])
    joined = join_ranks([r0, r1], tmp_path / "run.h5")
    with open_trace(joined) as r, open_trace(r0) as a, open_trace(r1) as b:
        assert r.complete and r.n_samples == 6 and r.attrs["joined_from"] == ["run.rank0.h5", "run.rank1.h5"]
        np.testing.assert_array_equal(r.coords["sample"], [0, 1, 2, 3, 4, 5])
        np.testing.assert_array_equal(r.routing(), np.concatenate([a.routing(), b.routing()]))
        np.testing.assert_array_equal(r.counts(), np.concatenate([a.counts(), b.counts()]))
        np.testing.assert_array_equal(r.routing(sample=[5, 0], layer=4, branch="uncond"),
                                      np.stack([b.routing(sample=1, layer=4, branch="uncond"),
                                                a.routing(sample=0, layer=4, branch="uncond")]))
        np.testing.assert_array_equal(r.final()[:, 0, 0, 0], [1, 1, 1, 1, 2, 2])
        assert r.samples()["prompt"] == [f"p{i}" for i in range(6)]
        assert r.written.all() and r.steps == a.steps + b.steps
        assert len(list(r.iter_chunks())) == 6 * 2 * 3
        assert r.dataset("/routing/expert").is_virtual


def test_joined_directory_can_move(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    _rank(d / "r0.h5", 0, [0, 1])
    _rank(d / "r1.h5", 1, [2, 3])
    join_ranks([d / "r0.h5", d / "r1.h5"], d / "all.h5")
    moved = tmp_path / "b"
    d.rename(moved)
    with open_trace(moved / "all.h5") as r:
        np.testing.assert_array_equal(r.routing(sample=3, timestep=2), cell_routing(1, 0, 2, CELL)[1])


def test_incomplete_rank_makes_join_incomplete_and_mismatch_is_refused(tmp_path):
    w = _rank(tmp_path / "r0.h5", 0, [0, 1], finish=False)
    w.abort()
    _rank(tmp_path / "r1.h5", 1, [2, 3])
    with open_trace(join_ranks([tmp_path / "r0.h5", tmp_path / "r1.h5"], tmp_path / "j.h5")) as r:
        assert not r.complete
    other = SamplingLayout(n_experts=8, layers=[2, 4], steps=2, tokens=32, timesteps=[0, 5, 9])
    SamplingWriter(tmp_path / "odd.h5", other, SampleTable(prompt=["x"], seed=[0])).close()
    with pytest.raises(TraceError, match="same recording"):
        join_ranks([tmp_path / "r1.h5", tmp_path / "odd.h5"], tmp_path / "bad.h5")


def test_only_ranks_of_one_recording_join(tmp_path):
    _rank(tmp_path / "r0.h5", 0, [0, 1])
    _rank(tmp_path / "r1.h5", 1, [2, 3])
    with pytest.raises(TraceError, match="ranks 0..W-1"):  # rank 1 missing
        join_ranks([tmp_path / "r0.h5"], tmp_path / "j.h5")
    with pytest.raises(TraceError, match="ranks 0..W-1"):  # rank 0 twice
        join_ranks([tmp_path / "r0.h5", tmp_path / "r0.h5", tmp_path / "r1.h5"], tmp_path / "j.h5")
    table = SampleTable(prompt=["x", "y"], seed=[2, 3], sample_id=[2, 3])
    SamplingWriter(tmp_path / "other.h5", LAYOUT, table, rank=1, world_size=2, run_id="run-b").close()
    with pytest.raises(TraceError, match="run id differs"):
        join_ranks([tmp_path / "r0.h5", tmp_path / "other.h5"], tmp_path / "j.h5")
    assert not (tmp_path / "j.h5").exists()

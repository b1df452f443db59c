"""The schema table is what the writers write: every dataset, with its axes, dtype, fill,
chunks and filter; /derived accepts only registered datasets and attributes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from traces import SamplingLayout, TraceError, TrainingLayout, TrainingWriter
from traces.compression import FILTERS
from traces.derived import open_derived
from traces.schema import MAX_EXPERTS, datasets
from traces.synthetic import write_synthetic

FULL = SamplingLayout(n_experts=8, layers=[1, 5], steps=2, tokens=64, timesteps=[0, 3], branches=("cond", "uncond"),
                      store_prob=True, latent_tokens=[0, 9], latent_dim=4, projection=np.eye(6, 4),
                      image_shape=(8, 8, 3))


def _filter_ids(name: str) -> list[int]:
    kw = FILTERS[name]
    ids = [2] if kw.get("shuffle") else []
    codec = kw.get("compression")
    return ids + ([] if codec is None else [{"gzip": 1, "lzf": 32000}.get(codec, codec)])


def _check_against_table(path, kind: str, features: set[str], lengths: dict[str, int], scalars=()) -> None:
    specs = {s.path: s for s in datasets(kind, features, scalars)}
    with h5py.File(path, "r") as f:
        found = []
        f.visititems(lambda n, o: found.append("/" + n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(found) == sorted(specs)
        for name, spec in specs.items():
            d = f[name]
            shape = spec.shape(lengths)
            assert d.shape[1:] == shape[1:] and d.dtype.kind == spec.numpy_dtype.kind, name
            if spec.dtype != "str":
                assert d.dtype == np.dtype(spec.dtype), name
            assert d.chunks == spec.chunk_shape(shape), name
            plist = d.id.get_create_plist()
            assert [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == _filter_ids(spec.filter), name
            if spec.fill is not None:
                np.testing.assert_array_equal(d.fillvalue, spec.fill, err_msg=name)
            if spec.role != "counter":
                assert [a.decode() if isinstance(a, bytes) else a for a in d.attrs["axes"]] == list(spec.axes)
            assert bool(d.attrs.get("growing", False)) == spec.grows, name


def test_sampling_trace_is_the_table(tmp_path):
    path = write_synthetic(tmp_path / "s.h5", FULL, n_samples=3, batch=3)
    _check_against_table(path, "sampling", FULL.features(), FULL.axis_lengths(3))


def test_training_trace_is_the_table(tmp_path):
    lo = TrainingLayout(n_experts=4, layers=[0, 2], steps=2, tokens=16, store_prob=True, scalars=("loss", "balance",
                                                                                                  "lr"))
    with TrainingWriter(tmp_path / "t.h5", lo) as w:
        w.write_events(0, np.arange(2), np.array([0.1, 0.9]), np.zeros((2, 2, 2, 16), np.uint8))
        w.log(0, loss=1.0, balance=0.0)
    _check_against_table(tmp_path / "t.h5", "training", lo.features(), lo.axis_lengths(2, 1), ("loss", "balance", "lr"))


def test_derived_writer_accepts_only_registered_names(tmp_path):
    path = write_synthetic(tmp_path / "s.h5", FULL, n_samples=1, batch=1)
    with open_derived(path, source="/latents/h", trace_steps=1) as out:
        with pytest.raises(TraceError, match="not a /derived dataset"):
            out.create("/derived/pca/other", np.zeros(3))
        with pytest.raises(TraceError, match="no schema attributes"):
            out.set_attrs("/derived/pca", colour="red")
        out.create("/derived/pca/mean", np.ones((2, 4), np.float64))
    with h5py.File(path, "r") as f:
        assert f["/derived/pca/mean"].dtype == np.float32 and f["/derived"].attrs["source"] == "/latents/h"


def test_one_expert_limit_for_model_and_trace():
    from rsr_model.config import ConfigError, rsr_config

    SamplingLayout(n_experts=MAX_EXPERTS, layers=[0], steps=1, tokens=4, timesteps=[0])
    with pytest.raises(TraceError, match=f"1..{MAX_EXPERTS}"):
        SamplingLayout(n_experts=MAX_EXPERTS + 1, layers=[0], steps=1, tokens=4, timesteps=[0])
    rsr_config("tiny", num_experts=MAX_EXPERTS)
    with pytest.raises(ConfigError, match=f"at most {MAX_EXPERTS}"):
        rsr_config("tiny", num_experts=MAX_EXPERTS + 1)

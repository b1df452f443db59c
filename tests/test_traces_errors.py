"""Files that are not usable traces give a TraceError with a clear one-line message."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from traces import SampleTable, SamplingLayout, TraceError, open_trace
from traces.synthetic import write_synthetic


@pytest.fixture()
def good(tmp_path):
    lo = SamplingLayout(n_experts=8, layers=[0, 1], steps=2, tokens=64, timesteps=[0, 1, 2])
    return write_synthetic(tmp_path / "good.h5", lo, n_samples=4, batch=2)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="no such file") as e:
        open_trace(tmp_path / "nope.h5")
    _one_line(e)


def test_not_hdf5(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("just some text, not HDF5\n" * 50)
    with pytest.raises(TraceError, match="not an HDF5 file") as e:
        open_trace(p)
    _one_line(e)


def test_truncated(good):
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated or damaged") as e:
        open_trace(good)
    _one_line(e)


def test_foreign_hdf5(tmp_path):
    p = tmp_path / "foreign.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.arange(3)
        f.attrs["schema"] = "someone-else"
    with pytest.raises(TraceError, match="foreign HDF5 file .schema 'someone-else'") as e:
        open_trace(p)
    _one_line(e)
    with h5py.File(p, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(TraceError, match="foreign HDF5 file .no 'schema' attribute"):
        open_trace(p)


@pytest.mark.parametrize("version,word", [(0, "older"), (2, "newer")])
def test_schema_version(good, version, word):
    with h5py.File(good, "r+") as f:
        f.attrs["schema_version"] = version
    with pytest.raises(TraceError, match=f"schema version {version} is {word}") as e:
        open_trace(good)
    _one_line(e)


def test_missing_required_dataset(good):
    with h5py.File(good, "r+") as f:
        del f["/routing/counts"]
    with pytest.raises(TraceError, match="missing required dataset /routing/counts") as e:
        open_trace(good)
    _one_line(e)


def test_optional_dataset_absent_is_clear(good):
    with open_trace(good) as r:
        with pytest.raises(TraceError, match="no dataset /routing/prob"):
            r.prob()


def test_bad_layout():
    with pytest.raises(TraceError, match="n_experts"):
        SamplingLayout(n_experts=300, layers=[0], steps=1, tokens=4, timesteps=[0])
    with pytest.raises(TraceError, match="sigmas has 1 entries for 2 timesteps"):
        SamplingLayout(n_experts=8, layers=[0], steps=1, tokens=4, timesteps=[0, 1], sigmas=[1.0])
    with pytest.raises(TraceError, match="seed has 1 entries for 2 prompts"):
        SampleTable(prompt=["a", "b"], seed=[1])

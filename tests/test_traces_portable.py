"""Portable (gzip) traces: written directly or converted, read identically, open without hdf5plugin;
a Blosc trace read without the plugin says what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from traces import SamplingLayout, TrainingLayout, TrainingWriter, join_ranks, open_trace
from traces.compression import plugin_hint
from traces.convert import convert_trace
from traces.convert import main as convert_main
from traces.synthetic import coherent_routing, write_synthetic

from .conftest import one_error_line

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = SamplingLayout(n_experts=8, layers=[3, 7], steps=2, tokens=256, timesteps=[0, 4, 8],
                        branches=("cond", "uncond"), store_prob=True, latent_tokens=list(range(0, 256, 32)),
                        latent_dim=4, projection=np.eye(6, 4), image_shape=(8, 8, 3))
GZIP, BLOSC = 1, 32001
BLOCKED = "import sys; sys.modules['hdf5plugin'] = None\n"  # `import hdf5plugin` raises ImportError


def _filters(d: h5py.Dataset) -> list[int]:
    plist = d.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


def _every_dataset(path) -> dict[str, tuple]:
    """name -> (data, chunks, fill, attrs without scale bookkeeping, dim labels and scales)."""
    out = {}
    with open_trace(path) as tr:
        def visit(name, d):
            if isinstance(d, h5py.Dataset):
                attrs = {k: str(v) for k, v in d.attrs.items() if k not in ("DIMENSION_LIST", "REFERENCE_LIST")}
                dims = [(dim.label, [s.name for s in dim.values()]) for dim in d.dims]
                out[name] = (d[()], d.chunks, str(d.fillvalue), attrs, dims)
        tr.file.visititems(visit)
        out["root"] = {k: str(v) for k, v in tr.attrs.items() if k != "run_id"}  # each recording has its own
        out["samples"] = str(tr.samples() if tr.kind == "sampling" else tr.events())
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name in ("root", "samples"):
            assert a[name] == b[name], name
            continue
        for x, y in zip(a[name][1:], b[name][1:]):
            assert x == y, name
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)


def _plain_h5py(path, code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run `code` with `f` = plain h5py open of `path`, hdf5plugin unimportable, no plugin path."""
    empty = tmp_path / "no_plugins"
    empty.mkdir(exist_ok=True)
    env = dict(os.environ, HDF5_PLUGIN_PATH=str(empty), PYTHONPATH=str(ROOT))
    script = BLOCKED + f"import h5py, numpy as np\nf = h5py.File({str(path)!r}, 'r')\n" + code
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def blosc_trace(tmp_path):
    return write_synthetic(tmp_path / "blosc.h5", LAYOUT, n_samples=4, batch=2)


def test_portable_writer_uses_gzip_and_stores_the_same_data(blosc_trace, tmp_path):
    portable = write_synthetic(tmp_path / "gzip.h5", LAYOUT, n_samples=4, batch=2, portable=True)
    with h5py.File(blosc_trace, "r") as b, h5py.File(portable, "r") as p:
        for name in ("routing/expert", "routing/prob", "latents/h", "decoded/step", "decoded/final"):
            assert BLOSC in _filters(b[name]) and _filters(p[name]) == [2, GZIP], name  # shuffle, deflate
            assert b[name].chunks == p[name].chunks
    a, b = _every_dataset(blosc_trace), _every_dataset(portable)
    a["root"].pop("created"), b["root"].pop("created")
    _assert_same(a, b)


def test_convert_round_trip_reads_identically(blosc_trace, tmp_path):
    portable, back = tmp_path / "p.h5", tmp_path / "back.h5"
    assert convert_main([str(blosc_trace), str(portable), "--portable"]) == 0
    assert convert_main([str(portable), str(back)]) == 0
    original = _every_dataset(blosc_trace)
    _assert_same(original, _every_dataset(portable))
    _assert_same(original, _every_dataset(back))
    with h5py.File(portable, "r") as p, h5py.File(back, "r") as b, h5py.File(blosc_trace, "r") as o:
        assert all(GZIP in _filters(p[n]) for n in ("routing/expert", "latents/h", "decoded/final"))
        for name in ("routing/expert", "routing/prob", "latents/h", "routing/counts", "samples/prompt"):
            assert _filters(b[name]) == _filters(o[name]) and b[name].chunks == o[name].chunks
        # unwritten chunks stay unallocated (a reader sees the fill value, the file does not grow)
        assert p["routing/expert"].id.get_num_chunks() == o["routing/expert"].id.get_num_chunks()
    with h5py.File(portable, "r", swmr=True) as f:  # still SWMR-readable
        assert f["/progress/steps"][0] > 0
    with open_trace(portable) as tr:
        assert tr.complete and tr.routing(timestep=1, layer=7).shape == (4, 2, 2, 256)


def test_portable_trace_opens_with_plain_h5py_without_the_plugin(blosc_trace, tmp_path):
    portable = tmp_path / "p.h5"
    convert_trace(blosc_trace, portable)
    with open_trace(blosc_trace) as tr:
        expected = tr.routing()
    r = _plain_h5py(portable, "print(f['/latents/h'][0, 0, 0].dtype, f['/coords/layer'][()].tolist())\n"
                    "print(f['/routing/expert'][()].tobytes().hex())", tmp_path)
    assert r.returncode == 0, r.stderr
    first, routing = r.stdout.splitlines()
    assert first == "float16 [3, 7]"
    assert bytes.fromhex(routing) == expected.tobytes()
    # the Blosc original does not open that way: the failure this mode exists for
    r = _plain_h5py(blosc_trace, "f['/routing/expert'][0]", tmp_path)
    assert r.returncode != 0 and "plugin" in r.stderr


def test_reader_without_plugin_says_what_to_install(blosc_trace, tmp_path):
    portable = convert_trace(blosc_trace, tmp_path / "p.h5")
    joined = join_ranks([blosc_trace], tmp_path / "joined.h5")
    empty = tmp_path / "no_plugins"
    empty.mkdir()
    script = BLOCKED + (
        "from traces import open_trace, TraceError, SamplingWriter, SampleTable\n"
        f"tr = open_trace({str(blosc_trace)!r})\n"
        f"joined = open_trace({str(joined)!r})\n"
        "print('counts', int(tr.counts().sum()))\n"  # unfiltered data still reads
        "for read in (lambda: tr.routing(layer=3), lambda: next(tr.iter_chunks(layer=7)), lambda: joined.routing()):\n"
        "    try:\n        read()\n    except TraceError as e:\n        print('ERR', e)\n"
        f"print('portable', open_trace({str(portable)!r}).routing().shape)\n")
    env = dict(os.environ, HDF5_PLUGIN_PATH=str(empty), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    errors = [line for line in r.stdout.splitlines() if line.startswith("ERR")]
    assert errors == [f"ERR {blosc_trace}: /routing/expert: {plugin_hint('Blosc')}",
                      f"ERR {blosc_trace}: /routing/expert: {plugin_hint('Blosc')}",
                      f"ERR {joined}: /routing/expert: {plugin_hint('Blosc')}"]
    assert "pip install hdf5plugin" in errors[0] and "python -m traces convert --portable" in errors[0]
    assert "portable (4, 2, 3, 2, 2, 256)" in r.stdout


def test_writers_without_plugin(tmp_path):
    """A portable trace is written without hdf5plugin; a default one fails with what to install."""
    empty = tmp_path / "no_plugins"
    empty.mkdir()
    script = BLOCKED + (
        "from traces import SamplingLayout, TraceError\nfrom traces.synthetic import write_synthetic\n"
        "lo = SamplingLayout(n_experts=4, layers=[0], steps=1, tokens=16, timesteps=[0])\n"
        f"write_synthetic({str(tmp_path / 'p.h5')!r}, lo, 2, 2, portable=True)\n"
        f"try:\n    write_synthetic({str(tmp_path / 'b.h5')!r}, lo, 2, 2)\n"
        "except TraceError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HDF5_PLUGIN_PATH=str(empty), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR writing blosc-zstd3+bitshuffle needs hdf5plugin: pip install hdf5plugin" in r.stdout
    with open_trace(tmp_path / "p.h5") as tr:
        assert tr.complete and tr.routing().shape == (2, 1, 1, 1, 1, 16)


def test_training_trace_converts(tmp_path):
    rng = np.random.default_rng(0)
    lo = TrainingLayout(n_experts=8, layers=[1, 2], steps=2, tokens=64, store_prob=True, scalars=("loss", "balance",
                                                                                                  "lr"))
    with TrainingWriter(tmp_path / "t.h5", lo) as w:
        for step in range(3):
            w.write_events(step, np.arange(2), rng.random(2), coherent_routing(rng, (2, 2, 2, 64)))
            w.log(step, loss=1.0 / (step + 1), balance=0.1, lr=1e-4)
    out = convert_trace(tmp_path / "t.h5", tmp_path / "tp.h5")
    _assert_same(_every_dataset(tmp_path / "t.h5"), _every_dataset(out))
    with open_trace(out) as tr:
        assert tr.train()["loss"].tolist() == pytest.approx([1.0, 0.5, 1 / 3])


def test_convert_bad_input_is_one_line_and_leaves_nothing(blosc_trace, tmp_path, capsys):
    out = tmp_path / "out.h5"
    out.write_bytes(b"keep me")
    assert convert_main([str(blosc_trace), str(out), "--portable"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    notes = tmp_path / "notes.h5"
    notes.write_text("not a trace\n")
    for argv in ([str(notes), str(tmp_path / "n.h5")], [str(tmp_path / "missing.h5"), str(tmp_path / "m.h5")],
                 [str(blosc_trace), str(notes / "dir.h5")], [str(blosc_trace)]):  # notes.h5 is no folder
        capsys.readouterr()
        assert convert_main(argv) == 2
        one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blosc.h5", "notes.h5", "out.h5"]
    # overwrite replaces it; a joined trace (virtual datasets) is refused
    assert convert_main([str(blosc_trace), str(out), "--portable", "--overwrite"]) == 0
    joined = join_ranks([blosc_trace], tmp_path / "joined.h5")
    assert convert_main([str(joined), str(tmp_path / "j.h5")]) == 2
    assert "joined trace" in capsys.readouterr().err
    assert not (tmp_path / "j.h5").exists()


def test_python_m_traces_dispatches(blosc_trace, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = lambda *a: subprocess.run([sys.executable, "-m", "traces", *a], env=env, capture_output=True,
                                    text=True, timeout=120)
    r = run("convert", str(blosc_trace), str(tmp_path / "p.h5"), "--portable")
    assert r.returncode == 0 and "portable gzip" in r.stdout, r.stderr
    r = run("bogus")
    assert r.returncode == 2
    one_error_line(r.stderr)

"""`probes.record --portable`: the same trace, gzip-compressed, from the tiny model."""

import h5py
import numpy as np

from probes.record import main as record_main
from traces import open_trace


def test_record_portable_matches_default(tiny_ckpt, tmp_path):
    base = ["--ckpt", str(tiny_ckpt), "--prompts", "a red circle", "--steps", "3", "--probs", "--latent-tokens", "4"]
    assert record_main([*base, "--out", str(tmp_path / "b.h5")]) == 0
    assert record_main([*base, "--out", str(tmp_path / "p.h5"), "--portable"]) == 0
    with h5py.File(tmp_path / "p.h5", "r") as f:
        for name in ("routing/expert", "routing/prob", "latents/h"):
            plist = f[name].id.get_create_plist()
            assert [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == [2, 1]  # shuffle, gzip
    with open_trace(tmp_path / "b.h5") as b, open_trace(tmp_path / "p.h5") as p:
        assert p.complete
        np.testing.assert_array_equal(b.routing(), p.routing())
        np.testing.assert_array_equal(b.prob(), p.prob())

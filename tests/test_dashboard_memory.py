"""The dashboard's memo of derived results is bounded by bytes, least recently used out first."""

import numpy as np

from dashboard.common import make_context
from traces import SampleTable, SamplingLayout, SamplingWriter


def test_memo_is_bounded_by_bytes(tmp_path):
    path = tmp_path / "t.h5"
    lo = SamplingLayout(n_experts=2, layers=[1], steps=1, tokens=4, timesteps=[0], timestep_values=[500.0])
    with SamplingWriter(path, lo, SampleTable(prompt=["a"], seed=[0])) as w:
        w.begin_batch(1)
        w.write_timestep(0, np.zeros((1, 1, 1, 1, 4), np.uint8))
    ctx = make_context([str(path)], permutations=0)
    ctx.memo_budget = 3.5 * 2**20  # three of the 1 MiB values below
    tid = ctx.registry.ids()[0]
    calls = []

    def mib(i):
        calls.append(i)
        return {"x": np.zeros(2**20 // 8), "i": i}  # 1 MiB

    for i in range(3):
        ctx.cached(tid, "block", lambda i=i: mib(i), i)
    ctx.cached(tid, "block", lambda: mib(0), 0)  # a hit: 0 becomes the most recently used
    ctx.cached(tid, "block", lambda: mib(3), 3)  # over budget: 1, the least recently used, goes
    assert calls == [0, 1, 2, 3]
    assert ctx.memo_bytes() <= ctx.memo_budget
    assert [k[-1] for k in ctx.memo] == [2, 0, 3]
    ctx.cached(tid, "block", lambda: mib(1), 1)
    assert calls[-1] == 1  # recomputed after eviction
    ctx.registry.close()

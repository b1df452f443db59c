"""Size estimate accuracy and routing storage cost on realistic coherent routing."""

from __future__ import annotations

import os

import numpy as np

from traces import SamplingLayout, TrainingLayout, TrainingWriter, estimate_sampling, estimate_training, open_trace
from traces.synthetic import coherent_routing, write_synthetic


def _within(est: int, real: int, tol: float = 0.2) -> bool:
    return abs(est - real) <= tol * real


def test_estimate_within_20_percent_routing_only(tmp_path):
    lo = SamplingLayout(n_experts=8, layers=[0, 4, 8, 12], steps=5, tokens=1024, timesteps=list(range(8)),
                        branches=("cond", "uncond"))
    est = estimate_sampling(lo, 8)
    assert list(tmp_path.iterdir()) == []  # estimating writes nothing
    path = write_synthetic(tmp_path / "r.h5", lo, n_samples=8, batch=4)
    real = os.path.getsize(path)
    assert _within(est.total, real), (est.total, real)
    assert est.upper_bound > real


def test_estimate_within_20_percent_everything(tmp_path):
    rng = np.random.default_rng(0)
    lo = SamplingLayout(n_experts=8, layers=[3, 7], steps=3, tokens=1024, timesteps=list(range(6)),
                        store_prob=True, latent_tokens=list(range(0, 1024, 16)), latent_dim=32,
                        projection=rng.normal(size=(96, 32)), image_shape=(64, 64, 3))
    est = estimate_sampling(lo, 6)
    real = os.path.getsize(write_synthetic(tmp_path / "all.h5", lo, n_samples=6, batch=3))
    assert _within(est.total, real), (str(est), real)


def test_estimate_training_within_20_percent(tmp_path):
    rng = np.random.default_rng(3)
    lo = TrainingLayout(n_experts=8, layers=[1, 2], steps=5, tokens=1024)
    with TrainingWriter(tmp_path / "t.h5", lo) as w:
        for step in range(20):
            w.write_events(step, np.arange(8), rng.random(8), coherent_routing(rng, (8, 2, 5, 1024)))
            w.log(step, loss=1.0, balance=0.1)
    real = os.path.getsize(tmp_path / "t.h5")
    est = estimate_training(lo, n_events=160, n_logs=20)
    assert _within(est.total, real), (str(est), real)


def test_routing_costs_at_most_0_4_bytes_per_record(tmp_path):
    lo = SamplingLayout(n_experts=8, layers=[0, 1, 2, 3], steps=5, tokens=4096, timesteps=list(range(4)))
    path = write_synthetic(tmp_path / "b.h5", lo, n_samples=4, batch=4)
    with open_trace(path) as r:
        d = r.dataset("/routing/expert")
        bpr = d.id.get_storage_size() / d.size
    assert bpr <= 0.4, bpr


def test_portable_estimate_within_20_percent(tmp_path):
    lo = SamplingLayout(n_experts=8, layers=[0, 4, 8, 12], steps=5, tokens=1024, timesteps=list(range(8)),
                        branches=("cond", "uncond"))
    est = estimate_sampling(lo, 8, portable=True)
    real = os.path.getsize(write_synthetic(tmp_path / "p.h5", lo, n_samples=8, batch=4, portable=True))
    assert _within(est.total, real), (est.total, real)
    assert est.total > estimate_sampling(lo, 8).total  # gzip costs more than Blosc

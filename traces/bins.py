"""Timestep bins: the one rule every part of the toolkit uses to put a timestep into one of
`n_bins` equal-width bins (the report, the dashboard, the evaluation's routing figures and the
routing-value probe).

It lives in `traces` because it is pure numpy about a trace coordinate and `traces` is the lowest
package both `rsr_model` (evaluation) and `probes` may import; `rsr_model/flow.py` would pull torch
and diffusers into the report and the dashboard.

What is binned is the caller's choice of axis, and that choice is the only difference between the
conventions:

* sampling traces bin the sampler position of each recorded timestep (0 = first sampler call =
  noisiest): `timestep_bins(position, n, 0, n_timesteps)`, bin 0 the noisiest. A sampler's steps
  are not evenly spaced in t (shifted schedules), so binning by position gives every bin the
  same number of sampler calls;
* training traces bin the events' timestep values between the smallest and largest recorded:
  `timestep_bins(t, n, t_min, t_max)`, bin 0 the *least* noisy (training draws t at random, so
  there is no sampler order);
* the evaluation and `probes.routing_value` bin sigma = t / 1000 over [0, 1], noisiest first:
  `timestep_bins(1000 - t, n, 0, 1000)`.

Compare bins across conventions by their timestep range (the report's `t_min` / `t_max`), not by
index.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def timestep_bins(x: ArrayLike, n_bins: int, lo: float, hi: float) -> np.ndarray:
    """Bin index (int64, same shape as `x`) of equal-width bins over [lo, hi]:
    floor((x - lo) * n_bins / (hi - lo)), values outside (and x == hi) clipped into the first or
    last bin. With hi <= lo every value falls in bin 0. Integer positions give exactly
    `(position * n_bins) // n` (the product is taken before the division)."""
    x = np.asarray(x, dtype=np.float64)
    n_bins = max(1, int(n_bins))
    width = float(hi) - float(lo)
    if width <= 0:
        return np.zeros(x.shape, np.int64)
    b = np.floor((x - float(lo)) * n_bins / width)
    return np.clip(b, 0, n_bins - 1).astype(np.int64)


def timestep_bin_edges(n_bins: int, lo: float, hi: float) -> np.ndarray:
    """The n_bins + 1 edges of the bins of `timestep_bins`: bin b covers [edges[b], edges[b+1])."""
    return np.linspace(float(lo), float(hi), max(1, int(n_bins)) + 1)

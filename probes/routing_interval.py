"""Figures of a routing-value measurement and their intervals (`probes.routing_value`).

Every condition's losses are an array (sets, draws, bins, n): held-out sets (independent data streams),
random draws (1 for a deterministic condition), timestep bins and paired samples (the same x_t, t and
noise under every condition). A figure is a function of the per-bin mean losses, with every bin
weighted equally: the relative change is taken per bin, then averaged over bins, so high-noise bins
(mostly irreducible loss) do not outweigh the others, as they did in schema version 1's ratio of sums.

The 95% interval is a percentile bootstrap that resamples all three sources of variation at once:
held-out sets with replacement, samples within each (set, bin) (paired across conditions), and each
random condition's draws (independently per condition). Schema version 1 averaged the draws before
the bootstrap and so left their variance out. With 2-3 held-out sets the set level is resampled
crudely; it widens the interval when the sets disagree, it cannot estimate that spread well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Figure = Callable[[dict[str, np.ndarray]], np.ndarray]  # per-bin means by condition -> value(s)


def relative_gain(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean over bins (last axis) of 1 - a/b: how much lower condition a's loss is than b's, bins weighted
    equally; bins where b has no loss count 0."""
    ratio = np.where(b > 0, a / np.where(b > 0, b, 1.0), 1.0)
    return (1.0 - ratio).mean(-1)


def routing_share(gate: np.ndarray, random: np.ndarray, none: np.ndarray) -> np.ndarray:
    """(L_random - L_gate) / (L_none - L_gate), each bin relative to its gate loss, bins weighted equally:
    the part of the adapters' gain that is lost when the routing is randomised. NaN where the adapters
    change nothing (no gain to share)."""
    safe = np.where(gate > 0, gate, 1.0)
    num = ((random - gate) / safe).mean(-1)
    den = ((none - gate) / safe).mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(den) > 1e-12, num / np.where(np.abs(den) > 1e-12, den, 1.0), np.nan)


@dataclass
class Resampler:
    """One bootstrap design shared by every condition of a scope (so conditions stay paired)."""

    sets: np.ndarray  # (n_boot, S) chosen held-out sets
    samples: np.ndarray  # (n_boot, S, bins, n) chosen samples within each chosen (set, bin)
    rng: np.random.Generator

    @classmethod
    def new(cls, S: int, bins: int, n: int, n_boot: int, seed: int) -> "Resampler":
        rng = np.random.default_rng(seed)
        return cls(rng.integers(0, S, (n_boot, S)), rng.integers(0, n, (n_boot, S, bins, n)), rng)

    def bin_means(self, x: np.ndarray) -> np.ndarray:
        """(n_boot, bins) resampled per-bin means of x (S, D, bins, n); the draws are resampled too."""
        n_boot, S = self.sets.shape
        D = x.shape[1]
        xs = x[self.sets]  # (n_boot, S, D, bins, n)
        if D > 1:
            draws = self.rng.integers(0, D, (n_boot, S, D))
            xs = np.take_along_axis(xs, draws[..., None, None], axis=2)
        xs = np.take_along_axis(xs, self.samples[:, :, None, :, :], axis=4)
        return xs.mean(axis=(1, 2, 4))


def bin_means(x: np.ndarray) -> np.ndarray:
    """(bins,) per-bin mean of x (S, D, bins, n) over sets, draws and samples."""
    return x.mean(axis=(0, 1, 3))


def estimate(losses: dict[str, np.ndarray], figure: Figure, res: Resampler) -> tuple[float, list[float]]:
    """The figure on all the data, and its 95% bootstrap interval (NaN replicates dropped)."""
    point = float(figure({k: bin_means(v) for k, v in losses.items()}))
    boot = np.asarray(figure({k: res.bin_means(v) for k, v in losses.items()}), float)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return point, [float("nan"), float("nan")]
    return point, [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]

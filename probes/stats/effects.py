"""Summaries of an intervention's effect on model outputs (ablating / forcing an expert).

The intervention itself runs elsewhere (the model's hooks); this module only
compares outputs ``y`` (baseline) and ``y'`` (intervened), sample by sample along
the first axis:

* mean squared change ``MSE = mean (y' - y)^2`` over all elements;
* relative change per sample ``||y' - y|| / ||y||`` (scale-free: how large the
  effect is compared with the output itself), averaged over samples;
* pooled relative change ``sqrt(sum ||y' - y||^2 / sum ||y||^2)``, robust to
  samples with tiny outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .running import ArrayResult, Stat, safe_div


@dataclass
class EffectSummary(ArrayResult):
    mse: float
    relative_change: float
    relative_change_std: float
    pooled_relative_change: float
    n_samples: int


class EffectAccumulator(Stat):
    """Streaming version: ``update(baseline, intervened)`` per chunk of samples (axis 0)."""

    def __init__(self) -> None:
        # 0-d arrays (updated in place), so that they are the state of the Stat contract
        self._sq = np.zeros(())  # sum (y' - y)^2
        self._ref = np.zeros(())  # sum y^2
        self._elems = np.zeros((), np.int64)
        self._rel = np.zeros(())
        self._rel2 = np.zeros(())
        self._n = np.zeros((), np.int64)
        self._n_rel = np.zeros((), np.int64)  # samples with a non-zero baseline (relative change defined)

    def update(self, baseline: np.ndarray, intervened: np.ndarray) -> None:
        y = np.asarray(baseline, dtype=np.float64)
        z = np.asarray(intervened, dtype=np.float64)
        if y.shape != z.shape:
            raise ValueError("baseline and intervened outputs must have the same shape")
        y2 = y.reshape(len(y), -1)
        d2 = (z - y).reshape(len(y), -1)
        dsq = np.sum(d2**2, axis=1)
        ysq = np.sum(y2**2, axis=1)
        rel = np.sqrt(safe_div(dsq, ysq))
        self._sq += float(dsq.sum())
        self._ref += float(ysq.sum())
        self._elems += d2.size
        self._rel += float(np.nansum(rel))
        self._rel2 += float(np.nansum(rel**2))
        self._n += len(y)
        self._n_rel += int(np.isfinite(rel).sum())

    def result(self) -> EffectSummary:
        mean_rel = float(self._rel / self._n_rel) if self._n_rel else float("nan")
        var = float(self._rel2 / self._n_rel) - mean_rel**2 if self._n_rel else float("nan")
        return EffectSummary(
            mse=float(self._sq / self._elems) if self._elems else float("nan"),
            relative_change=mean_rel,
            relative_change_std=float(np.sqrt(max(var, 0.0))),
            pooled_relative_change=float(np.sqrt(self._sq / self._ref)) if self._ref > 0 else float("nan"),
            n_samples=int(self._n),
        )


def effect_summary(baseline: np.ndarray, intervened: np.ndarray) -> EffectSummary:
    """One-shot :class:`EffectSummary` of outputs with and without an intervention."""
    acc = EffectAccumulator()
    acc.update(baseline, intervened)
    return acc.result()

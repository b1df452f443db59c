"""Expert transitions across recursion steps: does a token keep its expert?

For ids ``e_l`` of the same token at consecutive recursion steps ``l, l+1`` the
joint count table ``C[i, j] = #{e_l = i, e_{l+1} = j}`` gives

* the transition matrix ``T[i, j] = P(e_{l+1} = j | e_l = i) = C[i, j] / sum_j C[i, j]``;
* persistence ``sum_i C[i, i] / N``, the share of tokens that keep their expert;
* its chance level ``sum_k p_k q_k`` with ``p, q`` the expert shares at steps
  ``l`` and ``l+1`` (= ``sum_k p_k^2`` when the shares are the same), i.e. the
  persistence expected if the two choices were independent;
* the conditional entropy ``H(e_{l+1} | e_l) = H(e_l, e_{l+1}) - H(e_l)`` (nats):
  0 when the next expert is determined by the current one, ``H(e_{l+1})`` when
  independent; and the MI between consecutive steps.

This is the recursion-step analogue of OLMoE's cross-layer routing counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .information import conditional_entropy, mutual_information
from .running import ArrayResult, GroupedCounts, Stat, entropy, safe_div
from .stability import agreement_vs_chance


@dataclass
class TransitionStats(ArrayResult):
    """Transition statistics per group (``matrix`` adds ``(K, K)``).

    matrix:            P(e_{l+1} = j | e_l = i) (rows with no tokens are NaN).
    persistence:       share of tokens with e_{l+1} = e_l (trace mass of the joint table).
    chance:            sum_k p_k q_k, persistence expected under independence.
    persistence_lift:  persistence / chance.
    cond_entropy:      H(e_{l+1} | e_l) in nats.
    next_entropy:      H(e_{l+1}) in nats (the conditional entropy's ceiling).
    mi:                I(e_l; e_{l+1}) = next_entropy - cond_entropy (plug-in, nats).
    n:                 tokens counted.
    """

    matrix: np.ndarray
    persistence: np.ndarray
    chance: np.ndarray
    persistence_lift: np.ndarray
    cond_entropy: np.ndarray
    next_entropy: np.ndarray
    mi: np.ndarray
    n: np.ndarray


def transition_stats(joint: np.ndarray) -> TransitionStats:
    """Statistics from joint counts ``(..., K, K)`` of (expert at l, expert at l+1)."""
    c = np.asarray(joint, dtype=np.float64)
    n, persistence, chance = agreement_vs_chance(c)  # same expert at l and l+1, vs independent steps
    return TransitionStats(
        matrix=safe_div(c, c.sum(axis=-1, keepdims=True)),
        persistence=persistence,
        chance=chance,
        persistence_lift=safe_div(persistence, chance),
        cond_entropy=conditional_entropy(c),
        next_entropy=entropy(c.sum(axis=-2), axis=-1),
        mi=mutual_information(c),
        n=n.astype(np.int64),
    )


class TransitionAccumulator(Stat):
    """Streaming joint counts of (expert at step l, expert at step l+1).

    Two ways to feed it:

    * ``update(prev_ids, next_ids, *groups)`` for any pair of routings of the same
      tokens (group arrays broadcast to the ids);
    * ``update_steps(ids, step_axis, *groups)`` with all ``L`` recursion steps of a
      chunk at once; every consecutive pair ``(l, l+1)`` is counted with the
      transition index ``l`` as the *last* group axis, so construct it with
      ``group_shape=(..., L-1)``.  Other group arrays must broadcast to the ids
      with the step axis removed.
    """

    def __init__(self, n_experts: int, group_shape: Sequence[int] = ()) -> None:
        self.n_experts = int(n_experts)
        self.counts = GroupedCounts((self.n_experts, self.n_experts), group_shape)

    def update(self, prev_ids: np.ndarray, next_ids: np.ndarray, *groups: np.ndarray | int) -> None:
        self.counts.update([prev_ids, next_ids], groups)

    def update_steps(self, ids: np.ndarray, step_axis: int, *groups: np.ndarray | int) -> None:
        a = np.moveaxis(np.asarray(ids), step_axis, -2)  # (..., L, T)
        n_steps = a.shape[-2]
        if self.counts.group_shape[-1:] != (n_steps - 1,):
            raise ValueError("the last group axis must have length L-1 for update_steps")
        step = np.arange(n_steps - 1).reshape(-1, 1)
        extra = [np.expand_dims(np.asarray(g), -2) if np.ndim(g) else g for g in groups]
        self.counts.update([a[..., :-1, :], a[..., 1:, :]], extra + [step])

    def add_counts(self, counts: np.ndarray, at: tuple | None = None) -> None:
        """Fold in pre-counted (from, to) tables (see :meth:`GroupedCounts.add_counts`)."""
        self.counts.add_counts(counts, at)

    def table(self) -> np.ndarray:
        return self.counts.result()

    def result(self) -> TransitionStats:
        return transition_stats(self.table())

"""Statistics the dashboard shows that the report does not hold, computed from a trace on demand.

Each function reads only the chunks it needs (through `TraceReader`), folds them with the
`probes.stats` primitives, and returns plain arrays / dicts. The dashboard draws these and
computes nothing itself.

* `expert_position_counts` -- how often each expert is chosen at each token (heat maps)
* `position_lift`          -- those counts as lift P(expert | token) / P(expert)
* `share_difference`       -- load share of one report minus another's, per layer and step
* `top_tokens`             -- the tokens an expert is most confident on (image crops)
* `transition_flows`       -- recursion-step flows (Sankey links) from a report's transitions
* `bin_transitions`        -- transition matrices of one timestep bin (the report keeps only its scalars)
* `flat_gate`              -- whether a gate's top-1 choice is decided by a negligible margin

Quantities the report also holds are not here (issue 18: one function per quantity): the
training curves are the report's `training_curves` family, Figure 3 is `probes.trajectories`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from traces import TraceReader

from .verdict import FLAT_MARGIN

# `probes.stats` (which loads scikit-learn) is imported inside the functions that count: the
# dashboard imports this module at start-up and needs only the light helpers for its first page.

# A mean top-1 margin below this (probability units) means the argmax is decided by noise-level
# differences between near-equal gate probabilities.
FLAT_GATE_MARGIN = FLAT_MARGIN  # one threshold for the report's verdicts and the views


def flat_gate(gate: dict[str, Any] | None, threshold: float = FLAT_GATE_MARGIN) -> bool:
    """True when a report's GateStats say the top-1 choice rests on a tiny margin."""
    margin = (gate or {}).get("mean_margin")
    return margin is not None and np.isfinite(margin) and margin < threshold


def expert_position_counts(tr: TraceReader, layer: int, step: int, timestep: int | None = None,
                           branch: str | int | None = None) -> np.ndarray:
    """(K, n_tokens) counts of each expert at each stored token over the written samples (and
    timesteps, unless one is given); ids >= K (unwritten, ablated) are not counted."""
    from .stats import counts_from_ids

    K = len(tr.coords["expert"])
    n_tok = len(tr.coords["token"])
    out = np.zeros((K, n_tok), np.int64)
    tok = np.arange(n_tok)
    for blk in tr.iter_chunks("/routing/expert", timestep=timestep, branch=branch, layer=layer, step=step):
        ids = blk.data.reshape(-1, n_tok)
        valid = ids < K
        rows = np.broadcast_to(tok, ids.shape)
        out += counts_from_ids(rows[valid] * K + ids[valid], K * n_tok).reshape(n_tok, K).T
    return out


def position_lift(counts: np.ndarray) -> np.ndarray:
    """Lift P(k | token) / P(k) from (K, n_tokens) counts; NaN where a token has no records."""
    counts = np.asarray(counts, float)
    per_token = counts.sum(axis=0)
    share = counts.sum(axis=1) / max(counts.sum(), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts / per_token) / share[:, None]


def timestep_axis(report: dict) -> np.ndarray:
    """The timesteps a report's per-cell shares run over: the recorded timestep values of a sampling
    trace, the bin centres of a training trace (in the report's order)."""
    if report["trace"]["kind"] == "sampling":
        return np.asarray(report["trace"]["timestep_values"], float)
    return np.asarray([0.5 * (b["t_min"] + b["t_max"]) for b in report["timestep_bins"]])


def timestep_lift(report: dict, cell: dict) -> np.ndarray:
    """(timestep, K) lift over 1/K (share x K: 1 = uniform, K = the expert takes every token) of one
    (layer, step) cell of a report, along `timestep_axis`."""
    if report["trace"]["kind"] == "sampling":
        share = np.asarray(cell["share_by_timestep"]["share"], float)
    else:
        share = np.asarray([b["share"] for b in cell["load_by_timestep_bin"]], float)
    return share * report["trace"]["experts"]


def share_difference(a: dict, b: dict) -> dict[str, list[float]]:
    """{"<layer> <step>": share_b - share_a per expert} for the (layer, step) cells both reports hold."""
    out = {}
    for layer, lo in a["layers"].items():
        for step, d in lo["steps"].items():
            other = b["layers"].get(layer, {}).get("steps", {}).get(step)
            if other is not None:
                out[f"{layer} {step}"] = (np.asarray(other["load"]["share"], float)
                                          - np.asarray(d["load"]["share"], float)).tolist()
    return out


def top_tokens(tr: TraceReader, expert: int, layer: int, step: int, n: int = 20) -> list[dict[str, Any]]:
    """The n tokens with the highest gate probability for `expert` among tokens routed to it
    (by stored id when the trace has no probabilities), with their grid position; `sample` and
    `timestep` are positions on those axes."""
    has_prob = tr.has("/routing/prob")
    path = "/routing/prob" if has_prob else "/routing/expert"
    # Blocks carry coordinate values; selections and the result use positions on each axis.
    sample_pos = tr.sample_rows()
    time_pos = {int(v): i for i, v in enumerate(tr.coords["timestep"])}
    best: list[tuple[float, dict]] = []
    for blk in tr.iter_chunks(path, layer=layer, step=step):
        c = blk.coords
        s, t = sample_pos[int(c["sample"])], time_pos[int(c["timestep"])]
        ids = tr.routing(sample=s, branch=str(c["branch"]), timestep=t, layer=layer, step=step) if has_prob \
            else blk.data
        score = blk.data[..., expert].astype(np.float64) if has_prob else np.ones(ids.shape)
        score = np.where(ids == expert, score, -np.inf).reshape(-1)
        for i in np.argsort(score)[::-1][:n]:
            if not np.isfinite(score[i]):
                break
            best.append((float(score[i]), {"sample": s, "branch": str(c["branch"]),
                                           "timestep": t, "timestep_value": c["timestep_value"],
                                           "token": int(tr.coords["token"][i]), "prob": float(score[i])
                                           if has_prob else None}))
        best = sorted(best, key=lambda x: -x[0])[:n]
    return [d for _, d in best]


def transition_flows(report: dict, layer: str, time_bin: int | None = None) -> dict[str, Any]:
    """Sankey links between consecutive recursion steps: flow(i at s -> j at s+1) =
    share_s(i) * P(j at s+1 | i at s), from the report's load shares and transition matrices
    (both over the stored tokens; per timestep bin when `time_bin` is given). Also returns
    the chance flow share_s(i) * share_{s+1}(j) of independent steps."""
    lo = report["layers"][layer]
    steps = list(lo["steps"])
    links = []
    for a, b in zip(steps, steps[1:]):
        tr_ = lo["transitions"].get(f"{a}->{b}")
        if tr_ is None:
            continue
        if time_bin is None:
            m, sa, sb = tr_["matrix"], lo["steps"][a]["load"]["share"], lo["steps"][b]["load"]["share"]
        else:
            m = tr_["by_timestep_bin"][time_bin]["matrix"]
            sa = lo["steps"][a]["load_by_timestep_bin"][time_bin]["share"]
            sb = lo["steps"][b]["load_by_timestep_bin"][time_bin]["share"]
        m = np.nan_to_num(np.asarray(m, float))
        sa, sb = np.nan_to_num(np.asarray(sa, float)), np.nan_to_num(np.asarray(sb, float))
        links.append({"from_step": a, "to_step": b, "flow": (sa[:, None] * m).tolist(),
                      "chance": (sa[:, None] * sb[None, :]).tolist()})
    return {"steps": steps, "links": links}


def bin_transitions(tr: TraceReader, layer: int, timesteps: list[int]) -> dict[str, Any]:
    """Recursion-step transitions of one layer over the sampler timesteps `timesteps` (`timestep`
    coordinate values: a report timestep bin's `timesteps`), counted from the trace over every sample,
    branch and token: the per-bin matrices the report leaves out. Report-shaped, so `transition_flows` reads it:
    {"steps": {step: {"load": {"share": [K]}}}, "transitions": {"a->b": TransitionStats with matrix}}."""
    from .stats import transition_stats

    K = len(tr.coords["expert"])
    steps = [str(int(s)) for s in tr.coords["step"]]
    at = tr.index("timestep", list(timesteps))
    ids = tr.routing(layer=layer)[:, :, at]  # (sample, branch, bin timesteps, step, token)
    clipped = np.minimum(ids, K).astype(np.int64)  # unwritten / ablated ids -> slot K, dropped below
    out: dict[str, Any] = {"steps": {}, "transitions": {}}
    for s, name in enumerate(steps):
        counts = np.bincount(clipped[..., s, :].reshape(-1), minlength=K + 1)[:K]
        out["steps"][name] = {"load": {"share": (counts / max(counts.sum(), 1)).tolist()}}
    for s in range(len(steps) - 1):
        pair = (clipped[..., s, :] * (K + 1) + clipped[..., s + 1, :]).reshape(-1)
        joint = np.bincount(pair, minlength=(K + 1) ** 2).reshape(K + 1, K + 1)[:K, :K]
        stats = transition_stats(joint)
        out["transitions"][f"{steps[s]}->{steps[s + 1]}"] = {
            name: np.asarray(getattr(stats, name)).tolist() for name in
            ("matrix", "persistence", "chance", "persistence_lift", "cond_entropy", "next_entropy", "mi", "n")}
    return out

"""Probes over a trace: issue 5's statistics, keyed by layer and recursion step.

`analyze(reader)` makes one streaming pass over the trace with `TraceReader.iter_chunks`
(one chunk cell = one (sample, branch, timestep) of a sampling trace, one event of a training
trace) and folds every block into the fixed-size accumulators of `probes.stats`; memory is
bounded by one chunk plus one sample's routing (kept for the seed / branch comparisons) plus
the latent subsample (`max_latent_points`). The result is a JSON-ready dict (see
`probes/report.py` for the documented structure).

Conventions
-----------
* Expert ids >= K (255 unwritten, 254 ablated by an intervention) are invalid and are left
  out of every statistic; `notes` says how many were seen.
* Timestep bins: sampling traces bin the *recorded* sampler steps in sampler order (bin 0 =
  the noisiest), `n_bins` equal groups of consecutive recorded timesteps; training traces bin
  the events' timestep values into `n_bins` equal-width bins between their min and max.
* Load statistics use `/routing/counts` (all tokens, even with a token stride); everything
  else uses the stored expert ids of the stored tokens.
* Labels for the mutual information: timestep bin, recursion step, spatial position bin
  (a grid of at most 4x4 regions of the token grid), guidance branch, prompt, the prompt's
  scene attributes from `/samples/scene` (colour, shape and count of the caption's first
  object group, the relation or "none"), and the class label. A label with one value only is
  skipped. Prompt attributes describe the *prompt*, so every branch (also the unconditional
  one, which does not see the prompt) is counted with them; read `branch` MI next to them.
* Stability: seeds = each sample against the first sample of the same prompt (same branch,
  timestep, layer, step, token); adjacent timesteps = each recorded timestep against the
  next recorded one (grouped by the earlier one's bin); branches = every branch against the
  first ("cond" first in recorded traces). Checkpoints: `compare_traces(a, b)`.
* Spatial coherence needs the full token grid: when the stored tokens are not all
  `h*w` tokens (a stride or subset), it is skipped with a note. A map holding an invalid id
  is skipped.
* Transitions and convergence need consecutive recorded recursion steps (and >= 2, >= 3).
* z-loss needs router logits; traces store probabilities only, so z-loss is reported as null
  with a note, and the balance monitor K sum f P is computed from the stored probabilities.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traces import TraceReader, open_trace

from .stats import (
    TRAJECTORY_LABELS,
    AgreementAccumulator,
    ContingencyAccumulator,
    ConvergenceAccumulator,
    GateAccumulator,
    SpatialCoherenceAccumulator,
    TransitionAccumulator,
    agreement_stats,
    linear_probe,
    load_stats,
    mi_summary,
)

REPORT_SCHEMA = "rsr-report"
REPORT_VERSION = 1
POSITION_GRID = 4  # position labels: at most POSITION_GRID x POSITION_GRID regions


# --------------------------------------------------------------------------- helpers


def jsonable(x: Any) -> Any:
    """numpy -> python, NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _take(d: dict, idx: tuple) -> dict:
    """Index every array field of a stats dict (from `to_dict`-able dataclasses) at `idx`."""
    out = {}
    for k, v in d.items():
        a = np.asarray(v)
        out[k] = a[idx] if a.ndim >= len(idx) else a
    return out


def _stats_at(stats, idx: tuple, drop: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in _take(stats.__dict__, idx).items() if k not in drop}


def scene_attributes(scene: Any) -> dict[str, str]:
    """Prompt attributes of one sample's scene: colour, shape, count of the first object
    group, and the relation ("none" without one). Empty dict if the scene is not parseable."""
    if not isinstance(scene, dict) or not scene.get("caption"):
        return {}
    try:
        from rsr_model.data.shapes import parse_caption

        spec = parse_caption(scene["caption"])
    except Exception:  # noqa: BLE001 - a foreign caption is just "no attributes"
        return {}
    if not spec.groups:
        return {}
    g = spec.groups[0]
    return {"colour": str(g.colour), "shape": str(g.shape), "count": str(g.count),
            "relation": str(spec.relation) if spec.relation else "none"}


@dataclass
class _Label:
    name: str
    values: list  # label names, index = code
    kind: str  # "block" (one code per chunk), "step", "position"
    codes: Any = None  # per sample (block labels from samples) or array


@dataclass
class Options:
    n_bins: int = 4
    n_perm: int = 199
    max_latent_points: int = 20000
    probe_max_samples: int = 2000
    probe_splits: int = 3
    probe_C: float = 0.1  # L2-regularised: converges in ~100 lbfgs iterations on float16 latents
    seed: int = 0
    linear_probes: bool = True


# --------------------------------------------------------------------------- main pass


@dataclass
class _Grid:
    K: int
    layers: list
    steps: list
    tokens: np.ndarray
    grid: tuple[int, int] | None
    full_grid: bool
    consecutive_steps: bool
    n_bins: int
    bin_of: Any  # callable block coords -> bin
    bins: list  # per bin description
    branches: list = field(default_factory=list)
    timesteps: np.ndarray | None = None
    timestep_values: np.ndarray | None = None


def _token_grid(tr: TraceReader, n_tokens_stored: np.ndarray) -> tuple[tuple[int, int] | None, bool]:
    g = tr.attrs.get("token_grid")
    grid = None
    if isinstance(g, (list, tuple, np.ndarray)) and len(g) == 2:
        grid = (int(g[0]), int(g[1]))
    else:
        n = int(n_tokens_stored.max()) + 1 if n_tokens_stored.size else 0
        side = math.isqrt(n)
        if side * side == n and np.array_equal(n_tokens_stored, np.arange(n)):
            grid = (side, side)
    full = grid is not None and np.array_equal(n_tokens_stored, np.arange(grid[0] * grid[1]))
    return grid, full


def _setup(tr: TraceReader, opt: Options) -> _Grid:
    K = int(len(tr.coords["expert"]))
    layers = [int(x) for x in tr.coords["layer"]]
    steps = [int(x) for x in tr.coords["step"]]
    tokens = np.asarray(tr.coords["token"], dtype=np.int64)
    grid, full = _token_grid(tr, tokens)
    consecutive = len(steps) >= 2 and all(b == a + 1 for a, b in zip(steps, steps[1:]))
    if tr.kind == "sampling":
        ts = np.asarray(tr.coords["timestep"])
        tv = np.asarray(tr.coords["timestep_value"], dtype=float)
        nT = len(ts)
        nb = max(1, min(opt.n_bins, nT))
        pos_of = {int(t): i for i, t in enumerate(ts)}
        tbin = (np.arange(nT) * nb) // nT
        bins = [{"bin": b, "timesteps": ts[tbin == b].tolist(), "timestep_values": tv[tbin == b].tolist(),
                 "t_max": float(tv[tbin == b].max()), "t_min": float(tv[tbin == b].min())} for b in range(nb)]
        return _Grid(K, layers, steps, tokens, grid, full, consecutive, nb,
                     lambda c: int(tbin[pos_of[int(c["timestep"])]]), bins,
                     branches=[str(b) for b in tr.coords["branch"]], timesteps=ts, timestep_values=tv)
    ev = tr.events()
    t = np.asarray(ev["timestep"], dtype=float)
    nb = max(1, opt.n_bins)
    lo, hi = (float(t.min()), float(t.max())) if t.size else (0.0, 1000.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, nb + 1)

    def bin_of(c):
        return int(np.clip(np.searchsorted(edges, c["timestep"], side="right") - 1, 0, nb - 1))

    bins = [{"bin": b, "t_min": float(edges[b]), "t_max": float(edges[b + 1])} for b in range(nb)]
    return _Grid(K, layers, steps, tokens, grid, full, consecutive, nb, bin_of, bins, branches=["train"])


def _labels(tr: TraceReader, g: _Grid) -> tuple[list[_Label], list[str]]:
    """The discrete labels for MI / lift, and notes about skipped ones."""
    notes: list[str] = []
    out: list[_Label] = []
    if g.n_bins > 1:
        out.append(_Label("timestep_bin", list(range(g.n_bins)), "bin"))
    if len(g.steps) > 1:
        out.append(_Label("recursion_step", g.steps, "step"))
    if g.grid is not None:
        h, w = g.grid
        ph, pw = min(POSITION_GRID, h), min(POSITION_GRID, w)
        r, c = g.tokens // w, g.tokens % w
        codes = (r * ph // h) * pw + (c * pw // w)
        out.append(_Label("position", [f"r{i // pw}c{i % pw}" for i in range(ph * pw)], "position", codes))
    else:
        notes.append("position MI skipped: token grid unknown")
    if tr.kind == "sampling":
        if len(g.branches) > 1:
            out.append(_Label("branch", g.branches, "branch"))
        s = tr.samples()
        per_sample: dict[str, list] = {"prompt": list(s["prompt"])}
        attrs = [scene_attributes(x) for x in s["scene"]]
        for a in ("colour", "shape", "count", "relation"):
            per_sample[a] = [x.get(a, "?") for x in attrs]
        lab = np.asarray(s["label"])
        if lab.size and (lab >= 0).all():
            per_sample["class"] = [str(int(x)) for x in lab]
        seen: dict[tuple, str] = {}
        for name, vals in per_sample.items():
            uniq = sorted(set(vals))
            if len(uniq) < 2:
                notes.append(f"{name} MI skipped: one value only ({uniq[0] if uniq else 'none'})")
                continue
            code = {v: i for i, v in enumerate(uniq)}
            codes = np.array([code[v] for v in vals])
            first = {}
            part = tuple(first.setdefault(c, len(first)) for c in codes.tolist())  # canonical partition
            if part in seen:
                notes.append(f"{name} MI skipped: same partition of the samples as {seen[part]}")
                continue
            seen[part] = name
            out.append(_Label(name, uniq, "sample", codes))
    else:
        lab = np.asarray(tr.events()["label"])
        if lab.size and (lab >= 0).all() and len(np.unique(lab)) > 1:
            uniq = sorted(np.unique(lab).tolist())
            code = {v: i for i, v in enumerate(uniq)}
            out.append(_Label("class", [str(u) for u in uniq], "event", np.array([code[v] for v in lab.tolist()])))
    return out, notes


class _Pass:
    """All accumulators of the main streaming pass."""

    def __init__(self, tr: TraceReader, g: _Grid, labels: list[_Label], opt: Options) -> None:
        self.tr, self.g, self.labels, self.opt = tr, g, labels, opt
        K, nl, ns, nb = g.K, len(g.layers), len(g.steps), g.n_bins
        self.nB = len(g.branches)
        self.nT = len(g.timesteps) if g.timesteps is not None else 0
        self.Lg = np.arange(nl).reshape(-1, 1, 1)
        self.Sg = np.arange(ns).reshape(1, -1, 1)
        # load from counts: (layer, step, timestep|bin, branch, K)
        self.by_time = tr.kind == "sampling"
        self.counts = np.zeros((nl, ns, self.nT if self.by_time else nb, self.nB, K), np.int64)
        self.count_check_max = 0
        self.count_check_cells = 0
        self.invalid = 0
        self.records = 0
        self.gate = (GateAccumulator(K, (nl, ns, nb, self.nB), ("layer", "step", "tbin", "branch"))
                     if tr.has("/routing/prob") else None)
        self.mi: dict[str, ContingencyAccumulator] = {}
        for lab in labels:
            shape = (nl, nb) if lab.kind == "step" else (nl, ns, nb)
            self.mi[lab.name] = ContingencyAccumulator(K, len(lab.values), shape)
        self.trans = TransitionAccumulator(K, (nl, nb, ns - 1)) if g.consecutive_steps else None
        self.spatial = (SpatialCoherenceAccumulator(K, g.grid, (nl, ns, nb), ("layer", "step", "tbin"))
                        if g.full_grid else None)
        self.seeds = AgreementAccumulator(K, (nl, ns, nb))
        self.adjacent = AgreementAccumulator(K, (nl, ns, nb))
        self.branch = AgreementAccumulator(K, (nl, ns, nb, max(self.nB - 1, 1)))
        self.seed_skipped = 0
        # per-chunk histograms by np.bincount on combined keys, with the key offsets of the
        # (layer, step[, position]) cell of every record precomputed once: an id >= K is
        # clipped to the extra slot K (invalid), which is dropped, so no masking is needed.
        pos = next((lab.codes for lab in labels if lab.kind == "position"), None)
        self.n_pos = int(pos.max()) + 1 if pos is not None else 1
        cell = (np.arange(nl).reshape(-1, 1, 1) * ns + np.arange(ns).reshape(1, -1, 1))  # (nl, ns, 1)
        pos_part = np.asarray(pos, dtype=np.intp).reshape(1, 1, -1) if pos is not None else np.zeros((1, 1, 1), np.intp)
        self._hkey = ((cell * self.n_pos + pos_part) * (K + 1)).astype(np.intp)  # (nl, ns, N | 1)
        self._hsize = nl * ns * self.n_pos * (K + 1)
        self._pkey = (cell * (K + 1) ** 2).astype(np.intp)  # pair tables (nl, ns, 1)
        self._psize = nl * ns * (K + 1) ** 2
        # caches for the comparisons (bounded by one sample's routing each)
        self._cur_sample = None
        self._cur: dict[tuple[int, int], np.ndarray] = {}
        self._ref_prompt = None
        self._ref: dict[tuple[int, int], np.ndarray] = {}
        self._seen_prompts: set = set()
        self._prompt_of = list(tr.samples()["prompt"]) if tr.kind == "sampling" else None
        # latents
        self.has_lat = tr.has("/latents/h") and tr.kind == "sampling"
        self.conv = None
        self.lat_X: list[np.ndarray] = []
        self.lat_meta: list[np.ndarray] = []
        if self.has_lat:
            if ns >= 3 and g.consecutive_steps:
                self.conv = ConvergenceAccumulator(ns, (nl, nb))
            stored = np.asarray(tr.coords["stored_token"], dtype=np.int64)
            self.lat_tokens = stored
            pos = {int(t): i for i, t in enumerate(g.tokens)}
            self.lat_routed = np.array([pos.get(int(t), -1) for t in stored])
            n_blocks = int(tr.written.sum()) * self.nB
            self.lat_keep = max(1, min(len(stored), opt.max_latent_points // max(1, n_blocks * nl * ns)))
            self.lat_rng = np.random.default_rng(opt.seed)

    # ---- one chunk cell ----
    def block(self, c: dict, ids: np.ndarray, counts: np.ndarray, prob: np.ndarray | None,
              lat: np.ndarray | None) -> None:
        g, K = self.g, self.g.K
        nl, ns = len(g.layers), len(g.steps)
        tb = g.bin_of(c)
        if self.by_time:
            bpos = g.branches.index(str(c["branch"]))
            tpos = int(np.nonzero(g.timesteps == c["timestep"])[0][0])
            self.counts[:, :, tpos, bpos] += np.maximum(counts, 0)
        else:
            bpos, tpos = 0, None
            self.counts[:, :, tb, 0] += np.maximum(counts, 0)
        self.records += ids.size
        e = np.minimum(ids, K)  # ids >= K (unwritten, ablated) -> slot K
        # one histogram per chunk: (layer, step, position code, expert | invalid)
        hist = np.bincount((self._hkey + e).reshape(-1), minlength=self._hsize).reshape(nl, ns, self.n_pos, K + 1)
        n_invalid = int(hist[..., K].sum())
        all_valid = n_invalid == 0
        self.invalid += n_invalid
        hist = hist[..., :K]
        idc = hist.sum(axis=2)  # (nl, ns, K) expert counts of the valid ids
        # counts vs ids (only exact when every token is stored)
        if g.full_grid or len(g.tokens) == self._n_all_tokens():
            self.count_check_max = max(self.count_check_max, int(np.abs(idc - counts).max()))
            self.count_check_cells += nl * ns
        # gate
        if self.gate is not None and prob is not None:
            p = prob.astype(np.float64)
            if all_valid:
                self.gate.update(probs=p, ids=ids, groups=(self.Lg, self.Sg, tb, bpos))
            else:
                m = ids < K
                self.gate.update(probs=p[m], ids=ids[m], groups=(np.broadcast_to(self.Lg, m.shape)[m],
                                                                  np.broadcast_to(self.Sg, m.shape)[m], tb, bpos))
        # MI labels: all from the histogram (a chunk has one timestep bin, branch, sample)
        S_ = slice(None)
        for lab in self.labels:
            acc = self.mi[lab.name]
            if lab.kind == "step":  # table (nl, nb, K, ns)
                acc.add_counts(idc.transpose(0, 2, 1), at=(S_, tb))
            elif lab.kind == "position":  # table (nl, ns, nb, K, P)
                acc.add_counts(hist.transpose(0, 1, 3, 2), at=(S_, S_, tb))
            else:  # one label value per chunk; table (nl, ns, nb, K, M)
                code = {"bin": tb, "branch": bpos}.get(lab.kind)
                if code is None:
                    code = int(lab.codes[int(c["sample" if lab.kind == "sample" else "event"])])
                acc.add_counts(idc, at=(S_, S_, tb, S_, code))
        # transitions: table (nl, nb, ns-1, K, K)
        if self.trans is not None:
            self.trans.add_counts(self._pairs(e, e, 1)[:, :-1], at=(S_, tb))
        # spatial
        if self.spatial is not None:
            h, w = g.grid
            maps = ids.reshape(nl, ns, h, w)
            lg, sg = np.arange(nl).reshape(-1, 1), np.arange(ns).reshape(1, -1)
            if all_valid:
                self.spatial.update(maps, lg, sg, tb, expert_counts=idc)
            else:
                mv = (ids < K).all(axis=-1)
                if mv.any():
                    self.spatial.update(maps[mv], np.broadcast_to(lg, mv.shape)[mv],
                                        np.broadcast_to(sg, mv.shape)[mv], tb)
        # stability
        if self.by_time:
            self._stability(c, e, tb, bpos, tpos)
        # latents
        if lat is not None and self.has_lat:
            self._latents(c, ids, lat, tb, bpos, tpos)

    def _n_all_tokens(self) -> int:
        g = self.g.grid
        return g[0] * g[1] if g else -1

    def _pairs(self, a: np.ndarray, b: np.ndarray, shift: int = 0) -> np.ndarray:
        """Joint counts (nl, ns, K, K) of two routings of the same tokens, valid pairs only.

        ``a``, ``b`` hold ids clipped to K (invalid = K); ``shift=1`` pairs step s of ``a``
        with step s+1 of ``b`` (the transitions; the last step row stays empty)."""
        K = self.g.K
        nl, ns = self._pkey.shape[:2]
        if shift:
            a, b = a[:, :-shift], b[:, shift:]
        key = np.multiply(a, K + 1, dtype=np.intp)
        key += self._pkey[:, : ns - shift]
        key += b
        t = np.bincount(key.reshape(-1), minlength=self._psize).reshape(nl, ns, K + 1, K + 1)
        return t[..., :K, :K]

    def _agree(self, acc, a, b, at):
        acc.add_counts(self._pairs(a, b), at=at)

    def _stability(self, c, ids, tb, bpos, tpos) -> None:
        s = int(c["sample"])
        if s != self._cur_sample:
            self._finish_sample()
            self._cur_sample = s
            self._cur = {}
        S_ = slice(None)  # tables (nl, ns, nb[, branch], K, K); ids are clipped to K
        prev = self._cur.get((bpos, tpos - 1))
        if prev is not None:  # adjacent recorded timesteps, binned by the earlier one
            self._agree(self.adjacent, prev, ids, (S_, S_, self.g.bin_of({"timestep": self.g.timesteps[tpos - 1]})))
        if bpos > 0 and (0, tpos) in self._cur:
            self._agree(self.branch, self._cur[(0, tpos)], ids, (S_, S_, tb, bpos - 1))
        prompt = self._prompt_of[s]
        if self._ref_prompt == prompt and self._ref_sample != s:
            ref = self._ref.get((bpos, tpos))
            if ref is not None:
                self._agree(self.seeds, ref, ids, (S_, S_, tb))
        self._cur[(bpos, tpos)] = ids

    def _finish_sample(self) -> None:
        if self._cur_sample is None:
            return
        prompt = self._prompt_of[self._cur_sample]
        if prompt not in self._seen_prompts:
            self._seen_prompts.add(prompt)
            self._ref_prompt, self._ref_sample, self._ref = prompt, self._cur_sample, self._cur
        elif prompt != self._ref_prompt:
            self.seed_skipped += 1  # same prompt seen before but its reference was evicted

    def start(self) -> None:
        self._ref_sample = None

    def _latents(self, c, ids, lat, tb, bpos, tpos) -> None:
        nl, ns = lat.shape[:2]
        x = lat.astype(np.float32)  # (layer, step, stored_token, dim)
        if self.conv is not None:
            traj = np.moveaxis(x, 1, 2)  # (layer, token, step, dim)
            ok = np.isfinite(traj).all(axis=(-2, -1))
            if ok.all():
                self.conv.update(traj, np.arange(nl).reshape(-1, 1), tb)
            elif ok.any():
                self.conv.update(traj[ok], np.broadcast_to(np.arange(nl).reshape(-1, 1), ok.shape)[ok], tb)
        n = x.shape[2]
        pick = np.sort(self.lat_rng.choice(n, size=min(self.lat_keep, n), replace=False))
        for li in range(nl):
            for si in range(ns):
                v = x[li, si, pick]
                r = self.lat_routed[pick]
                e = np.where(r >= 0, ids[li, si, np.maximum(r, 0)], 255).astype(np.int64)
                meta = np.stack([np.full(len(pick), li), np.full(len(pick), si), np.full(len(pick), tb),
                                 np.full(len(pick), tpos), np.full(len(pick), int(c["sample"])),
                                 np.full(len(pick), bpos), self.lat_tokens[pick], e], axis=1)
                self.lat_X.append(v)
                self.lat_meta.append(meta)


LAT_META = ("layer", "step", "tbin", "timestep", "sample", "branch", "token", "expert")


# --------------------------------------------------------------------------- analysis entry point


def analyze(tr: TraceReader | str, options: Options | None = None,
            timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Every routing / latent probe of issue 5 (not the causal one) over a whole trace.

    Returns a JSON-ready dict; see `probes.report` for its documented structure.
    Also returns, under the private key "_latents", the latent subsample used for the
    figures (removed before writing JSON). A `timings` dict, if given, receives
    `stream_s` (the chunk-by-chunk pass: reading, decompressing and folding every chunk),
    `assemble_s` (statistics from the accumulated tables: permutation nulls, expected MI,
    linear probes) and `chunks`.
    """
    opt = options or Options()
    own = not isinstance(tr, TraceReader)
    if own:
        tr = open_trace(tr)
    try:
        return _analyze(tr, opt, timings if timings is not None else {})
    finally:
        if own:
            tr.close()


def _analyze(tr: TraceReader, opt: Options, timings: dict[str, float]) -> dict[str, Any]:
    t0 = time.perf_counter()
    g = _setup(tr, opt)
    labels, notes = _labels(tr, g)
    P = _Pass(tr, g, labels, opt)
    P.start()
    it_ids = tr.iter_chunks("/routing/expert")
    it_counts = tr.iter_chunks("/routing/counts")
    it_prob = tr.iter_chunks("/routing/prob") if P.gate is not None else None
    it_lat = tr.iter_chunks("/latents/h") if P.has_lat else None
    n_chunks = 0
    for blk in it_ids:
        cb = next(it_counts)
        pb = next(it_prob).data if it_prob is not None else None
        lb = next(it_lat).data if it_lat is not None else None
        P.block(blk.coords, blk.data, cb.data, pb, lb)
        n_chunks += 1
    if P.by_time:
        P._finish_sample()
    t1 = time.perf_counter()
    out = _assemble(tr, g, labels, notes, P, opt)
    timings.update(stream_s=t1 - t0, assemble_s=time.perf_counter() - t1, chunks=n_chunks)
    return out


def _assemble(tr, g: _Grid, labels, notes, P: _Pass, opt: Options) -> dict[str, Any]:
    ns, nb = len(g.steps), g.n_bins
    if P.invalid:
        notes.append(f"{P.invalid} routing records with invalid ids (>= K: unwritten or ablated) left out")
    notes.append("z-loss unavailable: traces store gate probabilities, not logits")
    if P.gate is None:
        notes.append("router confidence, balance monitor, soft MI and sampling disagreement need /routing/prob "
                     "(record with --probs)")
    if tr.kind == "sampling" and P.gate is not None:
        notes.append("sampling disagreement in a sampling trace is argmax routing vs stored id (0 unless an "
                     "intervention or a float16 tie); it is meaningful in training traces")
    if P.spatial is None:
        notes.append("spatial coherence skipped: the stored tokens are not the full token grid (stride or subset)")
    if P.trans is None:
        notes.append("transitions skipped: fewer than 2 or non-consecutive recorded recursion steps")
    if not P.has_lat:
        notes.append("latent convergence, linear probes and projections skipped: no /latents/h")
    elif P.conv is None:
        notes.append("latent convergence skipped: needs >= 3 consecutive recorded recursion steps")

    counts = P.counts  # (nl, ns, T|bins, branch, K)
    if P.by_time:
        tbin_of_t = (np.arange(P.nT) * nb) // max(P.nT, 1)
        cbins = np.stack([counts[:, :, tbin_of_t == b].sum(axis=2) for b in range(nb)], axis=2)
    else:
        cbins = counts
    load_lsb = load_stats(cbins.sum(axis=3))  # (nl, ns, nb)
    load_ls = load_stats(cbins.sum(axis=(2, 3)))  # (nl, ns)
    load_lsbr = load_stats(cbins.sum(axis=2))  # (nl, ns, branch)
    load_l = load_stats(cbins.sum(axis=(1, 2, 3)))
    load_g = load_stats(cbins.sum(axis=(0, 1, 2, 3)))

    gate_marg = None
    if P.gate is not None:  # pooled over branches; per (layer, step, bin), (layer, step), global
        gate_marg = {"lsb": P.gate.result(keep=("layer", "step", "tbin")),
                     "ls": P.gate.result(keep=("layer", "step")), "g": P.gate.result(keep=())}

    mi_res = {}
    for lab in labels:
        t = P.mi[lab.name].table()
        if lab.kind == "step":  # (nl, nb, K, M)
            tot = t.sum(axis=1)
            mi_res[lab.name] = dict(
                lab=lab, total=mi_summary(tot, n_perm=opt.n_perm, seed=opt.seed),
                by_bin=mi_summary(t, n_perm=0, analytic_emi=False), table=tot)
        else:  # (nl, ns, nb, K, M)
            tot = t.sum(axis=2)
            mi_res[lab.name] = dict(
                lab=lab, total=mi_summary(tot, n_perm=opt.n_perm, seed=opt.seed),
                by_bin=mi_summary(t, n_perm=0, analytic_emi=False), table=tot,
                all_steps=mi_summary(tot.sum(axis=1), n_perm=opt.n_perm, seed=opt.seed))
    spatial = spatial_tot = None
    if P.spatial is not None:
        spatial = P.spatial.result()  # (nl, ns, nb)
        spatial_tot = P.spatial.result(keep=("layer", "step"))  # pooled over timestep bins
    trans_tot = trans_bin = None
    if P.trans is not None:
        from .stats import transition_stats
        tt = P.trans.table()  # (nl, nb, ns-1, K, K)
        trans_tot = transition_stats(tt.sum(axis=1))
        trans_bin = transition_stats(tt)
    stab = {}
    for name, acc in (("seeds", P.seeds), ("adjacent_timesteps", P.adjacent), ("branches", P.branch)):
        conf = acc.counts.result()
        if name == "branches":
            conf = conf.sum(axis=3)  # over non-reference branches
        if conf.sum() == 0:
            continue
        stab[name] = (agreement_stats(conf.sum(axis=2)), agreement_stats(conf))
    if P.by_time and "seeds" not in stab:
        notes.append("seed stability skipped: no prompt was sampled with more than one seed")
    if P.seed_skipped:
        notes.append(f"seed stability: {P.seed_skipped} samples skipped (same-prompt samples not consecutive)")
    conv = P.conv.result() if P.conv is not None else None

    layers_out: dict[str, Any] = {}
    for li, layer in enumerate(g.layers):
        steps_out: dict[str, Any] = {}
        for si, step in enumerate(g.steps):
            d: dict[str, Any] = {
                "load": _stats_at(load_ls, (li, si)),
                "load_by_timestep_bin": [_stats_at(load_lsb, (li, si, b)) for b in range(nb)],
            }
            if P.nB > 1:
                d["load_by_branch"] = {br: _stats_at(load_lsbr, (li, si, bi)) for bi, br in enumerate(g.branches)}
            if P.by_time:
                c = counts[li, si].sum(axis=1)  # (T, K)
                tot = c.sum(axis=-1, keepdims=True)
                d["share_by_timestep"] = {"timestep_value": g.timestep_values.tolist(),
                                          "share": np.where(tot > 0, c / np.maximum(tot, 1), np.nan).tolist()}
            if gate_marg is not None:
                d["gate"] = _stats_at(gate_marg["ls"], (li, si))
                d["gate_by_timestep_bin"] = [_stats_at(gate_marg["lsb"], (li, si, b)) for b in range(nb)]
            mi = {}
            for name, r in mi_res.items():
                if r["lab"].kind == "step":
                    continue
                mi[name] = {**_stats_at(r["total"], (li, si)), "labels": r["lab"].values,
                            "lift": _lift(r["table"][li, si]),
                            "by_timestep_bin": [{"mi": r["by_bin"].mi[li, si, b], "mi_mm": r["by_bin"].mi_mm[li, si, b],
                                                 "n": r["by_bin"].n[li, si, b]} for b in range(nb)]}
            d["mi"] = mi
            if spatial is not None:
                d["spatial"] = _stats_at(spatial_tot, (li, si))
                d["spatial_by_timestep_bin"] = [_stats_at(spatial, (li, si, b)) for b in range(nb)]
            st = {}
            for name, (tot, byb) in stab.items():
                st[name] = {**_stats_at(tot, (li, si), drop=("confusion",)),
                            "by_timestep_bin": [_stats_at(byb, (li, si, b), drop=("confusion",)) for b in range(nb)]}
            if st:
                d["stability"] = st
            steps_out[str(step)] = d
        lo: dict[str, Any] = {"steps": steps_out, "load": _stats_at(load_l, (li,))}
        all_mi = {}
        for name, r in mi_res.items():
            if r["lab"].kind == "step":
                all_mi[name] = {**_stats_at(r["total"], (li,)), "labels": r["lab"].values,
                                "lift": _lift(r["table"][li]),
                                "by_timestep_bin": [{"mi": r["by_bin"].mi[li, b], "mi_mm": r["by_bin"].mi_mm[li, b],
                                                     "n": r["by_bin"].n[li, b]} for b in range(nb)]}
            else:
                all_mi[name] = {**_stats_at(r["all_steps"], (li,)), "labels": r["lab"].values}
        lo["mi"] = all_mi
        if trans_tot is not None:
            lo["transitions"] = {
                f"{g.steps[s]}->{g.steps[s + 1]}": {**_stats_at(trans_tot, (li, s)),
                                                     "by_timestep_bin": [_stats_at(trans_bin, (li, b, s), drop=("matrix",))
                                                                         for b in range(nb)]}
                for s in range(ns - 1)}
        if conv is not None:
            lo["convergence"] = {**_conv_at(conv, (li,), g.steps, sum_bins=True),
                                 "by_timestep_bin": [_conv_at(conv, (li, b), g.steps) for b in range(nb)]}
        layers_out[str(layer)] = lo

    out: dict[str, Any] = {
        "schema": REPORT_SCHEMA, "schema_version": REPORT_VERSION,
        "trace": _trace_info(tr, g, P),
        "options": {"timestep_bins": nb, "permutations": opt.n_perm, "max_latent_points": opt.max_latent_points},
        "timestep_bins": g.bins,
        "checks": {
            "records": P.records,
            "invalid_records": P.invalid,
            "counts_vs_ids_max_abs_diff": P.count_check_max if P.count_check_cells else None,
            "counts_vs_ids_cells": P.count_check_cells,
            "share_sum_max_abs_dev": _share_sum_dev(counts),
        },
        "global": {"load": _stats_at(load_g, ())},
        "layers": layers_out,
        "notes": notes,
    }
    if gate_marg is not None:
        out["global"]["gate"] = _stats_at(gate_marg["g"], ())
    if P.has_lat and P.lat_X:
        X = np.concatenate(P.lat_X)
        meta = np.concatenate(P.lat_meta)
        out["_latents"] = {"X": X, "meta": meta, "columns": LAT_META}
        if opt.linear_probes:
            out["linear_probes"] = _probes(X, meta, tr, g, labels, opt, notes)
    return out


def _lift(table: np.ndarray) -> list:
    from .stats import lift_table

    return lift_table(table)


def _conv_at(conv, idx, steps, sum_bins: bool = False) -> dict:
    if sum_bins:  # weighted mean over timestep bins
        n = conv.n[idx]
        w = n / max(n.sum(), 1)
        pick = lambda a: np.tensordot(w, np.nan_to_num(a[idx]), axes=(0, 0))  # noqa: E731
        d = {k: pick(getattr(conv, k)) for k in ("dist_to_last", "rel_step", "step_cos", "contraction",
                                                  "log_rho_mean", "label_share")}
        d["n"] = int(n.sum())
    else:
        d = {k: getattr(conv, k)[idx] for k in ("dist_to_last", "rel_step", "step_cos", "contraction",
                                                 "log_rho_mean", "label_share", "n")}
    d["rho"] = float(np.exp(d["log_rho_mean"])) if np.isfinite(d["log_rho_mean"]) else None
    d["labels"] = list(TRAJECTORY_LABELS)
    d["steps"] = steps
    return d


def _share_sum_dev(counts: np.ndarray) -> float | None:
    tot = counts.sum(axis=-1, keepdims=True)
    ok = tot[..., 0] > 0
    if not ok.any():
        return None
    share = counts / np.maximum(tot, 1)
    return float(np.abs(share.sum(axis=-1)[ok] - 1.0).max())


def _trace_info(tr, g: _Grid, P: _Pass) -> dict:
    info = {"path": str(tr.path), "kind": tr.kind, "complete": tr.complete,
            "checkpoint_sha256": tr.attrs.get("checkpoint_sha256"), "experts": g.K,
            "layers": g.layers, "steps": g.steps, "n_tokens_stored": int(len(g.tokens)),
            "token_grid": list(g.grid) if g.grid else None, "full_token_grid": g.full_grid,
            "has_prob": tr.has("/routing/prob"), "has_latents": tr.has("/latents/h"),
            "has_decoded": tr.has("/decoded/step"), "interventions": tr.attrs.get("interventions")}
    if tr.kind == "sampling":
        info.update(samples=int(tr.n_samples), branches=g.branches, timesteps=g.timesteps.tolist(),
                    timestep_values=g.timestep_values.tolist(), written_cells=int(tr.written.sum()))
    else:
        info.update(events=int(tr.n_events))
    return info


def _probes(X, meta, tr, g: _Grid, labels, opt: Options, notes: list) -> dict:
    """Linear-probe decodability per layer of timestep bin, recursion step, expert, prompt attributes."""
    col = {c: i for i, c in enumerate(LAT_META)}
    out: dict[str, Any] = {}
    sample_labels = {lab.name: lab for lab in labels if lab.kind == "sample"}
    for li, layer in enumerate(g.layers):
        sel = meta[:, col["layer"]] == li
        Xl, ml = X[sel], meta[sel]
        ok = np.isfinite(Xl).all(axis=1)
        Xl, ml = Xl[ok], ml[ok]
        targets = {"timestep_bin": ml[:, col["tbin"]], "recursion_step": ml[:, col["step"]],
                   "expert": ml[:, col["expert"]]}
        for name, lab in sample_labels.items():
            targets[name] = lab.codes[ml[:, col["sample"]]]
        res = {}
        for name, y in targets.items():
            keep = y < g.K if name == "expert" else np.ones(len(y), bool)
            try:
                with warnings.catch_warnings():  # linear_probe limits BLAS to one thread itself
                    warnings.simplefilter("ignore")  # ConvergenceWarning: the held-out accuracy is what counts
                    r = linear_probe(Xl[keep], y[keep], n_splits=opt.probe_splits, max_samples=opt.probe_max_samples,
                                     C=opt.probe_C, max_iter=200, seed=opt.seed)
                res[name] = r.to_dict()
            except ValueError as e:
                res[name] = {"skipped": str(e)}
        out[str(layer)] = res
    return out


# --------------------------------------------------------------------------- checkpoints


def compare_traces(path_a, path_b, n_bins: int = 4) -> dict[str, Any]:
    """Routing stability across two traces with the same grid (e.g. two checkpoints, same
    prompts and seeds): agreement and Cohen's kappa per layer and recursion step, streaming
    both traces chunk by chunk. Raises TraceError / ValueError if the grids differ."""
    from traces import TraceError

    with open_trace(path_a) as a, open_trace(path_b) as b:
        if a.kind != "sampling" or b.kind != "sampling":
            raise TraceError("compare_traces needs two sampling traces")
        for key in ("layer", "step", "token", "timestep", "branch", "expert"):
            if not np.array_equal(np.asarray(a.coords[key]), np.asarray(b.coords[key])):
                raise TraceError(f"traces differ in their {key} coordinate; they must share a grid")
        sa, sb = a.samples(), b.samples()
        n = min(a.n_samples, b.n_samples)
        if list(sa["prompt"][:n]) != list(sb["prompt"][:n]) or not np.array_equal(sa["seed"][:n], sb["seed"][:n]):
            raise TraceError("traces differ in prompts or seeds of their common samples")
        g = _setup(a, Options(n_bins=n_bins))
        K, nl, ns = g.K, len(g.layers), len(g.steps)
        acc = AgreementAccumulator(K, (nl, ns, g.n_bins))
        Lg, Sg = np.arange(nl).reshape(-1, 1, 1), np.arange(ns).reshape(1, -1, 1)
        wb = b.written
        for blk in a.iter_chunks("/routing/expert", sample=slice(0, n)):
            c = blk.coords
            tpos = int(np.nonzero(g.timesteps == c["timestep"])[0][0])
            s = int(c["sample"])
            if not wb[s, tpos]:
                continue
            other = b.routing(sample=s, branch=str(c["branch"]), timestep=tpos)
            x, y = blk.data, other
            m = (x < K) & (y < K)
            tb = g.bin_of(c)
            if m.all():
                acc.update(x, y, Lg, Sg, tb)
            else:
                acc.update(x[m], y[m], np.broadcast_to(Lg, m.shape)[m], np.broadcast_to(Sg, m.shape)[m], tb)
        conf = acc.counts.result()
        tot, byb = agreement_stats(conf.sum(axis=2)), agreement_stats(conf)
        return jsonable({
            "a": str(a.path), "b": str(b.path),
            "checkpoint_sha256": [a.attrs.get("checkpoint_sha256"), b.attrs.get("checkpoint_sha256")],
            "layers": {str(l): {str(s): {**_stats_at(tot, (li, si), drop=("confusion",)),
                                         "by_timestep_bin": [_stats_at(byb, (li, si, k), drop=("confusion",))
                                                             for k in range(g.n_bins)]}
                                for si, s in enumerate(g.steps)} for li, l in enumerate(g.layers)},
        })

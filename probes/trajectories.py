"""Paper Figure 3, latent trajectories across recursion steps: the one definition that the
report's figure (`probes.report.figure_latent_trajectories`) and the dashboard's "Figure 3"
button (`dashboard/views/latent.py`) both draw.

A point is h_l averaged over the stored tokens of one image (one layer, one guidance branch) at
one (sample, diffusion timestep, recursion step); a PCA with 2 components is fitted on these
image means. Why this definition and not the mean of single tokens' PCA coordinates (what the
dashboard drew before issue 18): the two differ in the basis. A PCA fitted on single tokens
spends its components on where patches sit within an image (token-to-token variation is most of
the variance), so the image means barely move in it; fitted on the image means, the components
are the directions in which an image's state moves with l and t, which is what the figure asks.
Every stored token of every written cell is used (no subsample), so the result depends on the
trace only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from traces import TraceReader


def latent_trajectories(tr: TraceReader, layer: int | None = None, branch: int | str = 0) -> dict[str, Any]:
    """Image-mean latents of one layer (a layer id; default the first stored) and branch, projected
    on their own 2-component PCA. Returns `sample`, `timestep` (position), `step` (position) and
    `xy` (n, 2) per image mean, sorted by (sample, timestep, step), with `explained_variance_ratio`,
    `timestep_values` (of every timestep position), `steps` (recursion step ids), `layer`, `branch`."""
    from .stats import pca  # loads scikit-learn: not at import

    layer = int(tr.coords["layer"][0]) if layer is None else int(layer)
    time_pos = {int(t): i for i, t in enumerate(tr.coords["timestep"])}
    keys, means = [], []
    for blk in tr.iter_chunks("/latents/h", branch=branch, layer=layer):
        h = blk.data.astype(np.float64)  # (step, stored token, dim); unwritten tokens are NaN
        written = np.isfinite(h).all(axis=-1)  # (step, token)
        for si in range(h.shape[0]):
            if written[si].any():
                keys.append((int(blk.coords["sample"]), time_pos[int(blk.coords["timestep"])], si))
                means.append(h[si, written[si]].mean(axis=0))
    if len(means) < 2:
        raise ValueError("latent trajectories need at least two written image states")
    keys_arr = np.asarray(keys, np.int64)
    order = np.lexsort(keys_arr.T[::-1])
    keys_arr, X = keys_arr[order], np.stack(means)[order]
    proj = pca(X, n_components=2, method="full")
    names = [str(b) for b in tr.coords["branch"]]
    return {"sample": keys_arr[:, 0], "timestep": keys_arr[:, 1], "step": keys_arr[:, 2], "xy": proj.coords[:, :2],
            "explained_variance_ratio": np.asarray(proj.explained_variance_ratio[:2], float),
            "timestep_values": np.asarray(tr.coords["timestep_value"], float),
            "steps": [int(s) for s in tr.coords["step"]], "layer": layer,
            "branch": branch if isinstance(branch, str) else names[int(branch)]}


def trajectory_lines(traj: dict[str, Any], n_timesteps: int = 6) -> list[dict[str, Any]]:
    """What the figure draws, for at most `n_timesteps` timesteps spread over those recorded:
    per timestep its position and value, one (steps, 2) line per sample (`samples`, keyed by
    sample) and their mean over samples per recursion step (`mean`, the thick line)."""
    ts = np.unique(traj["timestep"])
    chosen = ts[np.unique(np.linspace(0, len(ts) - 1, min(n_timesteps, len(ts))).round().astype(int))]
    steps = np.unique(traj["step"])
    out = []
    for t in chosen:
        at_t = traj["timestep"] == t
        samples = {}
        for s in np.unique(traj["sample"][at_t]):
            m = at_t & (traj["sample"] == s)
            samples[int(s)] = traj["xy"][m][np.argsort(traj["step"][m])]
        mean = np.stack([traj["xy"][at_t & (traj["step"] == r)].mean(axis=0) for r in steps])
        out.append({"timestep": int(t), "timestep_value": float(traj["timestep_values"][t]), "samples": samples,
                    "mean": mean, "steps": [traj["steps"][int(r)] for r in steps]})
    return out

"""`tiny-shift`: the `tiny` backbone whose RSR stage has real work, sub-tasks keyed by the caption.

The base stage trains on the plain coloured shapes, exactly as `tiny`. The RSR stage trains on the
same scenes in one of four styles named by the caption's last words (`rsr_model.data.styles`):
colour maps the frozen base cannot make, that conflict with each other, and that the gate can
tell apart from the text conditioning c. Held-out measurements (`batch`: the routing value, the
evaluation table) draw fresh styled scenes of every (style, shape) combination; training batches
never show the held-out combinations (`styles.HELD_OUT_PAIRS`).

The RSR recipe is learned, not planted (rsr_model/recipe.py): K = 4 experts of rank 4, L = 3;
a quarter of the stage trains one upcycled LoRA, the next quarter a soft mixture, the rest hard
routing annealed to the argmax sampling uses. No warm start.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import config
from ..data import styles
from .shapes_sd3 import TinySD3Shapes


class TinyShift(TinySD3Shapes):
    name = "tiny-shift"
    default_steps = {"base": 600, "rsr": 400}
    warm_start = "none"
    upcycle_steps = None  # the first quarter of the RSR stage
    upcycle_noise = 0.1
    soft_steps = None  # the second quarter
    anneal = True
    eval_split = "all"  # what held-out measurements draw: every combination (fresh seeds)

    def default_rsr(self) -> config.RSRConfig:
        return config.tiny(target_layers=[2], num_experts=4, rank=4, balance_over="recursion")

    def stage_batch(self, stage: str, rng: np.random.Generator, n: int):
        if stage == "base":
            return super().batch(rng, n)  # the plain task
        return self._styled(rng, n, "train")

    def batch(self, rng: np.random.Generator, n: int):
        return self._styled(rng, n, self.eval_split)

    def _styled(self, rng: np.random.Generator, n: int, split: str):
        images, captions, _ = styles.sample_batch(rng, n, self.size, split)
        return self._conditioned(rng, images, captions)

    def describe(self, item: str) -> dict[str, Any]:
        plain, style = styles.split_caption(item)
        out = super().describe(plain)
        out["caption"] = item
        if style is not None:  # the sub-task, a label the probes' MI reads (AMI(expert; style))
            out.setdefault("attributes", {})["style"] = style
        return out

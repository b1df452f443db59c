"""`tiny-compose`: the paper-like variant of the shifted task (issue 20).

The base stage learns single objects, their colours and counts; the RSR stage learns two objects
with bound colours and spatial relations (`rsr_model.data.compose`), as the paper fine-tunes SD3
for compositional prompts. Training never shows the held-out combinations (colour pairs, shape
pairs on an axis, a caption and its converse together); held-out measurements draw every
combination (`eval_split = "all"`; `compose.sample_batch(..., "test")` draws only the held-out
ones). The sub-task the probes can read is the category (attribute binding vs relation). The RSR
recipe is tiny-shift's: learned, nothing planted.
"""

from __future__ import annotations

import numpy as np

from ..data import compose, shapes
from .shapes_sd3 import TinySD3Shapes
from .shapes_shift import TinyShift


class TinyCompose(TinyShift):
    name = "tiny-compose"

    def stage_batch(self, stage: str, rng: np.random.Generator, n: int):
        if stage == "base":
            images, captions, _ = shapes.sample_batch(rng, n, size=self.size, categories=compose.BASE_CATEGORIES)
            return self._conditioned(rng, images, captions)
        return self._compose(rng, n, "train")

    def batch(self, rng: np.random.Generator, n: int):
        return self._compose(rng, n, self.eval_split)

    def _compose(self, rng: np.random.Generator, n: int, split: str):
        images, captions, _ = compose.sample_batch(rng, n, self.size, split)
        return self._conditioned(rng, images, captions)

    def describe(self, item: str) -> dict:
        out = TinySD3Shapes.describe(self, item)  # the plain captions' attributes (no style suffix here)
        if "attributes" in out:  # the sub-task, a label the probes' MI reads: binding colours or a relation
            out["attributes"]["subtask"] = "relation" if out["attributes"]["relation"] != "none" else "attributes"
        return out

"""Composition: the paper-like shifted task (`tiny-compose`), relations and attribute binding on a base
that only saw single objects.

The paper fine-tunes SD3 for compositional prompts; here the base stage trains on single objects,
their colours and counts (`single_object`, `colors`, `counting`), and the RSR stage on two objects
with bound colours (`color_attr`: "a red circle and a blue square") and spatial relations
(`position`: "a red circle left of a blue square"), work a base that never drew two objects cannot
do. Held out of the RSR stage's training are new COMBINATIONS, never a caption and its converse apart:

    color_attr   every scene whose two colours are a held-out pair (either object, either order):
                 {red, blue}, {green, yellow}, {purple, white}
    position     every scene whose two shapes are a held-out pair on a held-out axis (left of /
                 right of = horizontal, above / below = vertical, either order, so "A left of B" and
                 its converse "B right of A" are held out together): {circle, triangle} and
                 {circle, square} horizontally, {square, triangle} vertically

Every colour pair and every shape pair still appears in training, the shape pairs on their other
axis; the held-out captions test recombination of seen parts, not paraphrase.
"""

from __future__ import annotations

import numpy as np

from . import shapes

BASE_CATEGORIES: tuple[str, ...] = ("single_object", "colors", "counting")
RSR_CATEGORIES: tuple[str, ...] = ("color_attr", "position")
AXIS = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}
HELD_OUT_COLOUR_PAIRS = frozenset({frozenset({"red", "blue"}), frozenset({"green", "yellow"}),
                                   frozenset({"purple", "white"})})
HELD_OUT_RELATIONS = frozenset({(frozenset({"circle", "triangle"}), "horizontal"),
                                (frozenset({"circle", "square"}), "horizontal"),
                                (frozenset({"square", "triangle"}), "vertical")})


def held_out(scene: shapes.Scene) -> bool:
    """Whether a scene shows a held-out combination (a colour pair, or a shape pair on an axis)."""
    if scene.category == "color_attr":
        return frozenset(str(o.colour) for o in scene.objects) in HELD_OUT_COLOUR_PAIRS
    if scene.category == "position" and scene.relation is not None:
        pair = frozenset(str(o.shape) for o in scene.objects)
        return (pair, AXIS[scene.relation.kind]) in HELD_OUT_RELATIONS
    return False


def sample_batch(rng: np.random.Generator, n: int, size: int, split: str = "train"
                 ) -> tuple[np.ndarray, list[str], list[shapes.Scene]]:
    """A batch of the RSR stage's scenes, categories uniform: (images (B, 3, H, W) in [-1, 1], captions,
    scenes). "train" never draws a held-out combination, "test" only those, "all" any."""
    if split not in shapes.SPLITS:
        raise ValueError(f"split must be one of {shapes.SPLITS}, got {split!r}")
    scenes: list[shapes.Scene] = []
    while len(scenes) < n:
        scene = shapes.make_scene(rng, RSR_CATEGORIES[int(rng.integers(len(RSR_CATEGORIES)))])
        if split == "all" or held_out(scene) == (split == "test"):
            scenes.append(scene)
    images = shapes.to_model_range(shapes.render_batch(scenes, size))
    return images, [shapes.caption(s) for s in scenes], scenes

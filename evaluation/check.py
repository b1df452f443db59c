"""How often the scorer is right: rendered ground truth must pass, deliberately wrong images must fail.

For every GenEval category and many seeds a scene is drawn, rendered at each resolution and
scored against its own caption (accuracy). Then the image is altered in one way the caption
can check and scored against the *original* caption (rejection):

    colour     object 0 painted another colour         (categories that name colours)
    count      one more object of object 0's shape     (every category)
    shape      object 0 drawn as another shape         (every category)
    relation   the layout mirrored along the relation's axis, so it says the opposite (position)

The altered scenes keep every other property of the original (sizes, gaps, margins), so a
rejection is due to the one change. Targets: accuracy and rejection >= 99% in every cell.
Generated images are softer and noisier than renderings, so each ground-truth image is also
scored blurred (Gaussian, 0.5 px) with Gaussian pixel noise (sigma 10 of 255): "noisy accuracy".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from rsr_model.data import shapes
from rsr_model.data.shapes import CATEGORIES, Obj, Scene

from .scorer import score

TARGET = 0.99
WRONG_KINDS = ("colour", "count", "shape", "relation")
NAMES_COLOUR = ("colors", "color_attr", "position")
MIRROR = {"left of": "x", "right of": "x", "above": "y", "below": "y"}
NOISE_SIGMA, BLUR_SIGMA = 10.0, 0.5  # pixel noise (of 255) and blur (pixels) of the noisy copy


def degraded(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rendering made more like a sample: blurred, with Gaussian pixel noise; uint8 HWC."""
    from scipy import ndimage

    soft = ndimage.gaussian_filter(image.astype(np.float32), (BLUR_SIGMA, BLUR_SIGMA, 0))
    return np.clip(np.rint(soft + rng.normal(0, NOISE_SIGMA, soft.shape)), 0, 255).astype(np.uint8)


def _recoloured(scene: Scene, rng: np.random.Generator) -> Scene:
    first = scene.objects[0]
    colour = rng.choice([c for c in shapes.COLOURS if c != first.colour])
    return dataclasses.replace(scene, objects=(dataclasses.replace(first, colour=str(colour)), *scene.objects[1:]))


def _reshaped(scene: Scene, rng: np.random.Generator) -> Scene:
    first = scene.objects[0]
    shape = rng.choice([s for s in shapes.SHAPES if s != first.shape])
    return dataclasses.replace(scene, objects=(dataclasses.replace(first, shape=str(shape)), *scene.objects[1:]))


def _one_more(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The scene with an extra copy of object 0 (a fresh layout for all, same sizes and relation)."""
    if len(scene.objects) >= shapes.MAX_OBJECTS + 1:
        return None
    objects = (*scene.objects, dataclasses.replace(scene.objects[0]))
    sizes = np.array([o.size for o in objects])
    relation = scene.relation.kind if scene.relation is not None else None
    centres = shapes.place(rng, sizes, relation)
    return dataclasses.replace(scene, objects=tuple(
        Obj(o.shape, o.colour, float(x), float(y), float(z)) for o, (x, y), z in zip(objects, centres, sizes)))


def _mirrored(scene: Scene, rng: np.random.Generator) -> Scene | None:
    if scene.relation is None:
        return None
    if MIRROR[scene.relation.kind] == "x":
        return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, cx=1 - o.cx) for o in scene.objects))
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, cy=1 - o.cy) for o in scene.objects))


ALTERATIONS: dict[str, Callable[[Scene, np.random.Generator], Scene | None]] = {
    "colour": lambda s, rng: _recoloured(s, rng) if s.category in NAMES_COLOUR else None,
    "count": _one_more,
    "shape": _reshaped,
    "relation": _mirrored,
}


def _rate(hits: list[bool]) -> float | None:
    return float(np.mean(hits)) if hits else None


def check_cell(category: str, resolution: int, scenes: int) -> dict[str, Any]:
    """Accuracy on `scenes` rendered scenes of one category at one resolution, and the rejection
    rate of each alteration that applies to the category; failures kept as captions for reading."""
    truth, noisy, wrong = [], [], {kind: [] for kind in WRONG_KINDS}
    failures: list[str] = []
    for seed in range(scenes):
        rng = np.random.default_rng([seed, resolution, CATEGORIES.index(category)])
        scene = shapes.make_scene(rng, category)
        text = shapes.caption(scene)
        variants = {kind: alter(scene, rng) for kind, alter in ALTERATIONS.items()}
        variants = {kind: v for kind, v in variants.items() if v is not None}
        images = shapes.render_batch([scene, *variants.values()], resolution)
        ok = score(images[0], text)["correct"]
        truth.append(ok)
        noisy.append(score(degraded(images[0], rng), text)["correct"])
        if not ok:
            failures.append(f"missed: {text}")
        for (kind, _), image in zip(variants.items(), images[1:]):
            rejected = not score(image, text)["correct"]
            wrong[kind].append(rejected)
            if not rejected:
                failures.append(f"accepted {kind} change: {text}")
    return {"accuracy": _rate(truth), "noisy_accuracy": _rate(noisy), "n": len(truth),
            "rejection": {kind: _rate(hits) for kind, hits in wrong.items() if hits},
            "n_wrong": {kind: len(hits) for kind, hits in wrong.items() if hits},
            "failures": failures[:10]}


def scorer_check(resolutions: Sequence[int] = (24, 32), scenes: int = 500,
                 progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Every (resolution, category) cell, with the worst accuracy and rejection and whether both meet TARGET."""
    cells: dict[str, dict[str, Any]] = {}
    for resolution in resolutions:
        for category in CATEGORIES:
            cells[f"{resolution}/{category}"] = check_cell(category, resolution, scenes)
            if progress:
                progress()
    worst_accuracy = min(c["accuracy"] for c in cells.values())
    worst_rejection = min(r for c in cells.values() for r in c["rejection"].values())
    return {"target": TARGET, "scenes": scenes, "resolutions": list(resolutions), "cells": cells,
            "worst_accuracy": worst_accuracy, "worst_rejection": worst_rejection,
            "worst_noisy_accuracy": min(c["noisy_accuracy"] for c in cells.values()),
            "passed": worst_accuracy >= TARGET and worst_rejection >= TARGET}


def check_table(result: dict[str, Any]) -> str:
    """Markdown: one row per (resolution, category), accuracy then rejection per alteration."""
    from .markdown import table_lines

    rows = []
    for key, cell in result["cells"].items():
        rejection = [cell["rejection"].get(k) for k in WRONG_KINDS]
        rejected = ("—" if r is None else f"{r:.1%}" for r in rejection)
        rows.append([*key.split("/"), f"{cell['accuracy']:.1%}", f"{cell['noisy_accuracy']:.1%}", *rejected])
    head = ["resolution", "category", "accuracy", "noisy accuracy", *(f"rejects {k}" for k in WRONG_KINDS)]
    lines = table_lines(head, rows)
    verdict = "meets" if result["passed"] else "misses"
    lines.append(f"\nWorst accuracy {result['worst_accuracy']:.1%}, worst rejection {result['worst_rejection']:.1%} "
                 f"({result['scenes']} scenes per cell): {verdict} the {result['target']:.0%} target. "
                 f"Worst accuracy on blurred, noisy copies: {result['worst_noisy_accuracy']:.1%}.")
    return "\n".join(lines)

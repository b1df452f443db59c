"""Scoring images of the shifted task (`tiny-shift`): undo the caption's style, then the GenEval-style scorer.

A styled caption ("two red circles, in negative") names a scene and a colour map
(`rsr_model.data.styles`). Three maps are invertible on pixels, so an image is judged by mapping it
back and scoring the plain caption with `evaluation.scorer.score`:

    negative   255 - x per channel (the model range's -x): a black background comes back black only
               if the image was drawn in negative, so a plain image fails (its black becomes white)
    swapped    channels (r, g, b) were drawn as (b, r, g): read back as (g, b, r)
    reversed   red and blue exchanged: exchanged back

`gray` removes colour and cannot be undone: the image must be gray (every foreground pixel's channels
within GRAY_SPREAD of each other), and the caption is scored without its colours on the intensity,
each object's plateau stretched to the palette's white so the scorer's foreground threshold and
coverage apply. A wrong style shows through the named colours (and, for negative, the background,
for gray the spread): a caption that names no colour ("a circle, in swapped") cannot tell swapped
from reversed or from the plain image, as GenEval checks only what a caption asks for.
`check_styled` measures the scorer on rendered ground truth (`tests/test_style_scorer.py`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from scipy import ndimage

from rsr_model.data import shapes, styles

from .scorer import as_uint8_hwc, score

SCORER_VERSION = 1  # raise when a judgement changes: evaluate --shift keeps scores beside checkpoints under it
GRAY_SPREAD = 24  # uint8: max - min over channels of a gray pixel (rendering and rounding stay within ~2)
_GRAY_FLOOR = 30  # uint8 intensity above which a gray pixel is foreground (background is 0)
_WHITE = float(shapes.PALETTE["white"][0])


def unstyle(image: np.ndarray, style: str) -> np.ndarray:
    """An image drawn in `style` (uint8 HWC, or float in [-1, 1], as `scorer.as_uint8_hwc` reads) -> the
    plain uint8 image it should be (gray: stretched intensity)."""
    image = as_uint8_hwc(image)
    if style == "negative":
        return 255 - image
    if style == "swapped":  # drawn as (b, r, g)
        return image[..., [1, 2, 0]]
    if style == "reversed":
        return image[..., [2, 1, 0]]
    if style == "gray":
        return _stretched_gray(image)
    raise ValueError(f"unknown style {style!r}; styles are {', '.join(styles.STYLES)}")


def _stretched_gray(image: np.ndarray) -> np.ndarray:
    """Each blob's intensity scaled so its plateau (90th percentile) reads as the palette's white."""
    g = image.astype(np.float32).mean(axis=2)  # (H, W)
    labels, n = ndimage.label(g >= _GRAY_FLOOR, structure=np.ones((3, 3)))
    out = np.zeros_like(g)
    if n:
        grown = ndimage.grey_dilation(labels, size=(3, 3))  # the anti-aliased rim belongs to its blob
        for k in range(1, n + 1):
            plateau = max(float(np.percentile(g[labels == k], 90)), 1.0)
            rim = grown == k
            out[rim] = np.maximum(out[rim], g[rim] * (_WHITE / plateau))
    v = np.clip(out, 0, 255).round().astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=2)


def is_gray(image: np.ndarray) -> bool:
    """Whether every foreground pixel's channels are within GRAY_SPREAD of each other (and there is one)."""
    f = as_uint8_hwc(image).astype(np.int16)
    spread = f.max(axis=2) - f.min(axis=2)
    foreground = f.mean(axis=2) >= _GRAY_FLOOR
    return bool(foreground.any()) and int(spread[foreground].max()) <= GRAY_SPREAD


def score_styled(image: np.ndarray, caption: str) -> dict[str, Any]:
    """`scorer.score` of the plain caption on the image with its style undone; "style" checks for gray.
    A caption without a style is scored as it is."""
    head, style = styles.split_caption(caption)
    if style is None:
        return score(image, caption)
    image = as_uint8_hwc(image)
    spec = shapes.parse_caption(head)
    if style == "gray":
        spec = replace(spec, groups=tuple(replace(g, colour=None) for g in spec.groups))
    out = score(unstyle(image, style), spec)
    if style == "gray":
        out["checks"]["style:gray"] = is_gray(image)
        out["correct"] = all(out["checks"].values())
    out["style"] = style
    return out


def check_styled(n: int = 400, size: int = 32, split: str = "test", seed: int = 0) -> dict[str, Any]:
    """The scorer on rendered styled scenes: accuracy on the true caption, how often it rejects the same
    image under each other style's caption, and how often it rejects the PLAIN image (the style ignored,
    as a model that cannot draw it would) under the true caption (per true style; gray's plain image is
    not recoverable from its render, so not checked)."""
    rng = np.random.default_rng(seed)
    images, captions, names = styles.sample_batch(rng, n, size, split)
    pixels = [as_uint8_hwc(im) for im in images]
    correct = np.array([score_styled(im, c)["correct"] for im, c in zip(pixels, captions)])
    out: dict[str, Any] = {"n": n, "size": size, "split": split, "accuracy": float(correct.mean()), "by_style": {}}
    for style in styles.STYLES:
        mine = [i for i, s in enumerate(names) if s == style]
        rejected = {}
        for other in styles.STYLES:
            if other != style:
                wrong = [score_styled(pixels[i], styles.styled_caption(styles.split_caption(captions[i])[0], other))
                         for i in mine]
                rejected[other] = float(np.mean([not w["correct"] for w in wrong])) if wrong else None
        if style != "gray" and mine:
            rejected["plain"] = float(np.mean([not score_styled(unstyle(pixels[i], style), captions[i])["correct"]
                                               for i in mine]))
        out["by_style"][style] = {"n": len(mine), "accuracy": float(correct[mine].mean()) if mine else None,
                                  "rejects": rejected}
    return out

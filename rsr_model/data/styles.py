"""Styles: the shifted task's sub-tasks, colour transformations named by a word in the caption.

The `tiny-shift` preset's base learns the plain coloured shapes (`shapes`); its RSR stage learns the
same scenes drawn in one of four styles, named at the end of the caption ("a red circle, in
negative"). Each style is a fixed map of every pixel's colour, so a frozen base cannot produce it,
the styles conflict (one map per style), and which one applies is readable from the text
conditioning alone: a task where experts keyed by the caption can pay, and a single small LoRA has
to do four things at once.

    style      map of a pixel's (r, g, b) in [-1, 1]
    negative   (-r, -g, -b)                  colours inverted, black background turns white
    swapped    (b, r, g)                     channels rotated
    reversed   (b, g, r)                     red and blue exchanged
    gray       (m, m, m), m = (r + g + b)/3  colour removed

Held-out combinations: for each style one shape never appears with it (in any object) in
training batches; `split="test"` draws only those pairs, so a held-out caption is a new combination
of a style and a shape that training showed separately.
"""

from __future__ import annotations

import numpy as np

from . import shapes

STYLES: tuple[str, ...] = ("negative", "swapped", "reversed", "gray")
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("negative", "triangle"), ("swapped", "circle"),
                                                        ("reversed", "square"), ("gray", "triangle")})
SUFFIX = ", in "


def apply_style(images: np.ndarray, style: str) -> np.ndarray:
    """float32 (B, 3, H, W) in [-1, 1] -> the same images in `style`."""
    if style == "negative":
        return -images
    if style == "swapped":
        return images[:, [2, 0, 1]]
    if style == "reversed":
        return images[:, [2, 1, 0]]
    if style == "gray":
        return np.repeat(images.mean(1, keepdims=True), 3, axis=1)
    raise ValueError(f"unknown style {style!r}; styles are {', '.join(STYLES)}")


def styled_caption(caption: str, style: str) -> str:
    return f"{caption}{SUFFIX}{style}"


def split_caption(text: str) -> tuple[str, str | None]:
    """"a red circle, in negative" -> ("a red circle", "negative"); a caption without a style -> (text, None)."""
    head, sep, tail = text.rpartition(SUFFIX)
    return (head, tail) if sep and tail in STYLES else (text, None)


def held_out(scene: shapes.Scene, style: str) -> bool:
    """Whether a styled scene shows a held-out combination (its style with a shape held out from it)."""
    return any((style, str(o.shape)) in HELD_OUT_PAIRS for o in scene.objects)


def sample_batch(rng: np.random.Generator, n: int, size: int, split: str = "train"
                 ) -> tuple[np.ndarray, list[str], list[str]]:
    """A batch of styled scenes, styles uniform: (images (B, 3, H, W) in [-1, 1], captions, styles).
    "train" never draws a held-out (style, shape) pair, "test" only those, "all" any."""
    if split not in shapes.SPLITS:
        raise ValueError(f"split must be one of {shapes.SPLITS}, got {split!r}")
    scenes, styles = [], []
    while len(scenes) < n:
        style = STYLES[int(rng.integers(len(STYLES)))]
        scene = shapes.make_scene(rng, shapes.CATEGORIES[int(rng.integers(len(shapes.CATEGORIES)))])
        held = held_out(scene, style)
        if split == "all" or held == (split == "test"):
            scenes.append(scene)
            styles.append(style)
    plain = shapes.to_model_range(shapes.render_batch(scenes, size))  # (B, 3, H, W)
    images = np.stack([apply_style(plain[i:i + 1], s)[0] for i, s in enumerate(styles)])
    return images.astype(np.float32), [styled_caption(shapes.caption(sc), s) for sc, s in zip(scenes, styles)], styles

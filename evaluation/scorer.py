"""GenEval-style scoring of images of the embedded shapes world, from pixels alone.

`detect` finds the objects of an image (shape, colour, box); `score` checks them against
what a caption (or a `Scene`, or a `Spec`) asks for, with GenEval's rules: the count of each
named shape, the colour of each named object, the relation between the two objects of a
position prompt. It is the judge of generated images, kept apart from the data generator
(`rsr_model.data.shapes`) whose renderer it inverts; `check.scorer_check` measures how
often it is right on rendered ground truth and on deliberately wrong captions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rsr_model.data.shapes import (
    ALL_SHAPES,
    COLOURS,
    PALETTE_RGB,
    SIZE_RANGE,
    Group,
    Scene,
    Spec,
    parse_caption,
    signed_distance,
    spec_of,
)

_PALETTE_HUE = PALETTE_RGB / PALETTE_RGB.max(axis=1, keepdims=True)  # (C, 3)
_FG_THRESHOLD = 100  # brightest channel >= this -> foreground (coverage >= ~0.42)

@dataclass
class Detection:
    """An object found in pixels (normalised centre/size of its bounding box)."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    area: int  # pixels
    fill: float  # area / bbox area: circle ~0.785, square ~1, triangle ~0.5, cross ~0.56
    iou: float  # soft IoU with the fitted template of `shape`


def as_uint8_hwc(image: np.ndarray) -> np.ndarray:
    """Accept uint8 HWC, or float in [-1,1] as HWC or CHW (numpy or torch)."""
    a = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if a.ndim != 3:
        raise ValueError(f"expected one image (3 dims), got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(np.rint((a.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
    return a


# Area of each shape relative to its bounding box, and the offset of its centroid below
# the box centre (in box sides); used to fit a template to a blob's soft moments.
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}


def detect(image: np.ndarray, min_area: float | None = None) -> list[Detection]:
    """Find objects from pixels alone.

    Foreground = brightest channel >= threshold; objects = 8-connected components
    (smaller than `min_area` pixels: noise).  Colour = palette hue nearest the blob's
    mean hue.  Shape: soft coverage (brightness / colour peak) over the blob grown by a
    pixel gives its area and centroid; for each shape those fix a template (size from
    area / fill, centre from centroid), and the template with the best soft IoU wins
    (below 0.5: "unknown").  Using soft coverage keeps 8 px circles apart from squares."""
    img = as_uint8_hwc(image)
    res = img.shape[0]
    if min_area is None:
        min_area = max(4.0, 0.1 * (SIZE_RANGE[0] * res) ** 2)
    f = img.astype(np.float32)
    peak = f.max(axis=2)  # (H,W)
    labels, n = ndimage.label(peak >= _FG_THRESHOLD, structure=np.ones((3, 3)))
    out: list[Detection] = []
    if n == 0:
        return out
    hue = f / np.maximum(peak, 1.0)[..., None]  # (H,W,3)
    ring = np.ones((3, 3), dtype=bool)
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        m = labels[sl] == k
        area = int(m.sum())
        if area < min_area:
            continue
        ys, xs = sl
        h, w = ys.stop - ys.start, xs.stop - xs.start
        cid = int(np.argmin(((_PALETTE_HUE - hue[sl][m].mean(axis=0)) ** 2).sum(1)))
        # window 2 px larger than the box; soft coverage on the blob grown by one pixel
        y0, y1 = max(ys.start - 2, 0), min(ys.stop + 2, res)
        x0, x1 = max(xs.start - 2, 0), min(xs.stop + 2, res)
        lab = labels[y0:y1, x0:x1]
        region = ndimage.binary_dilation(lab == k, ring) & ((lab == 0) | (lab == k))
        cov = np.where(region, np.clip(peak[y0:y1, x0:x1] / PALETTE_RGB[cid].max(), 0, 1), 0)  # (h', w')
        A = float(cov.sum())
        v = np.arange(y0, y1, dtype=np.float32) + 0.5
        u = np.arange(x0, x1, dtype=np.float32) + 0.5
        gx = float((cov.sum(0) * u).sum() / A) / res  # centroid, normalised
        gy = float((cov.sum(1) * v).sum() / A) / res
        sizes = np.array([np.sqrt(A / _FILL[s]) / res for s in ALL_SHAPES], dtype=np.float32)
        cys = np.array([gy - _CENTROID_DY[s] * z for s, z in zip(ALL_SHAPES, sizes)], dtype=np.float32)
        dx = (u / res)[None, None, :] - np.full(len(ALL_SHAPES), gx, np.float32)[:, None, None]
        dy = (v / res)[None, :, None] - cys[:, None, None]
        distance = signed_distance(np.arange(len(ALL_SHAPES)), dx, dy, (sizes / 2)[:, None, None])
        tmpl = np.clip(0.5 - distance * res, 0, 1)
        iou = np.minimum(tmpl, cov).sum((1, 2)) / np.maximum(np.maximum(tmpl, cov).sum((1, 2)), 1e-6)  # (S,)
        best = int(np.argmax(iou))
        shape = ALL_SHAPES[best] if iou[best] >= 0.5 else "unknown"
        out.append(Detection(shape, COLOURS[cid], (xs.start + xs.stop) / 2 / res, (ys.start + ys.stop) / 2 / res,
                             max(h, w) / res, area, area / (h * w), float(iou[best])))
    return out


def _members(dets: list[Detection], g: Group, named: dict[tuple[str, str], int]) -> list[Detection]:
    """Detections standing for group g: its shape and colour; for a group without a colour,
    those of its shape whose colour no other group names."""
    if g.colour is not None:
        return [d for d in dets if d.shape == g.shape and d.colour == g.colour]
    return [d for d in dets if d.shape == g.shape and (g.shape, d.colour) not in named]


def _holds(a: Detection, b: Detection, relation: str) -> bool:
    """Dominant-axis rule: a is <relation> b when b-a along the named axis is positive,
    at least 1/20 of the image, and larger than the offset along the other axis."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= max(abs(across), 0.05)


def score(image: np.ndarray, scene: Scene | Spec | str) -> dict:
    """GenEval-style check of an image against a scene, a Spec, or a caption string.

    Returns {"correct": bool (the caption is satisfied: for each shape it names, the
    number detected equals the number asked; at least as many of each named colour as
    asked; the relation for every pair of the two groups), "checks": {name: bool},
    "exact": bool | None (a Scene only: detected (shape, colour) multiset equals the
    scene's, so also unnamed colours and no extra objects), "detected": [dict]}.
    Unnamed shapes are ignored, as in GenEval; stricter than GenEval in one way: counts
    must be exact in every category ("a circle" fails on an image with two circles)."""
    dets = detect(image)
    spec = parse_caption(scene) if isinstance(scene, str) else spec_of(scene) if isinstance(scene, Scene) else scene
    checks: dict[str, bool] = {}
    need_total: dict[str, int] = {}
    need_colour: dict[tuple[str, str], int] = {}
    for g in spec.groups:
        need_total[g.shape] = need_total.get(g.shape, 0) + g.count
        if g.colour is not None:
            need_colour[g.shape, g.colour] = need_colour.get((g.shape, g.colour), 0) + g.count
    for shape, n in need_total.items():  # exact count per named shape (other shapes ignored)
        checks[f"count:{shape}"] = sum(d.shape == shape for d in dets) == n
    for (shape, colour), n in need_colour.items():  # at least that many of a named colour
        checks[f"colour:{colour} {shape}"] = sum(d.shape == shape and d.colour == colour for d in dets) >= n
    if spec.relation:
        members = [_members(dets, g, need_colour) for g in spec.groups[:2]]
        checks[f"relation:{spec.relation}"] = bool(members[0]) and bool(members[1]) and all(
            _holds(a, b, spec.relation) for a in members[0] for b in members[1])
    exact = None
    if isinstance(scene, Scene):
        exact = sorted((d.shape, d.colour) for d in dets) == sorted((o.shape, o.colour) for o in scene.objects)
    return {"correct": all(checks.values()), "checks": checks, "exact": exact,
            "category": scene.category if isinstance(scene, Scene) else None,
            "detected": [d.__dict__.copy() for d in dets]}

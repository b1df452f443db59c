"""Embedded compositional data: coloured shapes with captions and ground truth.

Why: no image data can be downloaded, yet training and GenEval-style scoring need
captions whose every word is checkable in the pixels.  Each image comes from a
`Scene` (the ground truth) and the caption is generated from the scene;
`evaluation.scorer` re-detects the objects from pixels alone and judges
generated images against a scene or caption.

Conventions
- Scene geometry is in normalised image coordinates: x to the right, y downwards,
  both in [0, 1]; `size` is the side of an object's square bounding box.  The same
  scene renders at any resolution.
- Background is plain black.  Shapes are antialiased from signed distances, so an
  edge pixel is the object colour scaled by its coverage; dividing a pixel by its
  brightest channel recovers the object's hue, which is what the scorer classifies.
- GenEval categories (names as GenEval spells them): single_object, two_object,
  counting, colors, color_attr, position.  Captions say only what the category
  tests: "a circle", "a circle and a square", "three triangles", "a red circle",
  "a red circle and a blue square", "a red circle left of a blue square".
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

# --- vocabulary -------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # default vocabulary
ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")  # renderable and detectable
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

# Well separated in hue (after dividing by the brightest channel), so antialiased or
# dimmed pixels still classify; all bright enough to stand out from black.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 220),
    "white": (235, 235, 235),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND = (0, 0, 0)

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "color_attr", "position")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4

# Geometry (normalised units).  At 32x32: sizes 8-12 px, >= 2.5 px between objects,
# >= 1 px from the border; position pairs are offset along the named axis by at
# least 0.1 (3 px) more than along the other axis, so the relation is unambiguous.
SIZE_RANGE = (0.25, 0.375)
GAP = 0.08
MARGIN = 0.03
REL_MARGIN = 0.1

PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (C, 3), rows in COLOURS order


# --- scene structure --------------------------------------------------------------

@dataclass(frozen=True)
class Obj:
    """One shape: centre (cx, cy) and bounding-box side `size`, all normalised."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in normalised coordinates; multiply by resolution for pixels."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "cx": self.cx, "cy": self.cy,
                "size": self.size, "bbox": list(self.bbox)}

    @classmethod
    def from_dict(cls, d: dict) -> "Obj":
        return cls(str(d["shape"]), str(d["colour"]), float(d["cx"]), float(d["cy"]), float(d["size"]))


@dataclass(frozen=True)
class Relation:
    """objects[a] <kind> objects[b], e.g. kind="left of"."""

    kind: str
    a: int
    b: int


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: its GenEval category, objects and optional relation."""

    category: str
    objects: tuple[Obj, ...]
    relation: Relation | None = None

    def to_dict(self) -> dict:
        r = self.relation
        rel = None if r is None else {"kind": r.kind, "a": r.a, "b": r.b}
        return {"category": self.category, "objects": [o.to_dict() for o in self.objects], "relation": rel}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        r = d.get("relation")
        rel = None if r is None else Relation(str(r["kind"]), int(r["a"]), int(r["b"]))
        return cls(str(d["category"]), tuple(Obj.from_dict(o) for o in d["objects"]), rel)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "Scene":
        return cls.from_dict(json.loads(s))


@dataclass(frozen=True)
class Group:
    """What a caption asks for: `count` objects of `shape`, of `colour` when not None."""

    shape: str
    colour: str | None
    count: int


@dataclass(frozen=True)
class Spec:
    """The checkable content of a caption: groups, and for position a relation between
    group 0 and group 1 (every object of group 0 <relation> every object of group 1)."""

    groups: tuple[Group, ...]
    relation: str | None = None
    counting: bool = False  # caption uses number words ("one circle" rather than "a circle")


# --- scene sampling ---------------------------------------------------------------

def place(rng: np.random.Generator, sizes: np.ndarray, relation: str | None = None,
           tries: int = 128) -> np.ndarray:
    """Centres (k, 2) for boxes of the given sizes: inside the image, pairwise gap >= GAP,
    and objects 0/1 satisfying `relation` with margin.  Vectorised rejection sampling;
    shrinks sizes in place (deterministically) if a configuration is hard to find."""
    k = len(sizes)
    for _ in range(50):
        lo = sizes / 2 + MARGIN  # (k,)
        hi = 1 - lo
        c = lo[None, :, None] + rng.random((tries, k, 2)) * (hi - lo)[None, :, None]  # (T, k, 2)
        ok = np.ones(tries, dtype=bool)
        for i in range(k):
            for j in range(i + 1, k):
                d = np.abs(c[:, i] - c[:, j]).max(axis=1)  # Chebyshev distance of centres (T,)
                ok &= d - (sizes[i] + sizes[j]) / 2 >= GAP
        if relation is not None:
            dx = c[:, 1, 0] - c[:, 0, 0]  # b.x - a.x
            dy = c[:, 1, 1] - c[:, 0, 1]
            axes = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}
            along, across = axes[relation]
            ok &= along >= np.abs(across) + REL_MARGIN
        idx = np.flatnonzero(ok)
        if idx.size:
            return c[idx[0]]
        sizes *= 0.92
    raise RuntimeError("could not place objects")  # unreachable for k <= 4 with default sizes


def make_scene(rng: np.random.Generator, category: str | None = None,
               shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS) -> Scene:
    """Sample one scene of `category` (uniform over CATEGORIES when None)."""
    if category is None:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    ns, nc = len(shapes), len(colours)
    relation = None
    if category in ("single_object", "colors"):
        sh = [shapes[int(rng.integers(ns))]]
        co = [colours[int(rng.integers(nc))]]
    elif category == "counting":
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        sh = [shapes[int(rng.integers(ns))]] * n
        co = [colours[int(rng.integers(nc))]] * n
    else:  # two objects of different shapes
        si = rng.choice(ns, 2, replace=False)
        sh = [shapes[int(i)] for i in si]
        if category == "two_object":
            co = [colours[int(i)] for i in rng.integers(nc, size=2)]
        else:  # color_attr, position: distinct colours too
            co = [colours[int(i)] for i in rng.choice(nc, 2, replace=False)]
        if category == "position":
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    sizes = rng.uniform(*SIZE_RANGE, size=len(sh))
    centres = place(rng, sizes, relation)
    objs = tuple(Obj(s, c, float(x), float(y), float(z)) for s, c, (x, y), z in zip(sh, co, centres, sizes))
    return Scene(category, objs, None if relation is None else Relation(relation, 0, 1))


# --- captions ---------------------------------------------------------------------

def spec_of(scene: Scene) -> Spec:
    """The caption-level content of a scene (what its category asks to be checked)."""
    cat, o = scene.category, scene.objects
    if cat == "single_object":
        return Spec((Group(o[0].shape, None, 1),))
    if cat == "two_object":
        return Spec((Group(o[0].shape, None, 1), Group(o[1].shape, None, 1)))
    if cat == "counting":
        return Spec((Group(o[0].shape, None, len(o)),), counting=True)
    if cat == "colors":
        return Spec((Group(o[0].shape, o[0].colour, 1),))
    if cat == "color_attr":
        return Spec((Group(o[0].shape, o[0].colour, 1), Group(o[1].shape, o[1].colour, 1)))
    if cat == "position":
        r = scene.relation
        a, b = o[r.a], o[r.b]
        return Spec((Group(a.shape, a.colour, 1), Group(b.shape, b.colour, 1)), r.kind)
    raise ValueError(f"unknown category {cat!r}")


def _phrase(g: Group, counting: bool) -> str:
    n = NUMBERS[g.count] if (counting or g.count > 1) else "a"
    noun = PLURALS[g.shape] if g.count > 1 else g.shape
    return " ".join(w for w in (n, g.colour, noun) if w)


def spec_text(spec: Spec) -> str:
    """Render a Spec as a caption (inverse of `parse_caption`)."""
    parts = [_phrase(g, spec.counting) for g in spec.groups]
    if spec.relation:
        return f"{parts[0]} {spec.relation} {parts[1]}"
    return " and ".join(parts)


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. "a red circle left of a blue square"."""
    return spec_text(spec_of(scene))


def category_captions(category: str, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS) -> list[str]:
    """Every caption `make_scene` can produce for one category with this vocabulary."""
    pairs = [(a, b) for a in shapes for b in shapes if a != b]
    cpairs = [(a, b) for a in colours for b in colours if a != b]
    if category == "single_object":
        return [spec_text(Spec((Group(s, None, 1),))) for s in shapes]
    if category == "two_object":
        return [spec_text(Spec((Group(a, None, 1), Group(b, None, 1)))) for a, b in pairs]
    if category == "counting":
        return [spec_text(Spec((Group(s, None, n),), counting=True)) for s in shapes for n in NUMBERS]
    if category == "colors":
        return [spec_text(Spec((Group(s, c, 1),))) for s in shapes for c in colours]
    relations = (None,) if category == "color_attr" else RELATIONS if category == "position" else None
    if relations is None:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return [spec_text(Spec((Group(a, ca, 1), Group(b, cb, 1)), rel))
            for rel in relations for a, b in pairs for ca, cb in cpairs]


def all_captions(shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS) -> list[str]:
    """Every caption `make_scene` can produce with this vocabulary (about 940 by
    default), e.g. to pre-encode them all once before training."""
    return [c for category in CATEGORIES for c in category_captions(category, shapes, colours)]


# --- the held-out split -----------------------------------------------------------
# The whole caption space is small, so evaluation prompts are a fixed subset of it that
# training never draws (split "train" below excludes it; split "test" is that subset).
# Held out so that every word, and for the small categories every other caption, stays in
# training: the held-out captions test recombination of seen parts, as GenEval's prompts
# test combinations a model was not shown verbatim.
#   single_object  "a triangle"                    ("one triangle", "a red triangle" stay)
#   two_object     "a circle and a triangle", "a square and a circle" (the reverse orders stay)
#   counting       one per number: one square, two triangles, three circles, four squares
#   colors         one shape per colour: red circle, green square, blue triangle, yellow
#                  circle, purple square, white triangle
#   color_attr     16 of 180, position 24 of 720: a fixed draw (seed HELD_OUT_SEED)
HELD_OUT_SEED = 13
HELD_OUT_DRAWN = {"color_attr": 16, "position": 24}


def held_out_captions() -> dict[str, tuple[str, ...]]:
    """category -> the captions of the default vocabulary that training never draws."""
    held = {
        "single_object": ("a triangle",),
        "two_object": ("a circle and a triangle", "a square and a circle"),
        "counting": tuple(spec_text(Spec((Group(SHAPES[n % 3], None, n),), counting=True)) for n in NUMBERS),
        "colors": tuple(spec_text(Spec((Group(SHAPES[i % 3], c, 1),))) for i, c in enumerate(COLOURS)),
    }
    for category, n in HELD_OUT_DRAWN.items():
        pool = category_captions(category)
        rng = np.random.default_rng([HELD_OUT_SEED, CATEGORIES.index(category)])
        held[category] = tuple(pool[int(i)] for i in sorted(rng.choice(len(pool), n, replace=False)))
    return {category: held[category] for category in CATEGORIES}


_HELD_OUT = frozenset(c for captions in held_out_captions().values() for c in captions)
SPLITS = ("train", "test", "all")


def draw_scene(rng: np.random.Generator, category: str, split: str = "train") -> Scene:
    """A scene of `category` whose caption belongs to `split`: "train" redraws held-out captions,
    "test" redraws the others, "all" keeps every draw."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        scene = make_scene(rng, category)
        if split == "all" or (caption(scene) in _HELD_OUT) == (split == "test"):
            return scene


_WORD_NUM = {"a": 1, "an": 1, **{v: k for k, v in NUMBERS.items()}}
_NOUNS = {**{s: s for s in ALL_SHAPES}, **{p: s for s, p in PLURALS.items()}}
_REL_RE = re.compile(r"\s+(left of|right of|above|below)\s+")


def _parse_phrase(p: str) -> tuple[Group, bool]:
    words = p.split()
    if not 2 <= len(words) <= 3 or words[0] not in _WORD_NUM or words[-1] not in _NOUNS:
        raise ValueError(f"cannot parse phrase {p!r}")
    colour = words[1] if len(words) == 3 else None
    if colour is not None and colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}")
    return Group(_NOUNS[words[-1]], colour, _WORD_NUM[words[0]]), words[0] not in ("a", "an")


def parse_caption(text: str) -> Spec:
    """Parse a caption of this grammar (also prompts such as "two red circles left of a
    blue square") into a Spec, so prompts can be scored without a Scene."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    for prefix in ("a photo of ", "an image of "):
        t = t.removeprefix(prefix)
    m = _REL_RE.search(t)
    if m:
        parts, relation = [t[:m.start()], t[m.end():]], m.group(1)
    else:
        parts, relation = t.split(" and "), None
    parsed = [_parse_phrase(p) for p in parts]
    return Spec(tuple(g for g, _ in parsed), relation, any(num for _, num in parsed))


# --- rendering --------------------------------------------------------------------

def signed_distance(shape_ids: np.ndarray, dx: np.ndarray, dy: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Signed distance (normalised units, <0 inside) of each object's shape.
    shape_ids (N,), dx (N,1,W), dy (N,H,1), half (N,1,1) -> (N,H,W)."""
    out = np.empty((len(shape_ids), dy.shape[1], dx.shape[2]), dtype=np.float32)
    ax, ay = np.abs(dx), np.abs(dy)
    for sid, name in enumerate(ALL_SHAPES):
        m = shape_ids == sid
        if not m.any():
            continue
        X, Y, AX, AY, h = dx[m], dy[m], ax[m], ay[m], half[m]
        if name == "circle":
            d = np.sqrt(X * X + Y * Y) - h
        elif name == "square":
            d = np.maximum(AX, AY) - h
        elif name == "triangle":  # apex up, base at the bottom of the box
            d = np.maximum(Y - h, (2 * AX - Y - h) / np.sqrt(5, dtype=np.float32))
        else:  # cross: plus sign with arms a third of the box thick
            t = h / 3
            d = np.minimum(np.maximum(AX - h, AY - t), np.maximum(AX - t, AY - h))
        out[m] = d
    return out


def _coverage(shape_ids: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: np.ndarray,
              res: int) -> np.ndarray:
    """Antialiased coverage in [0,1] of N objects on a res x res grid: (N, res, res)."""
    u = (np.arange(res, dtype=np.float32) + 0.5) / res  # pixel centres
    dx = u[None, None, :] - cx.astype(np.float32)[:, None, None]  # (N,1,W)
    dy = u[None, :, None] - cy.astype(np.float32)[:, None, None]  # (N,H,1)
    sd = signed_distance(shape_ids, dx, dy, (size.astype(np.float32) / 2)[:, None, None])
    return np.clip(0.5 - sd * res, 0.0, 1.0)


def render_batch(scenes: Sequence[Scene], size: int = 32) -> np.ndarray:
    """Render scenes together (one vectorised pass over all objects): uint8 (B, H, W, 3)."""
    B = len(scenes)
    img_i, slot, sid, cid, cx, cy, sz = [], [], [], [], [], [], []
    shape_index = {s: i for i, s in enumerate(ALL_SHAPES)}
    colour_index = {c: i for i, c in enumerate(COLOURS)}
    for b, sc in enumerate(scenes):
        for k, o in enumerate(sc.objects):
            for column, value in ((img_i, b), (slot, k), (sid, shape_index[o.shape]), (cid, colour_index[o.colour]),
                                  (cx, o.cx), (cy, o.cy), (sz, o.size)):
                column.append(value)
    K = max((len(s.objects) for s in scenes), default=0)
    cov = np.zeros((B, max(K, 1), size, size), dtype=np.float32)  # (B,K,H,W)
    col = np.zeros((B, max(K, 1), 3), dtype=np.float32)  # (B,K,3)
    if img_i:
        img_i, slot = np.array(img_i), np.array(slot)
        cov[img_i, slot] = _coverage(np.array(sid), np.array(cx), np.array(cy), np.array(sz), size)
        col[img_i, slot] = PALETTE_RGB[np.array(cid)]
    img = np.einsum("bkhw,bkc->bhwc", cov, col)  # objects do not overlap: sum = composite
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    if bg.any():
        img += (1 - cov.sum(1))[..., None] * bg
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render one scene: uint8 (size, size, 3)."""
    return render_batch([scene], size)[0]


# --- batches ----------------------------------------------------------------------

def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 (B,H,W,3) -> float32 (B,3,H,W) in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def sample_batch(rng: np.random.Generator, batch_size: int, size: int = 32,
                 categories: Sequence[str] | None = None, split: str = "train"
                 ) -> tuple[np.ndarray, list[str], list[Scene]]:
    """A random batch: (images float32 (B,3,H,W) in [-1,1], captions, scenes).
    `categories` restricts (uniformly) which categories are drawn; `split` which captions
    (see `draw_scene`: training batches never show a held-out caption)."""
    cats = CATEGORIES if categories is None else tuple(categories)
    scenes = [draw_scene(rng, cats[int(rng.integers(len(cats)))], split) for _ in range(batch_size)]
    return to_model_range(render_batch(scenes, size)), [caption(s) for s in scenes], scenes


class ShapesDataset:
    """A fixed, indexable set of `n` scenes; item i depends only on (seed, i), so a
    larger set extends a smaller one.  Images are rendered once and kept as uint8.
    `ds[i]` -> (image float32 (3,H,W) in [-1,1], caption); `ds.scenes[i]` is the truth."""

    def __init__(self, n: int, seed: int = 0, size: int = 32, categories: Sequence[str] | None = None,
                 split: str = "train"):
        cats = CATEGORIES if categories is None else tuple(categories)
        self.size = size
        self.scenes: list[Scene] = []
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            self.scenes.append(draw_scene(rng, cats[int(rng.integers(len(cats)))], split))
        self.captions = [caption(s) for s in self.scenes]
        chunks = [render_batch(self.scenes[i:i + 1024], size) for i in range(0, n, 1024)]
        self.images = np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8)  # (n,H,W,3)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        return to_model_range(self.images[[i]])[0], self.captions[i]

    def batch(self, idx: Sequence[int] | np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Images float32 (B,3,H,W) in [-1,1] and captions for the given indices."""
        idx = np.asarray(idx)
        return to_model_range(self.images[idx]), [self.captions[int(i)] for i in idx]

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Endless shuffled batches, deterministic by seed."""
        rng = np.random.default_rng(seed)
        while True:
            perm = rng.permutation(len(self))
            for s in range(0, len(perm) - batch_size + 1, batch_size):
                yield self.batch(perm[s:s + batch_size])

"""Embedded data: determinism, captions vs scenes, ground truth vs pixels, digits."""

import numpy as np
import pytest

from rsr_model.data import digits
from rsr_model.data import shapes as S


def _scenes(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [S.make_scene(rng, **kw) for _ in range(n)]


def test_same_seed_same_batch_different_seed_differs():
    a = S.sample_batch(np.random.default_rng(7), 16)
    b = S.sample_batch(np.random.default_rng(7), 16)
    c = S.sample_batch(np.random.default_rng(8), 16)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    x = a[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1


def test_dataset_items_depend_only_on_seed_and_index():
    small, big = S.ShapesDataset(8, seed=3), S.ShapesDataset(20, seed=3)
    for i in range(8):
        assert np.array_equal(small[i][0], big[i][0]) and small[i][1] == big[i][1]
    assert small.scenes != S.ShapesDataset(8, seed=4).scenes
    x, caps = big.batch([0, 5])
    assert x.shape == (2, 3, 32, 32) and caps == [big.captions[0], big.captions[5]]
    b1, b2 = next(big.batches(4, seed=1)), next(big.batches(4, seed=1))
    assert np.array_equal(b1[0], b2[0]) and b1[1] == b2[1]


def test_every_category_is_generated_and_geometry_holds():
    scenes = _scenes(600, seed=1)
    assert {s.category for s in scenes} == set(S.CATEGORIES)
    for s in scenes:
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert x0 >= 0 and y0 >= 0 and x1 <= 1 and y1 <= 1
        for i, a in enumerate(s.objects):  # bounding boxes apart by at least GAP
            for b in s.objects[i + 1:]:
                d = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.size + b.size) / 2
                assert d >= S.GAP - 1e-9
        if s.category == "counting":
            assert 1 <= len(s.objects) <= 4 and len({(o.shape, o.colour) for o in s.objects}) == 1
        if s.category in ("color_attr", "position"):
            assert s.objects[0].colour != s.objects[1].colour and s.objects[0].shape != s.objects[1].shape


def test_scene_json_round_trip():
    for s in _scenes(50, seed=2):
        t = S.Scene.from_json(s.to_json())
        assert t == s
        assert np.array_equal(S.render(t), S.render(s))


def test_captions_match_scenes():
    examples = {
        "single_object": "a circle", "two_object": "a circle and a square", "counting": "three circles",
        "colors": "a red circle", "color_attr": "a red circle and a blue square",
        "position": "a red circle left of a blue square",
    }
    for cat, text in examples.items():
        spec = S.parse_caption(text)
        assert S.spec_text(spec) == text
    o = lambda sh, co, x, y: S.Obj(sh, co, x, y, 0.3)
    assert S.caption(S.Scene("counting", (o("triangle", "red", .2, .2), o("triangle", "red", .7,
                                                                          .7)))) == "two triangles"
    assert S.caption(S.Scene("counting", (o("square", "red", .2, .2),))) == "one square"
    pos = S.Scene("position", (o("square", "green", .8, .5), o("circle", "blue", .2, .5)), S.Relation("right of", 0, 1))
    assert S.caption(pos) == "a green square right of a blue circle"
    for s in _scenes(300, seed=3):
        c = S.caption(s)
        assert S.parse_caption(c) == S.spec_of(s)
        words = c.split()
        named = [w for w in words if w in S.PALETTE]
        if s.category in ("colors", "color_attr", "position"):
            assert named == [o.colour for o in s.objects]
        else:
            assert named == []
        if s.category == "counting":
            assert words[0] == S.NUMBERS[len(s.objects)]
    every = S.all_captions()
    assert len(every) == len(set(every))
    assert {S.caption(s) for s in _scenes(300, seed=3)} <= set(every)


def test_parse_caption_handles_prompts_with_counts_and_relations():
    spec = S.parse_caption("Two red circles left of a blue square.")
    assert spec.groups == (S.Group("circle", "red", 2), S.Group("square", "blue", 1)) and spec.relation == "left of"
    with pytest.raises(ValueError):
        S.parse_caption("a dog on a sofa")


def test_digits_shapes_labels_and_determinism():
    x, y = digits.load_digits_images(16, 1)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == np.float32 and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1 and set(np.unique(y)) == set(range(10))
    x3, _ = digits.load_digits_images(32, 3, split="test")
    assert x3.shape == (297, 3, 32, 32) and np.array_equal(x3[:, 0], x3[:, 2])
    # the upsampled image is the 8x8 digit: average-pooling back recovers it closely
    from sklearn.datasets import load_digits
    raw = load_digits().images[:10] / 8.0 - 1  # (10,8,8) in [-1,1]
    pooled = x[:10, 0].reshape(10, 8, 2, 8, 2).mean((2, 4))
    for p, r in zip(pooled, raw):
        assert np.corrcoef(p.ravel(), r.ravel())[0, 1] > 0.95
    a = digits.sample_batch(np.random.default_rng(0), 8)
    b = digits.sample_batch(np.random.default_rng(0), 8)
    c = digits.sample_batch(np.random.default_rng(1), 8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert a[0].shape == (8, 1, 16, 16) and a[1].dtype == np.int64
    e1, e2 = next(digits.batches(32, seed=2)), next(digits.batches(32, seed=2))
    assert np.array_equal(e1[0], e2[0]) and len(set(e1[1].tolist())) > 1

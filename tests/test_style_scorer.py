"""The style scorer of the shifted task (evaluation/style_scorer.py), on rendered ground truth."""
import numpy as np
import pytest

from evaluation import style_scorer
from evaluation.scorer import as_uint8_hwc
from evaluation.style_scorer import check_styled, score_styled, unstyle
from rsr_model.data import shapes, styles


def _pixels(images: np.ndarray) -> np.ndarray:
    return np.stack([as_uint8_hwc(im) for im in images])


@pytest.fixture(scope="module")
def checked():
    return check_styled(n=160, seed=1)


def test_rendered_styled_scenes_are_scored_correct(checked):
    assert checked["accuracy"] == 1.0
    assert all(s["n"] > 0 and s["accuracy"] == 1.0 for s in checked["by_style"].values()), checked


def test_wrong_styles_and_plain_images_are_rejected(checked):
    by = checked["by_style"]
    assert by["negative"]["rejects"] == {"swapped": 1.0, "reversed": 1.0, "gray": 1.0, "plain": 1.0}
    assert by["gray"]["rejects"]["negative"] == 1.0
    assert min(by["gray"]["rejects"].values()) > 0.7  # white objects stay white under a channel map
    # a colourless caption cannot tell swapped from reversed or from plain (stated in the module)
    for style in ("swapped", "reversed"):
        assert 0.2 < by[style]["rejects"]["plain"] < 0.8, by[style]
        assert by[style]["rejects"]["negative"] > 0.8


def test_unstyle_inverts_every_invertible_style():
    rng = np.random.default_rng(0)
    scenes = [shapes.make_scene(rng, "colors") for _ in range(6)]
    plain = shapes.to_model_range(shapes.render_batch(scenes, 32))
    for style in ("negative", "swapped", "reversed"):
        back = np.stack([unstyle(im, style) for im in _pixels(styles.apply_style(plain, style))])
        assert np.abs(back.astype(int) - _pixels(plain).astype(int)).max() <= 1, style


def test_gray_needs_a_gray_image_and_ignores_colour_words():
    rng = np.random.default_rng(2)
    scene = shapes.make_scene(rng, "color_attr")
    plain = shapes.to_model_range(shapes.render_batch([scene], 32))
    caption = shapes.caption(scene)
    gray = _pixels(styles.apply_style(plain, "gray"))[0]
    assert score_styled(gray, styles.styled_caption(caption, "gray"))["correct"]
    assert not score_styled(_pixels(plain)[0], styles.styled_caption(caption, "gray"))["correct"]
    assert style_scorer.is_gray(gray) and not style_scorer.is_gray(_pixels(plain)[0])


def test_a_caption_without_style_is_the_plain_scorer():
    from evaluation.scorer import score

    rng = np.random.default_rng(3)
    scene = shapes.make_scene(rng, "position")
    image = _pixels(shapes.to_model_range(shapes.render_batch([scene], 32)))[0]
    assert score_styled(image, shapes.caption(scene)) == score(image, shapes.caption(scene))

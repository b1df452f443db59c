"""The scorer: rendered ground truth passes, altered scenes fail, and `evaluate --scorer-check`."""
import dataclasses
import json

import numpy as np
import pytest

from evaluation import scorer
from evaluation.check import WRONG_KINDS, scorer_check
from rsr_model.__main__ import main
from rsr_model.data import shapes as S


def _scenes(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [S.make_scene(rng, **kw) for _ in range(n)]


def test_ground_truth_matches_pixels():
    scenes = _scenes(500, seed=4)
    images = S.render_batch(scenes, 32)
    for s, im in zip(scenes, images):
        r = scorer.score(im, s)
        assert r["correct"] and r["exact"], (S.caption(s), r)
    # also as float CHW in [-1,1] (what a sampler returns) and against the caption alone
    x, caps, sc = S.sample_batch(np.random.default_rng(5), 20)
    assert all(scorer.score(x[i], caps[i])["correct"] for i in range(20))


@pytest.mark.parametrize("size", [16, 64])
def test_ground_truth_matches_pixels_at_other_resolutions(size):
    scenes = _scenes(60, seed=size)
    for s, im in zip(scenes, S.render_batch(scenes, size)):
        assert scorer.score(im, s)["exact"]


def _replace_obj(scene, i, **kw):
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(objs[i], **kw)
    return dataclasses.replace(scene, objects=tuple(objs))


def test_altered_scenes_fail():
    rng = np.random.default_rng(6)
    for _ in range(40):
        for cat in S.CATEGORIES:
            s = S.make_scene(rng, cat)
            im = S.render(s)
            o = s.objects[0]
            other_shape = next(x for x in S.SHAPES if x != o.shape)
            bad = _replace_obj(s, 0, shape=other_shape)
            assert not scorer.score(im, bad)["correct"] and not scorer.score(im, bad)["exact"]
            other_colour = next(c for c in S.COLOURS if c != o.colour)
            bad = _replace_obj(s, 0, colour=other_colour)
            assert not scorer.score(im, bad)["exact"]
            # colour is only checked where the caption names it
            assert scorer.score(im, bad)["correct"] == (cat not in ("colors", "color_attr", "position"))
            if cat == "counting":
                fewer = dataclasses.replace(s, objects=s.objects[1:]) if len(s.objects) > 1 else None
                more = dataclasses.replace(s, objects=s.objects + (dataclasses.replace(o, cx=0.5, cy=0.5),))
                for bad in filter(None, (fewer, more)):
                    assert not scorer.score(im, bad)["correct"]
            if cat == "position":
                flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
                bad = dataclasses.replace(s, relation=S.Relation(flip[s.relation.kind], 0, 1))
                assert not scorer.score(im, bad)["correct"]


def test_blank_and_wrong_images_fail():
    s = S.make_scene(np.random.default_rng(0), "colors")
    assert not scorer.score(np.zeros((32, 32, 3), np.uint8), s)["correct"]
    other = S.make_scene(np.random.default_rng(1), "two_object")
    assert not scorer.score(S.render(other), s)["correct"]



def test_scorer_check_meets_its_target_and_reports_every_cell():
    result = scorer_check(resolutions=(24, 32), scenes=10)
    assert set(result["cells"]) == {f"{r}/{c}" for r in (24, 32) for c in S.CATEGORIES}
    position = result["cells"]["24/position"]
    assert set(position["rejection"]) == set(WRONG_KINDS) and position["n_wrong"]["relation"] == 10
    assert "colour" not in result["cells"]["32/counting"]["rejection"]  # counting captions name no colour
    assert result["passed"] and result["worst_accuracy"] == 1.0 and result["worst_noisy_accuracy"] >= 0.99


def test_scorer_check_command_writes_json_and_markdown(tmp_path, capsys):
    assert main(["evaluate", "--scorer-check", "--scenes", "4", "--resolutions", "24", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| 24 | position |" in printed and "meets the 99% target" in printed
    saved = json.loads((tmp_path / "scorer_check.json").read_text())
    assert saved["scenes"] == 4 and saved["passed"]
    assert (tmp_path / "scorer_check.md").read_text().startswith("| resolution |")
    # a second run refuses to replace the files without --overwrite
    assert main(["evaluate", "--scorer-check", "--scenes", "4", "--resolutions", "24", "--out", str(tmp_path)]) == 2

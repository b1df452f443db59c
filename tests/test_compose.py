"""`tiny-compose`, the paper-like shifted task: base on single objects, RSR stage on relations and
attribute binding, held-out combinations never shown in training (rsr_model/data/compose.py)."""

import csv

import numpy as np
import pytest

from rsr_model.data import compose, shapes
from rsr_model.tasks import get_task

from .conftest import train


def _converse(scene: shapes.Scene) -> shapes.Scene:
    """The same picture described from the other object: "A left of B" -> "B right of A"."""
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    rel = scene.relation
    return shapes.Scene(scene.category, scene.objects[::-1], shapes.Relation(flip[rel.kind], rel.a, rel.b))


@pytest.mark.parametrize("split, held", [("train", False), ("test", True)])
def test_training_never_shows_a_held_out_combination_and_the_test_split_only_those(split, held):
    _, captions, scenes = compose.sample_batch(np.random.default_rng(0), 300, 16, split)
    assert {s.category for s in scenes} == set(compose.RSR_CATEGORIES)
    assert all(compose.held_out(s) == held for s in scenes)
    assert all(shapes.caption(s) == c for s, c in zip(scenes, captions))


def test_a_held_out_relation_is_held_out_with_its_converse_and_every_part_stays_in_training():
    rng = np.random.default_rng(1)
    _, _, test = compose.sample_batch(rng, 200, 16, "test")
    for scene in (s for s in test if s.category == "position"):
        assert compose.held_out(_converse(scene)), shapes.caption(scene)
    _, _, train_scenes = compose.sample_batch(rng, 600, 16, "train")
    # every shape pair and every colour still appears in training: only their combinations are new
    pairs = {frozenset(str(o.shape) for o in s.objects) for s in train_scenes if s.category == "position"}
    assert len(pairs) == 3
    colours = {str(o.colour) for s in train_scenes if s.category == "color_attr" for o in s.objects}
    assert colours == set(shapes.COLOURS)


def test_tiny_compose_trains_its_base_on_single_objects_and_the_rsr_stage_on_compositions(tmp_path):
    task = get_task("tiny-compose")
    assert task.describe("a red circle left of a blue square")["attributes"]["subtask"] == "relation"
    assert task.describe("a red circle and a blue square")["attributes"]["subtask"] == "attributes"
    out = tmp_path / "compose.pt"
    assert train(out, "--preset", "tiny-compose", "--upcycle-steps", "1", "--soft-steps", "1", steps=4) == 0
    with open(str(out) + ".log.csv") as f:
        stages = [r["stage"] for r in csv.DictReader(f)]
    assert stages.count("base") == 4 and stages.count("rsr") == 4


def test_the_base_stage_draws_only_single_object_categories(monkeypatch):
    task = get_task("tiny-compose")
    seen = []
    real = shapes.sample_batch

    def spy(rng, n, size=32, categories=None, split="train"):
        seen.append(tuple(categories))
        return real(rng, n, size, categories, split)
    monkeypatch.setattr(shapes, "sample_batch", spy)
    task.stage_batch("base", np.random.default_rng(0), 8)
    assert seen == [compose.BASE_CATEGORIES]

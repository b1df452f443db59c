"""The evaluation prompt set is held apart from training and covers every GenEval category."""
import json

import numpy as np

from evaluation import prompts
from rsr_model.__main__ import main
from rsr_model.data import shapes as S


def test_no_evaluation_prompt_is_ever_a_training_caption():
    held = {p for ps in prompts.evaluation_prompts().values() for p in ps}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):  # the training sampler as the tiny preset calls it, 3840 scenes
        _, captions, _ = S.sample_batch(rng, 64, size=8)
        seen.update(captions)
    assert not held & seen
    assert not held & set(S.ShapesDataset(500, size=8).captions)
    # most of the rest of the caption space is drawn, so the exclusion is not by chance
    assert len(seen) > 0.5 * (len(S.all_captions()) - len(held))


def test_held_out_prompts_recombine_words_seen_in_training():
    per_category = prompts.evaluation_prompts()
    assert list(per_category) == list(S.CATEGORIES) and all(per_category.values())
    held = {p for ps in per_category.values() for p in ps}
    training = [c for c in S.all_captions() if c not in held]
    words = {w for c in training for w in c.split()}
    for category, ps in per_category.items():
        assert set(ps) <= set(S.category_captions(category))
        for p in ps:
            assert set(p.split()) <= words, p
            assert prompts.category_of(S.parse_caption(p)) == category
    # the held-out split, drawn as a split, gives only held-out captions
    _, test_captions, _ = S.sample_batch(np.random.default_rng(1), 64, size=8, split="test")
    assert set(test_captions) <= held


def test_plan_balances_categories_and_geneval_metadata():
    planned = prompts.plan(5)
    assert len(planned) == 30 and {p.category for p in planned} == set(S.CATEGORIES)
    single = [p for p in planned if p.category == "single_object"]
    assert [p.seed for p in single] == [0, 1, 2, 3, 4] and {p.prompt for p in single} == {"a triangle"}
    meta = prompts.geneval_metadata("a red circle left of a blue square")
    assert meta == {"tag": "position", "include": [{"class": "square", "count": 1, "color": "blue"},
                                                   {"class": "circle", "count": 1, "color": "red",
                                                    "position": ["left of", 0]}],
                    "prompt": "a red circle left of a blue square"}
    assert prompts.geneval_metadata("three circles")["exclude"] == [{"class": "circle", "count": 4}]


def test_prompts_out_writes_the_set(tmp_path):
    out = tmp_path / "prompts.txt"
    assert main(["evaluate", "--prompts-out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines == [p for ps in prompts.evaluation_prompts().values() for p in ps]
    assert json.loads((tmp_path / "prompts.jsonl").read_text().splitlines()[0])["tag"] == "single_object"

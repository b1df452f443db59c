"""The evaluation prompt set: per GenEval category, captions training never draws.

The prompts are the held-out split of the shapes world (`shapes.held_out_captions`, where the
rule is documented): 1 single-object, 2 two-object, 4 counting, 6 colour, 16 colour-attribution
and 24 position prompts. Categories have very different numbers of prompts, so a plan gives every
category the same number of images, cycling over its prompts with consecutive sampler seeds.

`geneval_metadata` writes a prompt in the form of GenEval's `evaluation_metadata.jsonl`, so the
same prompts can go through GenEval's own evaluator.
"""
from __future__ import annotations

from dataclasses import dataclass

from rsr_model.data import shapes
from rsr_model.data.shapes import CATEGORIES


@dataclass(frozen=True)
class PlannedImage:
    """One image of an evaluation: which prompt, of which category, with which sampler seed."""

    category: str
    prompt: str
    seed: int


def evaluation_prompts() -> dict[str, tuple[str, ...]]:
    """category -> its fixed evaluation prompts (GenEval's six categories, in GenEval's order)."""
    return shapes.held_out_captions()


def plan(images_per_category: int, first_seed: int = 0) -> list[PlannedImage]:
    """`images_per_category` images per category, prompts in turn, seeds first_seed, first_seed+1, ..."""
    out = []
    for category, prompts in evaluation_prompts().items():
        for j in range(images_per_category):
            out.append(PlannedImage(category, prompts[j % len(prompts)], first_seed + j))
    return out


def category_of(spec: shapes.Spec) -> str:
    """The GenEval category a caption of the shapes grammar tests."""
    if spec.relation:
        return "position"
    if spec.counting:
        return "counting"
    coloured = spec.groups[0].colour is not None
    if len(spec.groups) == 2:
        return "color_attr" if coloured else "two_object"
    return "colors" if coloured else "single_object"


def geneval_metadata(prompt: str) -> dict:
    """GenEval's metadata line for a prompt of the shapes grammar: tag, include (class, count,
    color, and for position ["<relation>", 0] on the object placed relative to object 0),
    exclude (counting: no more than asked), prompt (verbatim)."""
    spec = shapes.parse_caption(prompt)
    include = [{"class": g.shape, "count": g.count, **({"color": g.colour} if g.colour else {})} for g in spec.groups]
    meta: dict = {"tag": category_of(spec)}
    if spec.relation:  # "A left of B": GenEval lists B first and puts the relation on A
        include = [include[1], {**include[0], "position": [spec.relation, 0]}]
    meta["include"] = include
    if spec.counting:
        meta["exclude"] = [{"class": g.shape, "count": g.count + 1} for g in spec.groups]
    meta["prompt"] = prompt
    return meta


__all__ = ["CATEGORIES", "PlannedImage", "category_of", "evaluation_prompts", "geneval_metadata", "plan"]

"""Plans from the start frame alone, judged against the environment, for `sample --map`,
`probes.record --maps` and benchmarks/frozenlake_eval.py.

Stop rule: the model rolls out all L latent steps in one forward pass (the gate choosing every
step's expert); the plan is the actions up to the first decoded frame whose agent stands on
the goal or in a hole, else all L - 1 actions (the horizon). Cells are read from decoded
frames with `maps.read_cells`.

A plan is judged twice:
- by its frames: the decoded agent starts on the start cell, reaches the goal, never stands in
  a hole, and every decoded move is a legal one (no jump, no diagonal);
- by the environment: gymnasium replays the chosen actions and ends on the goal.

Failure modes are counted per plan, as the paper names them: the replay falls into a hole;
a decoded move is diagonal or otherwise impossible (more than one cell); the decoded frames
disagree with the replay; the horizon ends first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ...install import RSR
from ..base import Task
from . import maps as lake
from .model import decode, rollout
from .task import to_model


def start_frames(maps: Sequence[lake.Map]) -> torch.Tensor:
    return to_model(np.stack([lake.render(m, lake.find(m, "S")[0]) for m in maps]))


@dataclass
class Plan:
    """One map's plan: the first `length` actions are the plan, frames and votes cover all L steps."""

    map: lake.Map
    actions: list[int]  # (L,) the gate's action of every latent step
    length: int  # actions in the plan (stop rule)
    frames: np.ndarray  # uint8 (L, H, W, 3) decoded frame of every latent step
    cells: list[int]  # (L,) agent cell read from each decoded frame
    agreement: list[float]  # (L,) share of tokens that voted for the step's action
    votes: np.ndarray  # (L, N) every token's own choice (argmax of its gate logits)
    probs: np.ndarray  # (L, N, K) gate probabilities

    @property
    def plan(self) -> list[int]:
        return self.actions[:self.length]

    def names(self) -> list[str]:
        return [lake.ACTIONS[a] for a in self.plan]


@torch.no_grad()
def make_plans(task: Task, net: nn.Module, rsr: RSR, maps: Sequence[lake.Map], batch_size: int = 64) -> list[Plan]:
    """The gate's plan for each map, from its start frame alone (no label enters)."""
    net.eval()
    plans = []
    for start in range(0, len(maps), batch_size):
        chunk = list(maps[start:start + batch_size])
        roll = rollout(net, rsr, start_frames(chunk))
        frames = decode(net, roll.latents)  # (B, L, 3, H, W)
        B, L = frames.shape[:2]
        images = task.to_images(frames.flatten(0, 1))
        images = images.reshape(B, L, *images.shape[1:])  # (B, L, H, W, 3)
        for b, m in enumerate(chunk):
            n = len(m)
            cells = [lake.read_cells(images[b, l], n)[1] for l in range(L)]
            length = next((l for l in range(1, L) if m[cells[l] // n][cells[l] % n] in "GH"), L - 1)
            plans.append(Plan(map=m, actions=roll.actions[b].tolist(), length=length, frames=images[b], cells=cells,
                              agreement=roll.agreement[b].tolist(), votes=roll.logits[b].argmax(-1).numpy(),
                              probs=roll.logits[b].softmax(-1).numpy()))
    return plans


@torch.no_grad()
def teacher_forced_frame_accuracy(task: Task, net: nn.Module, rsr: RSR, maps: Sequence[lake.Map]) -> float:
    """Share of frames decoded correctly (read cell by cell) when the true actions force the experts:
    the latent dynamics and the decoder on their own, without the gate's choices."""
    net.eval()
    episodes = [lake.episode(m) for m in maps]
    frames, actions = task.padded(episodes)
    decoded = decode(net, rollout(net, rsr, frames[:, 0], actions).latents)
    correct = []
    for b, ep in enumerate(episodes):
        images = task.to_images(decoded[b])
        truth = task.to_images(frames[b])
        n = len(ep.desc)
        correct += [lake.read_cells(images[l], n) == lake.read_cells(truth[l], n) for l in range(len(ep.frames))]
    return float(np.mean(correct))


def distances_to_goal(desc: lake.Map) -> dict[int, int]:
    """Fewest actions from every state to the goal without entering a hole (unreachable states left out)."""
    holes = set(lake.find(desc, "H"))
    paths = {s: lake.shortest_path(desc, start=s) for s in range(len(desc) ** 2) if s not in holes}
    return {s: len(p) for s, p in paths.items() if p is not None}


@dataclass
class Judgement:
    success_frames: bool
    success_env: bool
    fell_in_hole: bool
    diagonal_moves: int
    impossible_moves: int  # more than one cell, diagonals included
    frames_disagree_env: bool
    timed_out: bool
    actions_match: list[bool]  # per step of the shortest plan: the chosen action is the label
    actions_optimal: list[bool]  # per plan step: the action shortens the distance to the goal
    frames_correct: list[bool]  # per step until the replay ends: decoded frame == environment's frame
    plan_length: int
    shortest_length: int


def judge(plan: Plan) -> Judgement:
    m, n = plan.map, len(plan.map)
    label = lake.shortest_path(m)
    states = lake.replay(m, plan.plan)  # stops where the episode ends
    goal, holes = lake.find(m, "G")[0], set(lake.find(m, "H"))
    cells = plan.cells[:plan.length + 1]
    jumps = [(abs(b // n - a // n), abs(b % n - a % n)) for a, b in zip(cells, cells[1:])]  # (rows, cols) moved
    diagonal = sum(dr == 1 and dc == 1 for dr, dc in jumps)
    impossible = sum(dr + dc > 1 for dr, dc in jumps)
    success_frames = (cells[0] == lake.find(m, "S")[0] and cells[-1] == goal and not holes & set(cells)
                      and impossible == 0)
    dist = distances_to_goal(m)
    optimal = [dist.get(b, -1) == dist.get(a, -2) - 1 for a, b in zip(states, states[1:])]
    tiles = lake.drawn_tiles(m)
    frames_correct = [lake.read_cells(plan.frames[l], n) == (tiles, s) for l, s in enumerate(states)]
    return Judgement(
        success_frames=bool(success_frames), success_env=states[-1] == goal, fell_in_hole=states[-1] in holes,
        diagonal_moves=int(diagonal), impossible_moves=int(impossible),
        frames_disagree_env=cells[:len(states)] != states,
        timed_out=plan.length == len(plan.actions) - 1 and cells[-1] != goal,
        actions_match=[a == b for a, b in zip(plan.actions, label)], actions_optimal=optimal,
        frames_correct=frames_correct, plan_length=plan.length, shortest_length=len(label))


def summarize(judgements: Sequence[Judgement], plans: Sequence[Plan]) -> dict[str, Any]:
    """Rates over maps (success, failure modes) and over steps (action and frame accuracy)."""
    def rate(values) -> float:
        values = list(values)
        return float(np.mean(values)) if values else float("nan")

    steps = lambda key: [x for j in judgements for x in getattr(j, key)]
    return {
        "maps": len(judgements),
        "success_frames": rate(j.success_frames for j in judgements),
        "success_env": rate(j.success_env for j in judgements),
        "action_accuracy": rate(steps("actions_match")),
        "action_optimal": rate(steps("actions_optimal")),
        "frame_accuracy": rate(steps("frames_correct")),
        "token_agreement": rate(a for p in plans for a in p.agreement[:p.length]),
        "failures": {
            "hole": int(sum(j.fell_in_hole for j in judgements)),
            "diagonal_moves": int(sum(j.diagonal_moves for j in judgements)),
            "impossible_moves": int(sum(j.impossible_moves for j in judgements)),
            "frames_disagree_env": int(sum(j.frames_disagree_env for j in judgements)),
            "timed_out": int(sum(j.timed_out for j in judgements)),
        },
        "mean_plan_length": rate(j.plan_length for j in judgements),
        "mean_shortest_length": rate(j.shortest_length for j in judgements),
    }

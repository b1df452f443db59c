"""FrozenLake maps, their shortest plans, and the project's own frame renderer.

Maps come from gymnasium's generator (`generate_random_map`: start at the top-left, goal at
the bottom-right, each other cell frozen with probability `frozen`, redrawn until the goal is
reachable) and the dynamics are gymnasium's `FrozenLakeEnv` with `is_slippery=False`: the
transition table `env.P` is searched breadth-first for a shortest action sequence, so the
supervision and the replay in `replay` use the environment's own rules (a move into the
border leaves the agent in place; a hole or the goal ends the episode).

Frames are drawn here, not by gymnasium's pygame renderer, at `CELL` pixels per cell: every
cell is a flat tile colour and the agent is a square in the middle of its cell, so the tile
under the agent stays visible. `read_cells` inverts the drawing by the nearest template per
cell, which is how decoded frames are judged.

Held-out maps: `split_maps` draws evaluation maps from their own seed stream and
`TrainingMaps` rejects any training draw whose *content* equals an evaluation map, so the
two sets are disjoint by what the maps are, whatever seeds produced them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from cli_common.errors import UserError

# gymnasium's action ids; the four experts of the navigation preset are these four actions.
LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ACTIONS = ("left", "down", "right", "up")
MOVES = {LEFT: (0, -1), DOWN: (1, 0), RIGHT: (0, 1), UP: (-1, 0)}
TILES = "SFHG"
CELL = 4  # pixels per cell: 4x4 maps are 16x16 frames
COLOURS = {  # RGB of each tile, and of the agent
    "S": (200, 230, 250), "F": (200, 230, 250),  # start is frozen ice, as in gymnasium
    "H": (20, 40, 110), "G": (60, 190, 60), "agent": (230, 40, 40),
}


class MapError(UserError):
    """A map given as text that is not a playable FrozenLake map."""


Map = tuple[str, ...]  # rows of tile letters, e.g. ("SFFF", "FHFH", "FFFH", "HFFG")


def map_text(desc: Sequence[str]) -> str:
    """The map as one line, rows joined by '/': the form the command line takes."""
    return "/".join(desc)


@lru_cache(maxsize=4096)
def _env(desc: Map):
    from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

    return FrozenLakeEnv(desc=list(desc), is_slippery=False)


def transitions(desc: Map) -> dict[int, dict[int, tuple[int, bool]]]:
    """state -> action -> (next state, episode ends), read from gymnasium's table P."""
    P = _env(desc).P
    return {s: {a: (P[s][a][0][1], bool(P[s][a][0][3])) for a in P[s]} for s in P}


def find(desc: Sequence[str], tile: str) -> list[int]:
    n = len(desc)
    return [r * n + c for r in range(n) for c in range(n) if desc[r][c] == tile]


def shortest_path(desc: Map, start: int | None = None) -> list[int] | None:
    """A shortest action sequence from S (or state `start`) to G that never enters a hole (None if there is none).

    Breadth-first over gymnasium's transitions; ties go to the lower action id, so the
    answer is deterministic.
    """
    table = transitions(desc)
    start, goal = find(desc, "S")[0] if start is None else start, find(desc, "G")[0]
    holes = set(find(desc, "H"))
    parent: dict[int, tuple[int, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        s = queue.popleft()
        if s == goal:
            actions = []
            while parent[s] is not None:
                s, a = parent[s]
                actions.append(a)
            return actions[::-1]
        for a in range(4):
            nxt, _ = table[s][a]
            if nxt not in parent and nxt not in holes:
                parent[nxt] = (s, a)
                queue.append(nxt)
    return None


def replay(desc: Map, actions: Sequence[int]) -> list[int]:
    """States visited by `actions` from S in gymnasium's environment, stopping where the episode ends."""
    env = _env(desc)
    state, _ = env.reset()
    states = [int(state)]
    for a in actions:
        state, _, terminated, _, _ = env.step(int(a))
        states.append(int(state))
        if terminated:
            break
    return states


# --- rendering --------------------------------------------------------------------------------
def render(desc: Sequence[str], agent: int | None) -> np.ndarray:
    """uint8 (n*CELL, n*CELL, 3): tiles, and the agent as a square in the middle of cell `agent` (None: no agent)."""
    n = len(desc)
    tiles = np.array([[COLOURS[t] for t in row] for row in desc], np.uint8)  # (n, n, 3)
    frame = tiles.repeat(CELL, 0).repeat(CELL, 1)
    if agent is not None:
        r, c = divmod(agent, n)
        inset = CELL // 4
        frame[r * CELL + inset:(r + 1) * CELL - inset, c * CELL + inset:(c + 1) * CELL - inset] = COLOURS["agent"]
    return frame


def _templates() -> tuple[np.ndarray, list[tuple[str, bool]]]:
    """Every drawing of one cell: (tile, agent there?) -> (CELL, CELL, 3) float."""
    keys = [(t, a) for t in "FHG" for a in (False, True)]
    cells = [render([t], 0 if agent else None) for t, agent in keys]
    return np.stack(cells).astype(np.float32), keys


def drawn_tiles(desc: Sequence[str]) -> list[str]:
    """The tile letter of every cell as frames show it (row-major; the start is drawn as ice)."""
    return ["F" if t == "S" else t for row in desc for t in row]


def read_cells(frame: np.ndarray, n: int) -> tuple[list[str], int]:
    """Read a (possibly decoded) frame back: the tile letter of every cell ('F' for ice) and
    the agent's cell, the one that looks most like a cell with the agent on it."""
    templates, keys = _templates()
    cells = frame.astype(np.float32).reshape(n, CELL, n, CELL, 3).transpose(0, 2, 1, 3, 4).reshape(n * n, -1)
    dist = ((cells[:, None] - templates.reshape(len(keys), -1)[None]) ** 2).sum(-1)  # (cells, templates)
    tiles = [keys[i][0] for i in dist.argmin(1)]
    with_agent = [i for i, k in enumerate(keys) if k[1]]
    without = [i for i, k in enumerate(keys) if not k[1]]
    agent_score = dist[:, without].min(1) - dist[:, with_agent].min(1)  # large: the agent is drawn there
    return tiles, int(agent_score.argmax())


# --- maps given as text ------------------------------------------------------------------------
def parse_map(text: str) -> Map:
    """'SFFF/FHFH/FFFH/HFFG' -> rows; MapError unless square, known tiles, one S, one G, G reachable."""
    rows = tuple(r.strip() for r in text.strip().replace("\n", "/").split("/") if r.strip())
    if not rows:
        raise MapError("empty map; give rows of S, F, H, G joined by '/', e.g. SFFF/FHFH/FFFH/HFFG")
    n = len(rows)
    if any(len(r) != n for r in rows):
        raise MapError(f"map must be square: {n} rows of lengths {[len(r) for r in rows]}")
    bad = sorted({ch for r in rows for ch in r} - set(TILES))
    if bad:
        raise MapError(f"unknown tile(s) {''.join(bad)!r}; tiles are S (start), F (ice), H (hole), G (goal)")
    for tile, name in (("S", "start"), ("G", "goal")):
        count = sum(r.count(tile) for r in rows)
        if count != 1:
            raise MapError(f"map must have exactly one {name} ({tile}), found {count}")
    if shortest_path(rows) is None:
        raise MapError(f"goal not reachable from the start without crossing a hole in {map_text(rows)}")
    return rows


# --- data sets -----------------------------------------------------------------------------------
def random_map(size: int, frozen: float, seed: int) -> Map:
    """gymnasium's generated map (start top-left, goal bottom-right) under one of the square's
    eight symmetries chosen by the seed, so that start and goal sit in any pair of opposite
    corners and shortest plans use all four actions, not only down and right."""
    from gymnasium.envs.toy_text.frozen_lake import generate_random_map

    grid = np.array([list(row) for row in generate_random_map(size=size, p=frozen, seed=seed)])
    symmetry = np.random.default_rng(seed).integers(8)
    grid = np.rot90(grid, symmetry % 4)
    if symmetry >= 4:
        grid = grid.T
    return tuple("".join(row) for row in grid)


@dataclass(frozen=True)
class Episode:
    """A map, its shortest plan and what the plan shows: frames[l] is the agent after l actions."""

    desc: Map
    actions: list[int]  # length T
    states: list[int]  # length T + 1
    frames: np.ndarray  # uint8 (T + 1, H, W, 3)


@lru_cache(maxsize=20000)
def episode(desc: Map) -> Episode:
    actions = shortest_path(desc)
    if actions is None:
        raise MapError(f"goal not reachable in {map_text(desc)}")
    states = replay(desc, actions)
    return Episode(desc, actions, states, np.stack([render(desc, s) for s in states]))


EVAL_SEED_OFFSET = 1_000_000_007  # evaluation maps come from their own seed stream


def split_maps(size: int, frozen: float, n_eval: int, horizon: int) -> list[Map]:
    """The held-out evaluation maps of a map size: distinct, each with a plan of at most `horizon` actions."""
    maps: list[Map] = []
    seed = EVAL_SEED_OFFSET + size
    while len(maps) < n_eval:
        m = random_map(size, frozen, seed)
        seed += 1
        if m not in maps and len(shortest_path(m)) <= horizon:
            maps.append(m)
    return maps


class TrainingMaps:
    """Random training maps that never equal an evaluation map (compared by content)."""

    def __init__(self, size: int, frozen: float, horizon: int, held_out: Sequence[Map]) -> None:
        self.size, self.frozen, self.horizon = size, frozen, horizon
        self.held_out = set(held_out)

    def draw(self, rng: np.random.Generator) -> Episode:
        while True:
            m = random_map(self.size, self.frozen, int(rng.integers(0, EVAL_SEED_OFFSET)))
            if m in self.held_out:
                continue
            ep = episode(m)
            if len(ep.actions) <= self.horizon:
                return ep

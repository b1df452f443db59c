"""The FrozenLake navigation presets (`frozenlake`, `frozenlake-6x6`, `frozenlake-8x8`): the
paper's planning in visual latents, as one task package (docs/frozenlake.md).

- `maps`: maps from gymnasium's generator, shortest plans, replay, the frame renderer and its inverse;
- `model`: `FrozenLakeNet` (encoder, attention stack with RSR on its last block, frame decoder)
  and `rollout`, which runs a plan through RSR's hook points;
- `task`: the `Task` (training batches and loss, held-out maps, trace labels, command-line flags);
- `judge`: plans from the start frame alone, judged by their frames and by the environment;
- `commands`: the bodies of `sample --map` and `probes.record --maps`, reached through
  `Task.commands` (the command lines never name the task).
"""

from __future__ import annotations

from .task import FrozenLake, FrozenLake6, FrozenLake8

__all__ = ["FrozenLake", "FrozenLake6", "FrozenLake8"]

"""Training presets ("tasks"): what to train on, with which backbone and conditioning.

Each task is a small class with the same surface (see `base.Task`), so training, sampling and
recording never branch on the preset. Add a preset by adding a module (or, like FrozenLake, a
package) here and a line to TASKS; docs/extending.md has the checklist.
"""

from __future__ import annotations

from .base import Task, TaskError
from .digits_dit import DigitsDiT
from .frozenlake import FrozenLake, FrozenLake6, FrozenLake8
from .sd3_local import PretrainedSD3
from .shapes_compose import TinyCompose
from .shapes_sd3 import TinySD3Shapes
from .shapes_shift import TinyShift

TASKS: dict[str, type[Task]] = {
    TinySD3Shapes.name: TinySD3Shapes,
    TinyShift.name: TinyShift,
    TinyCompose.name: TinyCompose,
    DigitsDiT.name: DigitsDiT,
    PretrainedSD3.name: PretrainedSD3,
    FrozenLake.name: FrozenLake,
    FrozenLake6.name: FrozenLake6,
    FrozenLake8.name: FrozenLake8,
}


def register(task: type[Task]) -> None:
    TASKS[task.name] = task


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown preset {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](**options)


__all__ = ["TASKS", "Task", "TaskError", "get_task", "register"]

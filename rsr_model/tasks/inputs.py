"""Which command-line flags carry a task's conditioning items, and the checks on them.

Each task names its own flags (`Task.item_flags`: prompts, labels or maps). `sample` and
`probes.record` check that some item flag was given before the checkpoint is loaded, then
that the flags given are the loaded task's: an item under another task's flag would be ignored.
"""

from __future__ import annotations

import argparse

from . import TASKS
from .base import Task, TaskError


def given(args: argparse.Namespace, flag: str) -> bool:
    return bool(getattr(args, flag.lstrip("-").replace("-", "_"), None))


def item_flags(command: str) -> list[str]:
    """Every task's item flags of `command`, in the order of the task table, each once."""
    return list(dict.fromkeys(f for task in TASKS.values() for f in task.item_flags(command)))


def add_task_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags tasks add to `command` (e.g. FrozenLake's --map), each once."""
    added: set[str] = set()
    for task in TASKS.values():
        for flag, options in task.arguments(command):
            if flag not in added:
                parser.add_argument(flag, **options)
                added.add(flag)


def check_some_items(args: argparse.Namespace, command: str) -> None:
    """Before loading: some item flag of some task was given."""
    flags = item_flags(command)
    if not any(given(args, f) for f in flags):
        raise TaskError(f"give at least one {', '.join(flags[:-1])} or {flags[-1]}" if len(flags) > 1
                        else f"give {flags[0]}")


def check_items(task: Task, args: argparse.Namespace, command: str) -> None:
    """After loading: the flags given carry this task's items, and at least one does."""
    own = task.item_flags(command)
    other = [f for f in item_flags(command) if f not in own and given(args, f)]
    if other:
        raise TaskError(f"this checkpoint's preset is {task.conditioning}-conditioned: it takes {own[0]}, "
                        f"not {other[0]}")
    if not any(given(args, f) for f in own):
        raise TaskError(f"give at least one {' or '.join(own)}")

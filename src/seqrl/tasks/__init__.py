"""seqrl.tasks: verifiable-reward tasks with deterministic, disjoint train/test splits.

>>> task = get_task("addition", digits=3, seed=1234)
>>> ex = task.examples("train", 1)[0]
>>> task.score(ex.answer, ex)
1.0
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from seqrl.tasks.arithmetic import AdditionTask, ScratchpadTask
from seqrl.tasks.base import SPLITS, Example, Task, split_of

TASKS: dict[str, type[Task]] = {
    AdditionTask.name: AdditionTask,
    ScratchpadTask.name: ScratchpadTask,
}
"""Task name → class."""


def task_params(name: str) -> tuple[str, ...]:
    """The keyword arguments ``get_task(name, ...)`` accepts, e.g. ``("digits", "seed")``."""
    cls = _task_class(name)
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task ``name`` with ``kwargs``.

    Raises ValueError for an unknown name (suggesting the closest) or an unknown keyword
    argument (listing the valid ones), and for out-of-range values.
    """
    valid = task_params(name)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"task {name!r} got unknown argument(s) {', '.join(hints)}; "
            f"valid arguments: {', '.join(valid)}"
        )
    return TASKS[name](**kwargs)


def _task_class(name: str) -> type[Task]:
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS), n=1, cutoff=0.0)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}{hint} (valid: {', '.join(TASKS)})")
    return TASKS[name]


__all__ = [
    "SPLITS",
    "TASKS",
    "AdditionTask",
    "Example",
    "ScratchpadTask",
    "Task",
    "get_task",
    "split_of",
    "task_params",
]

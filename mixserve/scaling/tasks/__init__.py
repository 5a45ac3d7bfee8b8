"""Task suite: name -> task (see `base.py` for the protocol)."""

from __future__ import annotations

from mixserve.scaling.base import ScalingError
from mixserve.scaling.tasks.base import Problem, Task
from mixserve.scaling.tasks.countdown import Countdown, CountdownSteps
from mixserve.scaling.tasks.numeric import Arithmetic, ChainSum, Gcd, Lcm, Sorting

TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), ChainSum(), Countdown(), CountdownSteps(),
                                               Sorting(), Gcd(), Lcm())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ScalingError(f"invalid task={name!r}: known tasks are {', '.join(TASKS)}", field="task")
    return TASKS[name]


__all__ = ["TASKS", "Problem", "Task", "get_task"]

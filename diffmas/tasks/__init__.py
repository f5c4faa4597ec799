"""Tasks shared by training and evaluation: examples, prompts, graders and the task registry.

`diffmas.tasks.base` holds the `Task` interface and the registry; `diffmas.tasks.benchmarks` (the offline
benchmarks), `diffmas.tasks.rg` (the `rg:<generator>` family) and `diffmas.tasks.relay` (tasks whose final agent
sees none of the problem: `relay:*`, `split:chain_sum`) register themselves into it when imported,
which this package does right after importing base, so there is no import cycle. `diffmas.tasks.grading` holds
the graders; the code grader runs code in `diffmas.sandbox` (a bottom-layer module), lazily.

    from diffmas.tasks import get_task
    task = get_task("gsm8k")
    ex = task.load(limit=1)[0]
    task.grade(ex, "... Answer: 18").correct   # True
"""

from diffmas.tasks.base import (
    ANSWER_INSTRUCTION,
    TASKS,
    Example,
    Grade,
    Task,
    TaskError,
    get_task,
    list_tasks,
    register_family,
    register_task,
)

# Imported for their side effect: each registers its tasks into base's registry (after base is complete).
from diffmas.tasks import benchmarks as _benchmarks  # noqa: E402,F401  isort: skip
from diffmas.tasks import rg as _rg  # noqa: E402,F401  isort: skip
from diffmas.tasks import relay as _relay  # noqa: E402,F401  isort: skip

__all__ = [
    "ANSWER_INSTRUCTION",
    "TASKS",
    "Example",
    "Grade",
    "Task",
    "TaskError",
    "get_task",
    "list_tasks",
    "register_family",
    "register_task",
]

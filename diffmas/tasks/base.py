"""Tasks: the `Example` record, the `Task` interface and the registry of tasks (for training and evaluation).

A task turns examples into prompts (with the answer-format instruction) and grades responses. Built-in tasks
are the offline benchmarks (`diffmas.tasks.benchmarks`) and the `rg:<generator>` family over reasoning-gym
(`diffmas.tasks.rg`). This module imports neither: those modules import it and register themselves, and the
package `diffmas.tasks` imports this module first and then both of them, so the registry is full whenever
anything from `diffmas.tasks` has been imported.

    task = get_task("gsm8k")
    ex = task.load(limit=1)[0]
    task.grade(ex, "... Answer: 18").correct   # True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from diffmas.errors import DiffMASError
from diffmas.tasks.grading import Grade

__all__ = [
    "Example",
    "Grade",
    "Task",
    "TaskError",
    "TASKS",
    "ANSWER_INSTRUCTION",
    "register_task",
    "register_family",
    "get_task",
    "list_tasks",
]

#: The answer-format line appended to every non-code prompt (the format the graders read first).
ANSWER_INSTRUCTION = "End your reply with a final line of the form 'Answer: <value>'."


class TaskError(DiffMASError, ValueError):
    """A user-fixable task problem (unknown task, missing or malformed data); also a ValueError."""


@dataclass(frozen=True)
class Example:
    """One evaluation or training item."""

    id: str  # stable unique id within the task (used to resume runs)
    question: str  # the raw problem text (for code tasks, the prompt/description)
    answer: str  # gold answer (for MC: the letter; for code: "" and tests in meta)
    target: str | None = None  # training target (gold solution ending in the task's answer format), if any
    meta: dict = field(default_factory=dict)  # choices, tests, entry_point, n_terms, ...
    parts: dict[str, str] = field(default_factory=dict)
    """Named parts of the problem that agents may see on their own (``sees: part:<name>``), e.g. split tasks."""


class Task:
    """Base class of an evaluation task.

    Subclasses set ``name``, ``kind`` ("math" | "mc" | "code" | "rg") and ``partial`` (a note such as
    "25 of 30 (offline subset)" when the offline copy is incomplete, else None), and implement the methods.
    """

    name: str = ""
    kind: str = ""
    partial: str | None = None
    topology: str | None = None
    """The topology a multi-agent system uses on this task when none is named (relay and split tasks name theirs:
    the final agent sees none of the problem there); None: the system's own default."""
    KINDS: ClassVar[tuple[str, ...]] = ("math", "mc", "code", "rg")

    def load(self, limit: int | None = None, source: str | None = None) -> list[Example]:
        """Return the task's examples in a fixed order (the first ``limit`` when given).

        ``source`` None means the offline copy; otherwise a local .jsonl/.json/.parquet path or a hub id.
        """
        raise NotImplementedError

    def prompt(self, ex: Example) -> str:
        """The user-turn text for ``ex``, including the answer-format instruction."""
        raise NotImplementedError

    def grade(self, ex: Example, response: str, truncated: bool = False) -> Grade:
        """Grade a model ``response`` to ``ex``; ``truncated``: it was cut off at the token limit."""
        raise NotImplementedError

    def format_instruction(self, ex: Example) -> str:
        """The answer-format line alone: all that an agent that sees none of the problem is told."""
        return ANSWER_INSTRUCTION

    def views(self, ex: Example) -> dict[str, str]:
        """What an agent may see of ``ex`` (``Agent.sees``): ``question`` (the whole prompt), ``none`` (the
        answer-format line) and ``part:<name>`` for each of the example's parts."""
        return {"question": self.prompt(ex), "none": self.format_instruction(ex),
                **{f"part:{name}": text for name, text in ex.parts.items()}}

    def training_examples(self, n: int, seed: int, target_style: str, exclude: set[str]) -> list[Example]:
        """``n`` training examples drawn deterministically from ``seed``, none whose question is in ``exclude``.
        Tasks without an offline generator raise: train them from a jsonl (``data.source``)."""
        raise TaskError(f"task '{self.name}' has no offline training generator: set data.source to a jsonl of "
                        "{question, target} rows")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} kind={self.kind}>"


#: Registered tasks by name. Families (e.g. "rg") resolve "rg:<generator>" names on demand instead.
TASKS: dict[str, Task] = {}
_FAMILIES: dict[str, Callable[[str], Task]] = {}
_FAMILY_LISTINGS: dict[str, Callable[[], list[str]]] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry under ``task.name`` and return it; a duplicate name is an error."""
    if not task.name or task.kind not in Task.KINDS:
        raise ValueError(f"task needs a name and a kind in {Task.KINDS}: {task!r}")
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def register_family(prefix: str, factory: Callable[[str], Task], listing: Callable[[], list[str]]) -> None:
    """Register a family of tasks named "<prefix>:<member>".

    ``factory(member)`` builds the task (raising TaskError for an unknown member); ``listing()`` names the
    members that `list_tasks` shows.
    """
    _FAMILIES[prefix] = factory
    _FAMILY_LISTINGS[prefix] = listing


def list_tasks() -> list[str]:
    """Names of all registered tasks, including the listed members of each family ("rg:chain_sum", ...)."""
    names = sorted(TASKS)
    for prefix in sorted(_FAMILY_LISTINGS):
        names += [f"{prefix}:{member}" for member in _FAMILY_LISTINGS[prefix]()]
    return names


def get_task(name: str) -> Task:
    """Return the task called ``name`` ("gsm8k", "rg:chain_sum", ...); unknown names raise ValueError."""
    if name in TASKS:
        return TASKS[name]
    prefix, sep, member = name.partition(":")
    if sep and prefix in _FAMILIES and member:
        return _FAMILIES[prefix](member)
    known = ", ".join(list_tasks())
    raise TaskError(f"unknown task {name!r}; known tasks: {known} (any reasoning-gym generator works as rg:<name>)")

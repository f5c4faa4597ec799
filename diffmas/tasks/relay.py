"""Tasks where the final agent cannot answer alone: the problem reaches it only through the trace.

- ``relay:<generator>``: a reasoning-gym task (same evaluation items as ``rg:<generator>``) run on the ``relay``
  topology, where the reasoner sees the question and the solver sees only the answer-format line.
- ``split:chain_sum``: the expression is cut in two parts (the first half of the terms, and the rest with their
  signs); on the ``split`` topology each of two writers sees one part, the solver none: neither writer alone
  can give the total.
- ``relay:digits`` (k drawn from 1..6 per item) and ``relay:digits<k>``: the writer sees a k-digit number and
  the solver must repeat it, the capacity ladder of a channel (chance at k = 1 is 0.1).

A single agent given the whole question (``single``, ``single_sft``) sees everything on any of them: the skyline.

Digits items are not deduplicated and training may draw numbers that are also evaluated (k <= 2 has fewer
numbers than the evaluation set): what is measured is whether the number crosses the channel, and the solver
never sees it, so it cannot have memorised the answer to an input it does not get.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import cache

from diffmas.tasks.base import ANSWER_INSTRUCTION, Example, Task, TaskError, register_family
from diffmas.tasks.grading import Grade, extract_final_answer
from diffmas.tasks.rg import DEFAULT_EVAL_SIZE, EVAL_SEED_START, RGTask

__all__ = ["DigitsTask", "RelayTask", "SplitTask", "split_expression"]

MAX_DIGITS = 6


class RelayTask(RGTask):
    """``rg:<generator>`` whose final agent sees none of the problem (``relay`` topology)."""

    topology = "relay"

    def __init__(self, generator: str) -> None:
        super().__init__(generator)
        self.name = f"relay:{self.generator}"


def split_expression(expression: str) -> tuple[str, str]:
    """A chain_sum expression ``"76 - 32 + 75 - 32"`` as (first half of the terms, the rest with their signs):
    ``("76 - 32", "+ 75 - 32")``; with an odd count the first part has one term more."""
    tokens = expression.split()
    terms = (len(tokens) + 1) // 2
    cut = 2 * ((terms + 1) // 2) - 1  # tokens of the first ceil(terms / 2) terms and the operators between them
    return " ".join(tokens[:cut]), " ".join(tokens[cut:])


class SplitTask(RGTask):
    """chain_sum with its expression split between two writers (``split`` topology)."""

    topology = "split"

    def __init__(self, generator: str) -> None:
        if generator.removeprefix("rg:") != "chain_sum":
            raise TaskError(f"split tasks exist for chain_sum only (split:chain_sum), not {generator!r}")
        super().__init__("chain_sum")
        self.name = "split:chain_sum"

    @staticmethod
    def _with_parts(ex: Example) -> Example:
        first, rest = split_expression(ex.meta["expression"])
        return replace(ex, parts={"a": f"The first part of a sum: {first}",
                                  "b": f"The rest of the sum, which continues the first part: {rest}"})

    def load(self, limit: int | None = None, source: str | None = None) -> list[Example]:
        return [self._with_parts(ex) for ex in super().load(limit, source)]

    def training_examples(self, n: int, seed: int, target_style: str, exclude: set[str]) -> list[Example]:
        return [self._with_parts(ex) for ex in super().training_examples(n, seed, target_style, exclude)]


class DigitsTask(Task):
    """The writer sees a k-digit number, the solver must repeat it (``k`` None: k drawn from 1..6 per item)."""

    kind = "rg"
    partial = None
    topology = "relay"

    def __init__(self, k: int | None = None) -> None:
        if k is not None and not 1 <= k <= MAX_DIGITS:
            raise TaskError(f"relay:digits<k> takes k in 1..{MAX_DIGITS}, got {k}")
        self.k = k
        self.name = "relay:digits" if k is None else f"relay:digits{k}"

    def item(self, seed: int, target_style: str = "answer") -> Example:
        rng = random.Random(seed)
        k = self.k or rng.randint(1, MAX_DIGITS)
        number = str(rng.randrange(10) if k == 1 else rng.randrange(10 ** (k - 1), 10 ** k))
        return Example(id=f"digits{k}-{seed}", question=f"Remember this number: {number}. What is the number?",
                       answer=number, target=f"Answer: {number}",
                       meta={"n_digits": k, "seed": seed, "target_style": target_style})

    def load(self, limit: int | None = None, source: str | None = None) -> list[Example]:
        if source is not None:
            raise TaskError(f"{self.name} is generated from seeds; it takes no source (got {source!r})")
        n = DEFAULT_EVAL_SIZE if limit is None else limit
        return [self.item(EVAL_SEED_START + i) for i in range(n)]

    def prompt(self, ex: Example) -> str:
        return f"{ex.question}\n{ANSWER_INSTRUCTION}"

    def grade(self, ex: Example, response: str, truncated: bool = False) -> Grade:
        extracted = extract_final_answer(response)
        if extracted is None:
            return Grade(correct=False, flexible=False, extracted=None, format_ok=False, detail="no 'Answer:' line")
        right = extracted.strip() == ex.answer
        return Grade(correct=right, flexible=right, extracted=extracted, format_ok=True,
                     detail="exact" if right else "differs")

    def training_examples(self, n: int, seed: int, target_style: str, exclude: set[str]) -> list[Example]:
        rng = random.Random(seed)
        return [self.item(rng.randrange(EVAL_SEED_START), target_style) for _ in range(n)]


@cache
def _relay_task(member: str) -> Task:
    if member.startswith("digits"):
        k = member.removeprefix("digits")
        if k and not k.isdigit():
            raise TaskError(f"unknown relay task 'relay:{member}': use relay:digits or relay:digits<k>")
        return DigitsTask(int(k) if k else None)
    return RelayTask(member)


register_family("relay", _relay_task, lambda: ["chain_sum", "leg_counting", "digits",
                                               *(f"digits{k}" for k in range(1, MAX_DIGITS + 1))])
register_family("split", cache(SplitTask), lambda: ["chain_sum"])

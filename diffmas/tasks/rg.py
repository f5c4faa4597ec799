"""The `rg:<generator>` task family over reasoning-gym: offline, seeded, unlimited problems.

Every item is generated from one integer seed (a one-item dataset with that seed), so an item never depends on
how many others were asked for. Seeds are split once and for all:

- evaluation: seeds 1_000_000, 1_000_001, ... (duplicate questions skipped), so ``load(limit)`` is a stable
  prefix of ``load()``;
- training (`training_examples`): seeds drawn from [0, 1_000_000), minus any question in ``exclude``.

Easy settings per generator follow shared/CALIBRATION.md (what a 135M model can learn); other reasoning-gym
generators run with their library defaults. Responses are graded by the generator's own ``score_answer`` on the
value of the final "Answer:" line, correct only at score 1.0; without one, the flexible verdict scores the last
number in the text instead (not in a response cut off at the token limit).
"""

from __future__ import annotations

import random
import warnings
from functools import cache
from typing import Any, Literal

from diffmas.tasks.base import ANSWER_INSTRUCTION, Example, Task, TaskError, register_family
from diffmas.tasks.grading import Grade, extract_final_answer, extract_last_number

__all__ = [
    "EASY_CONFIGS",
    "EVAL_SEED_START",
    "WORKED_GENERATORS",
    "RGTask",
    "training_examples",
    "worked_solution",
]

EVAL_SEED_START = 1_000_000  # seeds >= this are evaluation-only; training draws below it
DEFAULT_EVAL_SIZE = 500  # load() with no limit

#: Easy settings (reasoning-gym config field names) calibrated in shared/CALIBRATION.md.
EASY_CONFIGS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2},
    "leg_counting": {"min_animals": 2, "max_animals": 4},
    "basic_arithmetic": {
        "min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2,
        "operators": ("+", "-", "*"), "allow_parentheses": False,
    },
    "products": {"min_digits": 1, "max_digits": 2},
    "gcd": {"min_value": 1, "max_value": 100},
    "fraction_simplification": {"min_value": 1, "max_value": 20, "max_factor": 10, "styles": ("plain",)},
    "count_bits": {"min_n": 1, "max_n": 255},
    "letter_counting": {"min_words": 3, "max_words": 6},
    "gsm_symbolic": {},
    "simple_equations": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 20},
    "base_conversion": {"min_base": 2, "max_base": 10, "min_value": 0, "max_value": 100},
    "number_sorting": {"min_numbers": 3, "max_numbers": 5, "min_decimals": 0, "max_decimals": 0},
}

#: Generators with a worked-solution target; the rest fall back to answer-only targets (with a warning).
WORKED_GENERATORS = ("chain_sum", "leg_counting", "gsm_symbolic")


def _generate(generator: str, config: tuple[tuple[str, Any], ...], seed: int) -> dict[str, Any]:
    import reasoning_gym

    return reasoning_gym.create_dataset(generator, seed=seed, size=1, **dict(config))[0]


@cache
def _scorer(generator: str, config: tuple[tuple[str, Any], ...]) -> Any:
    """A dataset instance whose ``score_answer`` grades entries of this generator (it reads only the entry)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(generator, seed=0, size=1, **dict(config))


def _config_key(generator: str, config: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    cfg = EASY_CONFIGS.get(generator, {}) if config is None else config
    return tuple(sorted(cfg.items()))


def _check_generator(generator: str) -> str:
    from reasoning_gym.factory import DATASETS

    generator = generator.removeprefix("rg:")
    if generator not in DATASETS:
        raise TaskError(f"unknown reasoning-gym generator {generator!r}; known: {', '.join(sorted(DATASETS))}")
    return generator


def worked_solution(generator: str, entry: dict[str, Any]) -> str | None:
    """A short worked solution ending in "Answer: <gold>", or None when the generator has none.

    chain_sum: one partial sum per line. leg_counting: legs per animal kind, then the sum. gsm_symbolic: the
    generator's own chain of thought.
    """
    meta, gold = entry["metadata"], entry["answer"]
    lines: list[str] = []
    if generator == "chain_sum":
        tokens = meta["expression"].split()
        total = int(tokens[0])
        for op, term in zip(tokens[1::2], tokens[2::2], strict=True):
            new = total + int(term) if op == "+" else total - int(term)
            lines.append(f"{total} {op} {term} = {new}")
            total = new
    elif generator == "leg_counting":
        from reasoning_gym.arithmetic.leg_counting import ANIMALS

        legs = []
        for animal, count in meta["animals"].items():
            legs.append(count * ANIMALS[animal])
            lines.append(f"{animal}: {count} * {ANIMALS[animal]} = {legs[-1]} legs")
        if len(legs) > 1:
            lines.append(f"{' + '.join(map(str, legs))} = {sum(legs)}")
    elif generator == "gsm_symbolic" and "answer_cot" in meta:
        lines = [ln for ln in meta["answer_cot"].splitlines() if not ln.startswith("####")]
    else:
        return None
    return "\n".join(lines + [f"Answer: {gold}"])


def _example(generator: str, seed: int, entry: dict[str, Any], style: str) -> Example:
    target = f"Answer: {entry['answer']}"
    if style == "worked":
        target = worked_solution(generator, entry) or target
    # Scalar metadata (num_terms, num_animals, ...) is lifted for error breakdowns; the entry stays for scoring.
    scalars = {
        k: v for k, v in entry["metadata"].items()
        if isinstance(v, (int, float, str, bool)) and k not in ("source_dataset", "source_index")
    }
    meta = {"generator": generator, "seed": seed, "target_style": style, **scalars, "entry": entry}
    return Example(id=f"{generator}-{seed}", question=entry["question"], answer=str(entry["answer"]),
                   target=target, meta=meta)


class RGTask(Task):
    """An evaluation task over one reasoning-gym generator (``config`` None = the easy settings above)."""

    kind = "rg"
    partial = None

    def __init__(self, generator: str, config: dict[str, Any] | None = None) -> None:
        self.generator = _check_generator(generator)
        self.name = f"rg:{self.generator}"
        self.config = dict(EASY_CONFIGS.get(self.generator, {}) if config is None else config)
        self._key = _config_key(self.generator, self.config)
        self._cache: list[Example] = []
        self._next_seed = EVAL_SEED_START
        self._seen: set[str] = set()

    def load(self, limit: int | None = None, source: str | None = None) -> list[Example]:
        """The held-out set: unique questions from seeds >= 1_000_000 in seed order (500 when no limit)."""
        if source is not None:
            raise TaskError(f"{self.name} is generated offline from seeds; it takes no source (got {source!r})")
        n = DEFAULT_EVAL_SIZE if limit is None else limit
        while len(self._cache) < n:  # grow the cached prefix; earlier items never change
            entry = _generate(self.generator, self._key, self._next_seed)
            if entry["question"] not in self._seen:
                self._seen.add(entry["question"])
                self._cache.append(_example(self.generator, self._next_seed, entry, "answer"))
            self._next_seed += 1
        return list(self._cache[:n])

    def prompt(self, ex: Example) -> str:
        return f"{ex.question.rstrip()}\n{ANSWER_INSTRUCTION}"

    def grade(self, ex: Example, response: str, truncated: bool = False) -> Grade:
        extracted = extract_final_answer(response)
        if extracted is not None:
            right, detail = self._score(ex, extracted)
            return Grade(correct=right, flexible=right, extracted=extracted, format_ok=True, detail=detail)
        number = None if truncated else extract_last_number(response)
        if number is None:
            return Grade(correct=False, flexible=False, extracted=None, format_ok=False, detail="no 'Answer:' line")
        right, detail = self._score(ex, number)
        return Grade(correct=False, flexible=right, extracted=number, format_ok=False, detail=f"last number, {detail}")

    def _score(self, ex: Example, answer: str) -> tuple[bool, str]:
        score = float(_scorer(self.generator, self._key).score_answer(answer, ex.meta["entry"]))
        return score == 1.0, f"score={score:g}"

    def training_examples(self, n: int, seed: int, target_style: str, exclude: set[str]) -> list[Example]:
        return training_examples(self.generator, n, seed, target_style, exclude, self.config)


def training_examples(
    generator: str,
    n: int,
    seed: int,
    target_style: Literal["answer", "worked"],
    exclude: set[str],
    config: dict[str, Any] | None = None,
) -> list[Example]:
    """Draw ``n`` training examples from seeds < 1_000_000, skipping any question in ``exclude``.

    The draw is deterministic in ``seed``. ``target_style`` "answer" gives "Answer: <gold>"; "worked" gives
    `worked_solution` where the generator has one (chain_sum, leg_counting, gsm_symbolic) and falls back to
    answer-only elsewhere, with a warning; ``meta["target_style"]`` records what each target is.
    Pass the evaluation questions as ``exclude`` (e.g. ``{ex.question for ex in task.load()}``).
    """
    generator = _check_generator(generator)
    if target_style not in ("answer", "worked"):
        raise TaskError(f"target_style must be 'answer' or 'worked', got {target_style!r}")
    if target_style == "worked" and generator not in WORKED_GENERATORS:
        warnings.warn(f"no worked solutions for {generator!r}; using answer-only targets", stacklevel=2)
        target_style = "answer"
    key = _config_key(generator, config)
    rng = random.Random(seed)
    out: list[Example] = []
    for _ in range(50 * n + 1000):  # bounded: a tiny problem space minus `exclude` may run dry
        if len(out) == n:
            return out
        s = rng.randrange(EVAL_SEED_START)
        entry = _generate(generator, key, s)
        if entry["question"] not in exclude:
            out.append(_example(generator, s, entry, target_style))
    if len(out) == n:
        return out
    raise TaskError(f"could only draw {len(out)} of {n} {generator} questions outside `exclude`; widen the config")


@cache
def _family_task(generator: str) -> RGTask:
    return RGTask(generator)


register_family("rg", _family_task, lambda: sorted(EASY_CONFIGS))

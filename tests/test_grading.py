"""Graders: final-answer extraction, math equivalence, multiple-choice letters, code tests in the sandbox."""

from __future__ import annotations

import importlib.util

import pytest

from diffmas.eval.grading import (
    extract_boxed,
    extract_choice,
    extract_code,
    extract_final_answer,
    grade_choice,
    grade_code,
    grade_math,
)

HAS_SANDBOX = importlib.util.find_spec("diffmas.eval.sandbox") is not None
needs_sandbox = pytest.mark.skipif(not HAS_SANDBOX, reason="diffmas.eval.sandbox is not written yet")


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
        ("The result is 7 apples in total", "7"),  # last-number fallback
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
    assert g.correct and not g.format_ok  # read from the last number, not from the requested format


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
    assert g.correct and g.format_ok and g.extracted == "C"
    g = grade_choice("I think it is (C)", "c", 4)
    assert g.correct and not g.format_ok
    assert not grade_choice("Answer: A", "C", 4).correct


def test_extract_code() -> None:
    code, fenced = extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.")
    assert fenced and code == "def f():\n    return 1\n"
    code, fenced = extract_code("```\nx = 1\n```\n```python\ny = 2\nz = 3\n```")
    assert code == "y = 2\nz = 3\n"  # a python block is preferred
    code, fenced = extract_code("def g(): return 2")
    assert not fenced and code == "def g(): return 2"


@needs_sandbox
def test_grade_code_passes_and_fails() -> None:
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    good = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    g = grade_code(good, tests, "add", timeout=10)
    assert g.correct and g.format_ok and g.detail == "passed"
    g = grade_code(bad, tests, "add", timeout=10)
    assert not g.correct and g.detail.startswith("failed")


@needs_sandbox
def test_grade_code_mbpp_style_and_timeout() -> None:
    asserts = "assert square(3) == 9\nassert square(0) == 0"
    assert grade_code("```python\ndef square(x):\n    return x * x\n```", asserts, None, timeout=10).correct
    g = grade_code("```python\ndef square(x):\n    while True:\n        pass\n```", asserts, None, timeout=1)
    assert not g.correct and g.detail.startswith("timeout")

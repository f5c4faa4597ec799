"""Grading: final-answer extraction, math equivalence and multiple-choice letters (pure functions), and code
tests, which run the response's code in the sandbox (:mod:`diffmas.sandbox`, a subprocess).

Every grader returns a :class:`Grade` with two verdicts, as lm-evaluation-harness reports strict-match beside
flexible-extract: ``correct`` (strict) counts only an answer given in the requested format, an "Answer:" line or
a ``\\boxed{}``; ``flexible`` also reads an answer loosely from the text (the last number, a letter marked in
prose) when the format was not followed, but never from a response cut off at the token limit (``truncated``),
whose last number is just where the cut fell. A Grade also says what was read and whether the format was
followed, so reports can show format failures beside accuracy.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass

__all__ = [
    "Grade",
    "extract_final_answer",
    "extract_boxed",
    "extract_code",
    "extract_choice",
    "extract_last_number",
    "grade_math",
    "grade_choice",
    "grade_code",
]


@dataclass(frozen=True)
class Grade:
    """The outcome of grading one response."""

    correct: bool  # strict: the answer given in the requested format is right
    flexible: bool  # correct, or right as read loosely from a response that ignored the format (not cut off)
    extracted: str | None  # what the grader read from the response
    format_ok: bool  # the response followed the requested answer format
    detail: str = ""  # e.g. sandbox status


# "Answer: X", also "**Answer:** X", "Final answer: X"; the keyword must not be the tail of another word.
_ANSWER_LINE = re.compile(r"(?<![A-Za-z])answer\s*\**\s*[:：]\s*(.*)$", re.IGNORECASE)


def extract_final_answer(text: str) -> str | None:
    """Return the value of the last "Answer: <value>" line in ``text``, or None.

    Markdown emphasis and a trailing period are stripped; an empty value takes the next non-empty line.
    """
    lines = text.splitlines()
    found: str | None = None
    for i, line in enumerate(lines):
        m = _ANSWER_LINE.search(line)
        if not m:
            continue
        value = m.group(1)
        if not value.strip(" *_`"):
            value = next((ln for ln in lines[i + 1 :] if ln.strip()), "")
        value = value.strip().strip("*_`").strip()
        value = re.sub(r"(?<!\.)\.$", "", value).strip()  # "42." -> "42", but keep "..." intact
        if value:
            found = value
    return found


def extract_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), matching nested braces."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for j in range(start, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:j].strip()
    return None


_CUT_OFF = "no answer in the requested format before the token limit"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_THOUSANDS = re.compile(r"(?<![\d.,])(-?\d{1,3}(?:,\d{3})+)(?![\d,])")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` ("1,000", "-2.5", "3/4"), or None: the flexible reading of a response."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalize_math(s: str) -> str:
    s = s.strip().replace("\\$", "").replace("$", "")
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)  # "1,000" -> "1000"
    return re.sub(r"(?<!\.)\.$", "", s.strip()).strip()


def _parse_math(s: str) -> list:
    """Parse an answer string with math-verify; LaTeX is wrapped in $...$ so it is not read loosely."""
    from math_verify import parse  # imported lazily: sympy is slow to import

    s = _normalize_math(s)
    if not s:
        return []
    latex = any(ch in s for ch in "\\^{}")
    # Plain text goes through the expression parser first ("5 dollars" -> 5); LaTeX needs the $-anchor,
    # else the loose parser reads "2\sqrt{3}" as 2.
    attempts = [f"${s}$", s] if latex else [s, f"${s}$"]
    for attempt in attempts:
        parsed = parse(attempt)
        if parsed:
            return parsed
    return []


def _math_equal(gold: str, candidate: str) -> bool:
    from math_verify import verify

    g, c = _parse_math(gold), _parse_math(candidate)
    if g and c and verify(g, c):
        return True
    # Text answers (names, "\text{(C)}") that sympy cannot read: compare normalized strings.
    return _normalize_math(gold).replace(" ", "").lower() == _normalize_math(candidate).replace(" ", "").lower()


def grade_math(response: str, gold: str, truncated: bool = False) -> Grade:
    """Grade a math response against ``gold`` with math-verify (LaTeX/numeric equivalence).

    Strict: the last ``\\boxed{}``, else the last "Answer:" line. Flexible, where neither is given: the last
    number in the text, unless the response was ``truncated`` at the token limit.
    """
    answer = extract_boxed(response)
    if answer is None:
        answer = extract_final_answer(response)
    if answer is not None:
        right = _math_equal(gold, answer)
        return Grade(correct=right, flexible=right, extracted=answer, format_ok=True)
    if truncated:
        return Grade(correct=False, flexible=False, extracted=None, format_ok=False, detail=_CUT_OFF)
    number = extract_last_number(response)
    if number is None:
        return Grade(correct=False, flexible=False, extracted=None, format_ok=False, detail="no answer found")
    return Grade(correct=False, flexible=_math_equal(gold, number), extracted=number, format_ok=False,
                 detail="last number")


def _letters(n_choices: int) -> str:
    return string.ascii_uppercase[:n_choices]


def _letter_from_answer_value(value: str, letters: str) -> str | None:
    """Read a letter from an "Answer:" value such as "(B)", "**c**", "D. Paris", "b"."""
    m = re.match(r"^[\s*_(\[{]*(?:option\s+|choice\s+)?[\s*_(\[{]*([A-Za-z])(?![A-Za-z])", value, re.IGNORECASE)
    if m and m.group(1).upper() in letters and not _is_article(value, m):
        return m.group(1).upper()
    return None


def _is_article(text: str, m: re.Match) -> bool:
    """A lowercase "a" (or any letter) followed by a lowercase word is prose, not a choice."""
    return m.group(1).islower() and re.match(r"\s+[a-z]", text[m.end() :]) is not None


def extract_choice(response: str, n_choices: int) -> str | None:
    """Return the chosen letter (A, B, ...) from a multiple-choice response, or None.

    Priority: an "Answer: X" line; "the answer is (X)"; a line holding only the letter ("**C**", "(B)");
    a marked letter in prose ("(B)", "B)", "**C**"). A bare capital in prose ("A cat ...") never counts.
    """
    letters = _letters(n_choices)
    value = extract_final_answer(response)
    if value is not None:
        letter = _letter_from_answer_value(value, letters)
        if letter:
            return letter
    # "the answer is B", "correct option: (c)"; a lowercase letter must not start a word ("is a cat").
    phrase = re.compile(
        r"(?:answer|option|choice)\s+(?:is|would be|should be)?\s*:?\s*[*_(\[]*([A-Za-z])[*_)\]]*(?![A-Za-z'])",
        re.IGNORECASE,
    )
    hits = [m.group(1) for m in phrase.finditer(response)
            if m.group(1).upper() in letters and not _is_article(response, m)]
    if hits:
        return hits[-1].upper()
    for line in reversed(response.splitlines()):
        m = re.fullmatch(r"[\s*_(\[]*([A-Za-z])[\s*_)\].:]*", line)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    marked = re.findall(r"\(([A-Z])\)|\*\*([A-Z])\*\*|(?<![A-Za-z(])([A-Z])\)", response)
    flat = [next(g for g in groups if g) for groups in marked]
    flat = [x for x in flat if x in letters]
    return flat[-1] if flat else None


def _strict_choice(response: str, letters: str) -> str | None:
    """The letter of an "Answer: <letter>" line, else of a ``\\boxed{<letter>}`` (``\\text{}`` unwrapped)."""
    for value in (extract_final_answer(response), extract_boxed(response)):
        if value is not None:
            letter = _letter_from_answer_value(re.sub(r"\\text(?:bf)?\s*\{([^{}]*)\}", r"\1", value), letters)
            if letter:
                return letter
    return None


def grade_choice(response: str, gold_letter: str, n_choices: int, truncated: bool = False) -> Grade:
    """Grade a multiple-choice response.

    Strict: the letter of an "Answer:" line or a ``\\boxed{}``. Flexible, where neither is given: the letter
    `extract_choice` finds in the prose ("the answer is (B)"), unless the response was ``truncated``.
    """
    gold = gold_letter.strip().upper()
    answer = _strict_choice(response, _letters(n_choices))
    if answer is not None:
        return Grade(correct=answer == gold, flexible=answer == gold, extracted=answer, format_ok=True)
    if truncated:
        return Grade(correct=False, flexible=False, extracted=None, format_ok=False, detail=_CUT_OFF)
    letter = extract_choice(response, n_choices)
    return Grade(correct=False, flexible=letter == gold, extracted=letter, format_ok=False)


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(response: str) -> tuple[str, bool]:
    """Return (code, fenced): the longest ```python block (else any fenced block), or the whole text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(response)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    candidates = python or [body for _, body in blocks]
    if candidates:
        return max(candidates, key=len), True
    return response, False


# The sandbox runs this script: the candidate's code and the tests, then it prints the run's token, the only proof
# that the tests ran to the end. Exit status 0 alone proves nothing: code that calls sys.exit(0), raises
# SystemExit or os._exit(0)s (at module level, or inside the function the tests call) stops the run with status
# 0 before any assert. The token comes on stdin and is read before the candidate's code starts, so it is in
# neither the script, the environment nor any file; the code then finds /dev/null on stdin. Code that
# deliberately searches this harness's memory (its frames) can still find the token: Python has no isolation
# inside one process, so the token defeats cutting the run short, not a purpose-built attack on the harness.
_HARNESS = """\
import os, sys, types


def run(token, source):
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    main = types.ModuleType("__main__")  # the candidate runs as the main module, but not as this one
    sys.modules["__main__"] = main
    exec(compile(source, "solution.py", "exec"), main.__dict__)
    sys.stdout.flush()  # the candidate's own output first, so the token ends the captured tail
    os.write(1, token)


run(os.read(0, 256), {source!r})
"""


def grade_code(program: str, tests: str, entry_point: str | None, timeout: float = 10.0) -> Grade:
    """Run the code in ``program`` (a response; its ```python block is used) against ``tests`` in the sandbox.

    ``tests`` is appended to the code; with an ``entry_point`` (HumanEval style) ``check(<entry_point>)`` is
    called as well. Correct only when the sandbox reports "passed" and the run got past the last test: the
    harness then prints a random token the code cannot know (see ``_HARNESS``). Strict and flexible agree.
    """
    # Lazy: only code tasks need the sandbox (and its isolation probe).
    from diffmas.sandbox import run_code

    code, fenced = extract_code(program)
    source = f"{code.rstrip()}\n\n{tests.rstrip()}\n"
    if entry_point:
        source += f"\ncheck({entry_point})\n"
    token = secrets.token_hex(16)
    result = run_code(_HARNESS.format(source=source), timeout=timeout, stdin=token)
    finished = token in result.stdout
    detail = result.status
    if result.status == "passed" and not finished:
        detail = "exited with status 0 before the tests finished"
    elif result.status != "passed" and result.stderr:
        detail += ": " + result.stderr.strip().splitlines()[-1][:200]
    passed = result.status == "passed" and finished
    return Grade(correct=passed, flexible=passed, extracted=code, format_ok=fenced, detail=detail)

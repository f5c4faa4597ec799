"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from diffmas.eval.metrics import across_seeds, mean_stderr, pass_at_k, perplexity, summarize


def test_mean_stderr_hand_computed() -> None:
    # [1, 0, 1, 1]: mean 0.75; sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25 -> std 0.5; stderr 0.5 / 2.
    mean, se = mean_stderr([True, False, True, True])
    assert mean == pytest.approx(0.75)
    assert se == pytest.approx(0.25)
    # [2, 4, 9]: mean 5; deviations -3, -1, 4 -> variance 26 / 2 = 13; stderr sqrt(13 / 3).
    mean, se = mean_stderr([2, 4, 9])
    assert mean == pytest.approx(5.0)
    assert se == pytest.approx(math.sqrt(13 / 3))


def test_mean_stderr_small_inputs() -> None:
    assert mean_stderr([0.3]) == (pytest.approx(0.3), 0.0)
    mean, se = mean_stderr([])
    assert math.isnan(mean) and se == 0.0
    assert mean_stderr([1, 1, 1]) == (pytest.approx(1.0), pytest.approx(0.0))


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # pass@1 is c / n
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2) / C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5) / C(10,5)
        (5, 0, 3, 0.0),
        (5, 3, 3, 1.0),  # n - c < k: every k-subset holds a correct sample
        (200, 1, 1, 0.005),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_combinatorial_formula_for_large_n() -> None:
    n, c, k = 100, 7, 10
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_invalid(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_across_seeds() -> None:
    mean, std = across_seeds([0.5, 0.7])
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(math.sqrt(0.02))  # ddof=1: (0.01 + 0.01) / 1
    assert across_seeds([0.4]) == (pytest.approx(0.4), 0.0)


def test_perplexity() -> None:
    assert perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert perplexity(0.0, 10) == pytest.approx(1.0)
    assert math.isnan(perplexity(1.0, 0))


def test_summarize_hand_computed() -> None:
    records = [
        {"correct": True, "format_ok": True, "tokens": 10, "seconds": 1.0, "nll": 2 * math.log(2), "n_tokens_final": 2},
        {"correct": False, "format_ok": False, "tokens": 20, "seconds": 3.0, "nll": None, "n_tokens_final": 0},
        {"correct": True, "format_ok": True, "tokens": 30, "seconds": 2.0, "nll": 2 * math.log(2), "n_tokens_final": 2},
        {"correct": True, "format_ok": False, "tokens": 40, "seconds": 2.0, "nll": None, "n_tokens_final": 0},
    ]
    s = summarize(records)
    assert s["n"] == 4
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["stderr"] == pytest.approx(0.25)
    assert s["tokens_mean"] == pytest.approx(25.0)
    assert s["seconds_mean"] == pytest.approx(2.0)
    assert s["perplexity"] == pytest.approx(2.0)  # only records with an nll: exp(4 ln 2 / 4)
    assert s["format_failures"] == pytest.approx(0.5)


def test_summarize_without_nll_gives_nan_perplexity() -> None:
    record = {"correct": False, "format_ok": True, "tokens": 1, "seconds": 0.1, "nll": None, "n_tokens_final": 0}
    s = summarize([record])
    assert math.isnan(s["perplexity"])
    assert s["accuracy"] == 0.0 and s["stderr"] == 0.0 and s["format_failures"] == 0.0

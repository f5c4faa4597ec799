"""Evaluation metrics: mean ± standard error, unbiased pass@k, spread across seeds, perplexity, and a summary.

Standard error follows lm-evaluation-harness: sample standard deviation (ddof=1) divided by sqrt(n).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["mean_stderr", "pass_at_k", "across_seeds", "perplexity", "summarize"]


def _sample_std(values: Sequence[float], mean: float) -> float:
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_stderr(values: Iterable[float]) -> tuple[float, float]:
    """Return (mean, standard error of the mean); stderr is std(ddof=1)/sqrt(n), and 0 when n < 2.

    Booleans count as 0/1. An empty input gives (nan, 0.0) rather than raising, so empty slices of a
    breakdown still print.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return math.nan, 0.0
    mean = sum(vals) / n
    if n < 2:
        return mean, 0.0
    return mean, _sample_std(vals, mean) / math.sqrt(n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    ``n`` samples were drawn for a problem and ``c`` of them were correct. Computed as a running product so
    large ``n`` does not overflow.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def across_seeds(means: Iterable[float]) -> tuple[float, float]:
    """Return (mean, sample std with ddof=1) of per-seed results; std is 0 for fewer than two seeds."""
    vals = [float(v) for v in means]
    if not vals:
        return math.nan, 0.0
    mean = sum(vals) / len(vals)
    return mean, (_sample_std(vals, mean) if len(vals) > 1 else 0.0)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of tokens); nan when there are no tokens."""
    if n_tokens <= 0:
        return math.nan
    return math.exp(nll_sum / n_tokens)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Summarize per-sample records into one result row.

    Each record has: correct (bool, the strict verdict), flexible (bool, the flexible verdict), format_ok
    (bool), tokens (int, generated), seconds (float), nll (summed negative log-likelihood of the model's OWN
    final output, or None when not measured), n_tokens_final (tokens that nll was summed over), and optionally
    gold_nll (summed negative log-likelihood of the gold target, teacher-forced; None or absent when not
    measured) and gold_tokens (tokens it was summed over).

    Returns accuracy and stderr (strict), accuracy_flexible and stderr_flexible, n, tokens_mean, seconds_mean,
    self_perplexity (perplexity of the model's own output, over records with an nll: a measure of how sure it
    was of what it said, not of how well it predicts the answer), gold_perplexity (of the gold target, over
    records with a gold_nll), each nan when no record has one, and format_failures (the fraction of responses
    that did not follow the answer format).
    """
    n = len(records)
    accuracy, stderr = mean_stderr(bool(r["correct"]) for r in records)
    accuracy_flexible, stderr_flexible = mean_stderr(bool(r["flexible"]) for r in records)
    with_nll = [r for r in records if r.get("nll") is not None]
    nll_total = sum(float(r["nll"]) for r in with_nll)
    nll_tokens = sum(int(r.get("n_tokens_final", 0)) for r in with_nll)
    with_gold = [r for r in records if r.get("gold_nll") is not None]
    gold_total = sum(float(r["gold_nll"]) for r in with_gold)
    gold_tokens = sum(int(r.get("gold_tokens", 0)) for r in with_gold)
    return {
        "accuracy": accuracy,
        "stderr": stderr,
        "accuracy_flexible": accuracy_flexible,
        "stderr_flexible": stderr_flexible,
        "n": n,
        "tokens_mean": mean_stderr(r["tokens"] for r in records)[0],
        "seconds_mean": mean_stderr(r["seconds"] for r in records)[0],
        "self_perplexity": perplexity(nll_total, nll_tokens),
        "gold_perplexity": perplexity(gold_total, gold_tokens),
        "format_failures": mean_stderr(not r["format_ok"] for r in records)[0],
    }

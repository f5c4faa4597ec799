"""Metrics against hand-computed values."""

from __future__ import annotations

import io
import math

import pytest

from rich.console import Console

from diffmas.eval.metrics import across_seeds, mean_stderr, pass_at_k, perplexity, summarize
from diffmas.eval.report import render_table
from diffmas.eval.results import compute_results
from diffmas.eval.runner import _record
from diffmas.eval.samples import sample_key
from diffmas.tasks import get_task


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
    nll = 2 * math.log(2)
    records = [
        {"correct": True, "flexible": True, "format_ok": True, "tokens": 10, "seconds": 1.0, "nll": nll,
         "n_tokens_final": 2, "gold_nll": 3 * math.log(4), "gold_tokens": 2},
        {"correct": False, "flexible": True, "format_ok": False, "tokens": 20, "seconds": 3.0, "nll": None,
         "n_tokens_final": 0, "gold_nll": math.log(4), "gold_tokens": 2},
        {"correct": True, "flexible": True, "format_ok": True, "tokens": 30, "seconds": 2.0, "nll": nll,
         "n_tokens_final": 2},
        {"correct": True, "flexible": True, "format_ok": False, "tokens": 40, "seconds": 2.0, "nll": None,
         "n_tokens_final": 0},
    ]
    s = summarize(records)
    assert s["n"] == 4
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["stderr"] == pytest.approx(0.25)
    assert (s["accuracy_flexible"], s["stderr_flexible"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert s["tokens_mean"] == pytest.approx(25.0)
    assert s["seconds_mean"] == pytest.approx(2.0)
    assert s["self_perplexity"] == pytest.approx(2.0)  # only records with an nll: exp(4 ln 2 / 4)
    assert s["gold_perplexity"] == pytest.approx(4.0)  # only records with a gold nll: exp(4 ln 4 / 4)
    assert "perplexity" not in s  # the old name hid that it scored the model's own output
    assert s["format_failures"] == pytest.approx(0.5)


def test_summarize_without_nll_gives_nan_perplexity() -> None:
    record = {"correct": False, "flexible": False, "format_ok": True, "tokens": 1, "seconds": 0.1, "nll": None,
              "n_tokens_final": 0}
    s = summarize([record])
    assert math.isnan(s["self_perplexity"]) and math.isnan(s["gold_perplexity"])
    assert s["accuracy"] == 0.0 and s["stderr"] == 0.0 and s["format_failures"] == 0.0


# ---------------------------------------------------------------------- strict and flexible, from sample to table

def _rec(answer: str, generated_tokens: int) -> dict:
    """What System.run returns for one problem (the fields the runner reads)."""
    agent = {"generated_tokens": generated_tokens, "seconds": 0.5}
    return {"answer": answer, "generated_tokens": generated_tokens, "agents": [agent], "nll_sum": None,
            "trace_tokens": 10}


def test_record_grades_a_response_cut_at_the_token_limit_strictly() -> None:
    task = get_task("rg:chain_sum")
    ex = task.load(limit=1)[0]
    response = f"Adding up gives {ex.answer}"  # right number, no "Answer:" line
    s = _record("single", task, 0, ex, _rec(response, 5), max_new_tokens=6)
    assert (s["correct"], s["flexible"], s["truncated"], s["extracted"]) == (False, True, False, ex.answer)
    s = _record("single", task, 0, ex, _rec(response, 6), max_new_tokens=6)  # it used the whole budget
    assert (s["correct"], s["flexible"], s["truncated"], s["extracted"]) == (False, False, True, None)
    s = _record("single", task, 0, ex, _rec(f"Answer: {ex.answer}", 6), max_new_tokens=6)
    assert (s["correct"], s["flexible"], s["truncated"]) == (True, True, True)


def test_results_and_table_report_strict_and_flexible() -> None:
    task = get_task("rg:chain_sum")
    examples = task.load(limit=4)
    seeds = [0, 1]
    config = {"systems": [{"label": "new"}, {"label": "old"}], "seeds": seeds, "source": None, "temperature": 0.0}
    samples = {}
    for seed in seeds:
        for n, ex in enumerate(examples):
            base = {"task": task.name, "seed": seed, "id": ex.id, "format_ok": n < 2, "tokens": 5, "seconds": 1.0,
                    "nll_sum": None, "final_tokens": 5}
            # "new": right in the format on problem 0, right only loosely on problems 1 and 2 (seed 0 only for 2).
            samples[sample_key("new", task.name, seed, ex.id)] = {
                **base, "system": "new", "correct": n == 0, "flexible": n in (0, 1) or (n == 2 and seed == 0)}
            # "old": written before the split; its one verdict stands for both.
            samples[sample_key("old", task.name, seed, ex.id)] = {**base, "system": "old", "correct": n < 3}
    results = compute_results(config, samples, {task.name: (task, examples)})
    new, old = results["results"]
    assert (new["accuracy"], new["accuracy_flexible"]) == (pytest.approx(0.25), pytest.approx(0.625))
    # Over problems, as the strict stderr: per-problem flexible means 1, 1, 0.5, 0.
    assert new["stderr_flexible"] == pytest.approx(mean_stderr([1, 1, 0.5, 0])[1])
    assert old["accuracy"] == old["accuracy_flexible"] == pytest.approx(0.75)
    assert any("8 samples were graded before strict and flexible" in note for note in results["notes"])
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render_table(results))
    text = console.export_text()
    assert "strict % ± se" in text and "flexible % ± se" in text
    assert "25.0 ± 25.0" in text and "62.5 ± 23.9" in text
    # A results.json from before flexible accuracy existed still renders.
    for row in results["results"]:
        del row["accuracy_flexible"], row["stderr_flexible"]
    console.print(render_table(results))


def test_tables_show_gold_and_own_output_perplexity() -> None:
    from diffmas.experiments.demo import _markdown_table, _rows

    base = {"task": "t", "accuracy": 0.5, "stderr": 0.1, "accuracy_flexible": 0.5, "stderr_flexible": 0.1, "n": 2,
            "tokens_mean": 3.0, "seconds_mean": 0.1, "format_failures": 0.0}
    results = {"results": [{**base, "system": "new", "self_perplexity": 1.25, "gold_perplexity": 7.5},
                           {**base, "system": "old", "perplexity": 3.75}]}  # a results.json from before the rename
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(render_table(results))
    text = console.export_text()
    assert "gold ppl" in text and "own-output ppl" in text
    assert "7.50" in text and "1.25" in text and "3.75" in text
    table = _markdown_table(_rows(results))
    assert "| gold perplexity | perplexity of own output |" in table
    assert "| 7.50 | 1.25 |" in table and "| – | 3.75 |" in table

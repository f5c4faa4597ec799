"""Paired comparison of systems: McNemar, the (hierarchical) paired bootstrap, loading runs, and `diffmas compare`."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffmas.adapters import META_FILE
from diffmas.cli import app
from diffmas.errors import DiffMASError
from diffmas.eval.compare import (
    ARM_BETTER,
    BASELINE_BETTER,
    NO_DIFFERENCE,
    compare,
    load_arms,
    markdown_table,
    mcnemar_exact,
    paired_bootstrap,
    sign_flip_p,
)
from diffmas.eval.entries import parse_systems

TASK = "rg:chain_sum"


def _outcomes(*seeds: list[bool]) -> dict[int, dict[str, bool]]:
    """Training seed k -> the k-th list of outcomes, items named i0, i1, ..."""
    return {k: {f"i{i}": bool(c) for i, c in enumerate(outcomes)} for k, outcomes in enumerate(seeds)}


def _binom_two_sided(b: int, c: int) -> float:
    """The two-sided binomial test by definition: the probability of every outcome no likelier than the observed."""
    n = b + c
    pmf = [Fraction(math.comb(n, k), 2**n) for k in range(n + 1)]
    return float(min(1, sum(p for p in pmf if p <= pmf[b])))


def test_mcnemar_known_values():
    assert mcnemar_exact(0, 5) == 0.0625 and mcnemar_exact(5, 0) == 0.0625
    assert mcnemar_exact(2, 8) == 112 / 1024
    assert mcnemar_exact(1, 9) == 22 / 1024
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 4) == 1.0
    for b in range(13):
        for c in range(13):
            if b + c:
                assert mcnemar_exact(b, c) == pytest.approx(_binom_two_sided(b, c), rel=1e-12), (b, c)
    # Large n stays exact (no float underflow of 0.5**n) and agrees with the continuity-corrected normal.
    assert mcnemar_exact(1000, 1100) == pytest.approx(math.erfc(99 / math.sqrt(2100) / math.sqrt(2)), abs=5e-4)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_bootstrap_covers_true_difference_and_is_reproducible():
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(100):  # true accuracies 0.7 and 0.55, independent per item: true difference 0.15
        arm, base = rng.random(200) < 0.7, rng.random(200) < 0.55
        interval = paired_bootstrap(_outcomes(arm), _outcomes(base), n_boot=1000, seed=1)
        assert interval.diff == pytest.approx(arm.mean() - base.mean(), abs=1e-12)
        covered += interval.low <= 0.15 <= interval.high
    assert 90 <= covered <= 99  # a 95% interval
    arm, base = _outcomes(rng.random(300) < 0.7), _outcomes(rng.random(300) < 0.55)
    first = paired_bootstrap(arm, base, seed=3)
    assert paired_bootstrap(arm, base, seed=3) == first
    assert paired_bootstrap(arm, base, seed=4) != first
    assert first.low < first.diff < first.high


def test_bootstrap_is_paired():
    # The two systems agree on every item but 10 (arm right there): unpaired, the interval would span about
    # +-9 points around 0.05; paired, only the 10 discordant items vary.
    rng = np.random.default_rng(0)
    shared = rng.random(200) < 0.5
    arm = shared.copy()
    arm[np.flatnonzero(~shared)[:10]] = True
    interval = paired_bootstrap(_outcomes(arm), _outcomes(shared), seed=0)
    assert interval.diff == pytest.approx(0.05) and 0.015 <= interval.low and interval.high <= 0.085


def test_identical_systems():
    outcomes = _outcomes([True, False, True, True, False] * 20)
    (result,) = compare({"a": outcomes, "b": outcomes}, baseline="b", tokens={"a": 12.0, "b": 3.5})
    assert (result.diff, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)
    assert (result.arm_only, result.base_only, result.paired_p) == (0, 0, 1.0)
    assert result.verdict == NO_DIFFERENCE and result.n_items == 100 and result.acc_arm == result.acc_base == 0.6
    assert (result.tokens_arm, result.tokens_base, result.acc_arm_std_over_seeds) == (12.0, 3.5, None)


def test_verdicts_and_counts():
    good, half = _outcomes([True] * 100), _outcomes([True, False] * 50)
    (better,) = compare({"base": half, "arm": good}, "base", n_boot=2000)
    assert (better.arm, better.verdict, better.arm_only, better.base_only) == ("arm", ARM_BETTER, 50, 0)
    assert better.paired_p == mcnemar_exact(50, 0) and better.diff == 0.5
    (worse,) = compare({"base": good, "arm": half}, "base", n_boot=2000)
    assert (worse.verdict, worse.arm_only, worse.base_only, worse.diff) == (BASELINE_BETTER, 0, 50, -0.5)
    assert "| arm | 100 | 1 vs 1 | 50.0 | -50.0 [" in markdown_table([worse])
    assert not worse.seeds_uncovered and "items only" not in markdown_table([worse])


def test_a_verdict_says_when_training_seeds_are_not_resampled():
    """With several training seeds on a side but fewer than 3 on the other, the interval covers items only."""
    good, half = [True] * 100, [True, False] * 50
    for arm_seeds, base_seeds, uncovered in ((2, 3, True), (1, 3, True), (3, 3, False), (1, 1, False)):
        (row,) = compare({"base": _outcomes(*[half] * base_seeds), "arm": _outcomes(*[good] * arm_seeds)}, "base",
                         n_boot=200)
        assert row.verdict == ARM_BETTER and row.seeds_uncovered == uncovered
        assert ("items only" in markdown_table([row])) == uncovered


def test_several_seeds_seed_means_and_seed_pairs():
    # Arm seeds disagree on item 1 (seed mean 0.5); seed 1 lacks item 3, so only items 0-2 are common.
    arm = {0: {"i0": True, "i1": True, "i2": False, "i3": True}, 1: {"i0": True, "i1": False, "i2": False}}
    base = _outcomes([False, False, False, True])
    (result,) = compare({"arm": arm, "base": base}, "base", n_boot=500)
    assert (result.n_items, result.n_seeds_arm, result.n_seeds_base) == (3, 2, 1)
    assert (result.arm_only, result.base_only) == (2, 0)
    # Differences 1 and 0.5: flipping signs gives |sum| >= 1.5 in 2 of 4 cases.
    assert result.paired_p == pytest.approx(0.5, abs=0.01)
    assert result.mcnemar_per_seed_pair == ((0, 0, 0.5), (1, 0, 1.0))
    assert result.acc_arm == pytest.approx(0.5) and result.acc_arm_std_over_seeds == pytest.approx(math.sqrt(2) / 6)
    assert result.diff == pytest.approx(0.5)


def test_hierarchical_bootstrap_only_with_three_seeds_per_side():
    # Arm seeds reach 20%, 50% and 80%: with 3 seeds on both sides the interval must carry that spread.
    rng = np.random.default_rng(1)
    arm = _outcomes(*(rng.permutation(300) < 300 * p for p in (0.2, 0.5, 0.8)))
    base_run = rng.random(300) < 0.5
    three = paired_bootstrap(arm, _outcomes(base_run, base_run, base_run), seed=0)
    two = paired_bootstrap(arm, _outcomes(base_run, base_run), seed=0)
    assert three.diff == two.diff
    assert two.high - two.low < 0.15  # items only: about +-6 points
    assert three.high - three.low > 0.3  # seeds resampled: the mean of 3 of {.2, .5, .8} spans about +-20 points


def test_load_arms_groups_training_seeds(tmp_path):
    def write(folder: Path, rows: list[tuple]) -> Path:
        folder.mkdir()
        lines = [json.dumps({"system": s, "task": t, "seed": seed, "id": i, "correct": c, "tokens": tok})
                 for s, t, seed, i, c, tok in rows]
        (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
        return folder

    first = write(tmp_path / "a", [("curriculum/s0", TASK, 0, "p1", True, 4), ("curriculum/s2", TASK, 0, "p1", False, 8),
                                   ("curriculum/s2", TASK, 1, "p1", True, 99), ("single", TASK, 0, "p1", True, 2),
                                   ("single", "gsm8k", 0, "q", False, 30), ("x/sy", TASK, 0, "p1", True, 1)])
    second = write(tmp_path / "b", [("single", TASK, 0, "p1", True, 2), ("single", TASK, 0, "p2", False, 6)])
    arms, tokens = load_arms([first, second])
    assert arms == {TASK: {"curriculum": {0: {"p1": True}, 2: {"p1": False}}, "single": {0: {"p1": True, "p2": False}},
                           "x/sy": {0: {"p1": True}}},
                    "gsm8k": {"single": {0: {"q": False}}}}
    assert tokens == {TASK: {"curriculum": 6.0, "single": 4.0, "x/sy": 1.0}, "gsm8k": {"single": 30.0}}
    assert load_arms([first], decoding_seed=1)[0] == {TASK: {"curriculum": {2: {"p1": True}}}}
    clash = write(tmp_path / "c", [("single", TASK, 0, "p1", False, 2)])
    with pytest.raises(DiffMASError, match="differs between folders"):
        load_arms([first, clash])


def test_system_labels(tmp_path):
    for name in ("x", "y", "lr=1e-4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / META_FILE).write_text(json.dumps({"roles": {}}))
    entries = parse_systems(["single", "base = single", f"curriculum/s0=diffmas:{tmp_path / 'x'}",
                             f"curriculum/s1=diffmas:{tmp_path / 'y'}", f"diffmas:{tmp_path / 'lr=1e-4'}"])
    assert [(e.label, e.name) for e in entries] == [("single", "single"), ("base", "single"),
                                                     ("curriculum/s0", "diffmas"), ("curriculum/s1", "diffmas"),
                                                     ("diffmas", "diffmas")]
    assert entries[2].adapter == str(tmp_path / "x") and entries[4].adapter == str(tmp_path / "lr=1e-4")
    for bad, message in ((["=single"], "bad system label"), (["a,b=single"], "bad system label"),
                         (["s=single", "s=latent_mas"], "listed twice"), (["c/s1=diffmas"], "needs an adapter")):
        with pytest.raises(DiffMASError, match=message):
            parse_systems(bad)


@pytest.fixture
def eval_dir(tmp_path) -> Path:
    """A samples.jsonl with a baseline that solves half the items and an arm with two seeds that solves them all."""
    rows = [{"system": system, "task": TASK, "seed": 0, "id": f"p{i}", "correct": correct(i), "tokens": tokens}
            for i in range(60)
            for system, correct, tokens in (("single", lambda i: i % 2 == 0, 5), ("curriculum/s0", lambda i: True, 7),
                                            ("curriculum/s1", lambda i: True, 9))]
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_cli_writes_json_and_forest_plot(eval_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", str(eval_dir), "--baseline", "single", "--out", str(out),
                                      "--boot", "500"])
    assert result.exit_code == 0, result.output
    assert "curriculum" in result.output and ARM_BETTER in result.output
    saved = json.loads((out / "compare.json").read_text())
    assert (saved["baseline"], saved["n_boot"]) == ("single", 500)
    (row,) = saved["tasks"][TASK]
    assert (row["arm"], row["n_items"], row["n_seeds_arm"], row["acc_arm"], row["acc_base"]) == ("curriculum", 60, 2,
                                                                                                 1.0, 0.5)
    assert (row["arm_only"], row["base_only"], row["tokens_arm"], row["verdict"]) == (30, 0, 8.0, ARM_BETTER)
    assert (out / "forest_rg_chain_sum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["baseline", "no_samples", "no_common_items"])
def test_cli_errors(eval_dir, tmp_path, case):
    args, message = {
        "baseline": ([str(eval_dir), "--baseline", "nope"], "unknown baseline 'nope' for task rg:chain_sum; arms "
                                                            "found: single, curriculum"),
        "no_samples": ([str(tmp_path), "--baseline", "single"], "has no samples.jsonl"),
        "no_common_items": ([str(eval_dir), "--baseline", "single"], "share no items"),
    }[case]
    if case == "no_common_items":
        text = (eval_dir / "samples.jsonl").read_text().replace('"system": "single", "task": "rg:chain_sum", '
                                                                '"seed": 0, "id": "p', '"system": "single", "task": '
                                                                '"rg:chain_sum", "seed": 0, "id": "other')
        (eval_dir / "samples.jsonl").write_text(text)
    result = CliRunner().invoke(app, ["compare", *args])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], result.output
    assert not (eval_dir / "compare.json").exists()


def test_a_zero_difference_gets_no_small_p_however_many_seeds_a_side_has():
    # Two baseline seeds that are each right on a different half, and an arm equal to the first of them: the
    # accuracies are equal, so no test may call the difference significant (a per-item majority vote counting
    # the ties as wrong gave the arm 50 "wins" and p ~ 1e-15 here).
    first = np.arange(100) < 50
    base = {0: {f"q{i}": bool(v) for i, v in enumerate(first)}, 1: {f"q{i}": bool(not v) for i, v in enumerate(first)}}
    arm = {0: base[0]}
    (result,) = compare({"arm": arm, "base": base}, "base", n_boot=500)
    assert result.diff == 0 and (result.arm_only, result.base_only) == (50, 50)
    assert result.paired_p > 0.9


def test_sign_flip_p_is_exact_mcnemar_on_binary_differences_and_agrees_with_it_on_halves():
    diffs = np.array([1.0] * 12 + [-1.0] * 3 + [0.0] * 20)
    assert sign_flip_p(diffs) == mcnemar_exact(12, 3)
    # Halved differences: the same sign-flip distribution up to scale, so the Monte Carlo p matches the exact one.
    assert sign_flip_p(diffs / 2, n_flips=200_000) == pytest.approx(mcnemar_exact(12, 3), abs=0.005)
    # Far in the tail (no draw as extreme) the normal approximation takes over: tiny, not the resolution 1e-5.
    far = np.array([0.5] * 200 + [-0.5] * 20)
    assert 0 < sign_flip_p(far) < 1e-20

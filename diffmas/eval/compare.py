"""Paired statistics for comparing systems evaluated on the same items.

    diffmas compare runs/eval-a runs/eval-b --baseline single_sft

Every system is scored on the same problems, so differences are paired: the bootstrap resamples items jointly
for both systems, and McNemar's test (its sign-flip form for means over training seeds) looks only at the items
the two systems disagree on. An arm may be trained several times; ``diffmas eval --systems
curriculum/s1=diffmas:DIR`` labels training seed 1 of arm ``curriculum``, and with 3 or more training seeds on
both sides the bootstrap also resamples seeds, so the interval includes the run-to-run spread of training.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.table import Table

from diffmas.errors import DiffMASError
from diffmas.eval.metrics import across_seeds

__all__ = ["Outcomes", "Interval", "Comparison", "mcnemar_exact", "sign_flip_p", "common_items", "paired_bootstrap", "compare",
           "load_arms", "markdown_table", "comparison_table", "forest_plot", "compare_dirs", "NO_DIFFERENCE",
           "ARM_BETTER", "BASELINE_BETTER"]

#: training seed -> item id -> correct
Outcomes = dict[int, dict[str, bool]]

NO_DIFFERENCE = "no difference detected at this n"
ARM_BETTER = "arm better"
BASELINE_BETTER = "baseline better"
# Training seeds each side needs before the bootstrap resamples seeds too (fewer cannot estimate their spread).
SEEDS_TO_RESAMPLE = 3
# A label "<arm>/s<K>" names training seed K of an arm.
_SEED_LABEL = re.compile(r"^(?P<arm>.+)/s(?P<seed>\d+)$")
# Resampled item indices drawn per block: bounds memory (8 bytes each) however many items and replicates.
_BLOCK_DRAWS = 2_000_000


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts ``b`` (only A right) and ``c`` (only B right).

    Under the null each discordant item is a fair coin, so this is a two-sided binomial test of ``b`` successes
    in ``b + c`` trials with p = 0.5: twice the smaller tail, capped at 1. No discordant items gives 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers until the one division: no underflow for large n


def sign_flip_p(diffs: np.ndarray, n_flips: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip test that the per-item differences ``diffs`` sum to 0.

    Under the null the two systems are exchangeable on every item, so each difference is as likely negated.
    With one outcome per item and side the differences are 0 or +-1 and this is McNemar's exact test (computed
    exactly); differences of training-seed means are tested by Monte Carlo, (1 + hits) / (1 + n_flips), and
    below that resolution (no draw as extreme) by the normal approximation of the same statistic.
    """
    d = diffs[diffs != 0]
    if np.all(np.abs(d) == 1):
        return mcnemar_exact(int((d > 0).sum()), int((d < 0).sum()))
    observed = abs(d.sum()) - 1e-9 * len(d)  # sums of the same fractions in another order may differ in the last bit
    rng = np.random.default_rng(seed)
    hits = 0
    block = max(1, _BLOCK_DRAWS // len(d))
    for lo in range(0, n_flips, block):
        size = min(block, n_flips - lo)
        signs = rng.integers(0, 2, size=(size, len(d)), dtype=np.int8) * 2 - 1
        hits += int((np.abs(signs @ d) >= observed).sum())
    if hits == 0:  # the sign-flip sum has variance sum(d^2) under the null
        return min(1 / (1 + n_flips), math.erfc(abs(d.sum()) / math.sqrt(2 * float(np.sum(d * d)))))
    return (1 + hits) / (1 + n_flips)


def common_items(*sides: Outcomes) -> list[str]:
    """Item ids present in every training seed of every side, sorted (so resampling is reproducible)."""
    id_sets = [set(per_item) for side in sides for per_item in side.values()]
    return sorted(set.intersection(*id_sets)) if id_sets else []


def _matrix(outcomes: Outcomes, items: list[str]) -> np.ndarray:
    """(seeds, items) 0/1 matrix, seeds in ascending order."""
    return np.array([[outcomes[s][i] for i in items] for s in sorted(outcomes)], dtype=np.float64)


def _resampled_seed_mean(rng: np.random.Generator, per_seed: np.ndarray) -> np.ndarray:
    """Mean over a with-replacement resample of the seed columns, one resample per row (replicate)."""
    replicates, seeds = per_seed.shape
    picks = rng.integers(0, seeds, size=(replicates, seeds))
    return np.take_along_axis(per_seed, picks, axis=1).mean(axis=1)


class Interval(NamedTuple):
    """A point estimate and its bootstrap confidence interval."""

    diff: float
    low: float
    high: float


def paired_bootstrap(arm: Outcomes, base: Outcomes, *, n_boot: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> Interval:
    """Percentile bootstrap interval of accuracy(arm) - accuracy(base) over the items common to all seeds.

    The point estimate is the mean over training seeds of accuracy, arm minus baseline. Each replicate resamples
    the items with replacement, the same items for both systems and all their seeds (the pairing). When both
    sides have 3 or more training seeds, each replicate also resamples each side's seeds independently (a
    hierarchical bootstrap); with fewer, the seed spread cannot be estimated and only items are resampled.
    Deterministic given ``seed``.
    """
    items = common_items(arm, base)
    if not items:
        raise DiffMASError("the two systems share no items (on every training seed)")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    a, b = _matrix(arm, items), _matrix(base, items)
    hierarchical = len(a) >= SEEDS_TO_RESAMPLE and len(b) >= SEEDS_TO_RESAMPLE
    rng = np.random.default_rng(seed)
    n = len(items)
    diffs = np.empty(n_boot)
    block = max(1, _BLOCK_DRAWS // n)
    for lo in range(0, n_boot, block):
        size = min(block, n_boot - lo)
        picks = rng.integers(0, n, size=(size, n))
        # How often each item was drawn in each replicate: accuracy on the resample is a weighted mean.
        counts = np.bincount((picks + n * np.arange(size)[:, None]).ravel(), minlength=size * n).reshape(size, n)
        per_seed_a, per_seed_b = counts @ a.T / n, counts @ b.T / n  # (replicates, seeds)
        if hierarchical:
            diffs[lo:lo + size] = _resampled_seed_mean(rng, per_seed_a) - _resampled_seed_mean(rng, per_seed_b)
        else:
            diffs[lo:lo + size] = per_seed_a.mean(axis=1) - per_seed_b.mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Interval(float(a.mean(axis=1).mean() - b.mean(axis=1).mean()), float(low), float(high))


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline on their common items; accuracies are means over training seeds."""

    arm: str
    baseline: str
    n_items: int
    n_seeds_arm: int
    n_seeds_base: int
    acc_arm: float
    acc_base: float
    acc_arm_std_over_seeds: float | None
    acc_base_std_over_seeds: float | None
    diff: float
    ci_low: float
    ci_high: float
    paired_p: float
    """Paired sign-flip p of the per-item differences of seed means (exact McNemar with one seed per side)."""
    arm_only: int
    base_only: int
    #: (arm training seed, baseline training seed, McNemar p) for each matched pair of single runs
    mcnemar_per_seed_pair: tuple[tuple[int, int, float], ...]
    tokens_arm: float | None
    tokens_base: float | None
    verdict: str

    @property
    def seeds_uncovered(self) -> bool:
        """A side has several training seeds but the interval resampled items only (too few seeds on a side to
        resample them): seed-to-seed variance exists and the verdict does not cover it."""
        return max(self.n_seeds_arm, self.n_seeds_base) > 1 and \
            min(self.n_seeds_arm, self.n_seeds_base) < SEEDS_TO_RESAMPLE


def _seed_pairs(arm_seeds: list[int], base_seeds: list[int]) -> list[tuple[int, int]]:
    """Seed k with seed k; a side trained once (e.g. a training-free baseline) pairs with every seed of the other."""
    if len(base_seeds) == 1:
        return [(s, base_seeds[0]) for s in arm_seeds]
    if len(arm_seeds) == 1:
        return [(arm_seeds[0], s) for s in base_seeds]
    return [(s, s) for s in arm_seeds if s in base_seeds]


def _discordant(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(items only ``a`` got right, items only ``b`` got right) for two boolean vectors."""
    return int(np.sum(a & ~b)), int(np.sum(~a & b))


def compare(arms: dict[str, Outcomes], baseline: str, tokens: dict[str, float] | None = None, *,
            n_boot: int = 10_000, seed: int = 0) -> list[Comparison]:
    """Compare every arm other than ``baseline`` with it, in the order of ``arms``.

    ``tokens`` maps arm -> mean decoded tokens per problem. The interval is :func:`paired_bootstrap`'s. The
    headline ``paired_p`` is :func:`sign_flip_p` of the per-item differences of training-seed means: exact
    McNemar with one seed per side, its paired generalisation with more (a majority vote would count a tie
    between two seeds as wrong and bias the test against the side with an even number of seeds). It tests items,
    not training-seed variance (only the hierarchical interval covers that). ``arm_only`` / ``base_only`` count
    the items where one side's seed mean is higher. ``mcnemar_per_seed_pair`` gives the test for each matched
    pair of runs (see _seed_pairs), so a headline result carried by one lucky seed shows up there.
    """
    if baseline not in arms:
        raise DiffMASError(f"unknown baseline '{baseline}'; arms found: {', '.join(arms)}")
    base = arms[baseline]
    results = []
    for name, arm in arms.items():
        if name == baseline:
            continue
        items = common_items(arm, base)
        if not items:
            raise DiffMASError(f"arm '{name}' and baseline '{baseline}' share no items (on every training seed)")
        a, b = _matrix(arm, items).astype(bool), _matrix(base, items).astype(bool)
        acc_a, acc_b = a.mean(axis=1), b.mean(axis=1)
        std_a, std_b = ((across_seeds(acc.tolist())[1] if len(acc) > 1 else None) for acc in (acc_a, acc_b))
        item_a, item_b = a.mean(axis=0), b.mean(axis=0)
        arm_only, base_only = int(np.sum(item_a > item_b)), int(np.sum(item_a < item_b))
        seeds_a, seeds_b = sorted(arm), sorted(base)
        per_pair = tuple((sa, sb, mcnemar_exact(*_discordant(a[seeds_a.index(sa)], b[seeds_b.index(sb)])))
                         for sa, sb in _seed_pairs(seeds_a, seeds_b))
        interval = paired_bootstrap(arm, base, n_boot=n_boot, seed=seed)
        verdict = ARM_BETTER if interval.low > 0 else BASELINE_BETTER if interval.high < 0 else NO_DIFFERENCE
        results.append(Comparison(
            arm=name, baseline=baseline, n_items=len(items), n_seeds_arm=len(arm), n_seeds_base=len(base),
            acc_arm=float(acc_a.mean()), acc_base=float(acc_b.mean()), acc_arm_std_over_seeds=std_a,
            acc_base_std_over_seeds=std_b, diff=interval.diff, ci_low=interval.low, ci_high=interval.high,
            paired_p=sign_flip_p(item_a - item_b, seed=seed), arm_only=arm_only, base_only=base_only,
            mcnemar_per_seed_pair=per_pair, tokens_arm=(tokens or {}).get(name),
            tokens_base=(tokens or {}).get(baseline), verdict=verdict))
    return results


def _read_samples(path: Path) -> list[dict]:
    """The records of a samples.jsonl, read-only; a cut-off last line (a run in progress or killed) is skipped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: the writer was cut off mid-record
                continue
            raise DiffMASError(f"{path} line {number} is corrupt ({exc})") from exc
    return records


def load_arms(dirs: Sequence[Path], decoding_seed: int = 0
              ) -> tuple[dict[str, dict[str, Outcomes]], dict[str, dict[str, float]]]:
    """Read ``samples.jsonl`` from each ``diffmas eval`` folder: ({task: {arm: outcomes}}, {task: {arm: tokens}}).

    Only samples of ``decoding_seed`` are kept (their "seed" is the decoding seed). A system label
    ``<arm>/s<K>`` is training seed K of ``<arm>``; any other label is an arm with training seed 0. The same
    arm and seed in several folders is merged when the shared items agree (e.g. a deterministic baseline
    evaluated in each folder) and refused otherwise. Tokens are the mean decoded tokens per problem of an arm.
    """
    if not dirs:
        raise DiffMASError("give at least one folder written by `diffmas eval`")
    arms: dict[str, dict[str, Outcomes]] = defaultdict(lambda: defaultdict(dict))
    tokens: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for d in dirs:
        path = Path(d) / "samples.jsonl"
        if not path.is_file():
            raise DiffMASError(f"{d} has no samples.jsonl (write one with `diffmas eval ... --out {d}`)")
        for r in _read_samples(path):
            if int(r["seed"]) != decoding_seed:
                continue
            match = _SEED_LABEL.match(r["system"])
            arm, training_seed = (match["arm"], int(match["seed"])) if match else (r["system"], 0)
            per_item = arms[r["task"]][arm].setdefault(training_seed, {})
            item, correct = str(r["id"]), bool(r["correct"])
            if item in per_item:
                if per_item[item] != correct:
                    raise DiffMASError(f"{r['system']} on {r['task']} item {item} differs between folders; give "
                                       "the runs distinct labels (diffmas eval --systems LABEL=name:DIR)")
                continue
            per_item[item] = correct
            tokens[r["task"]][arm].append(float(r["tokens"]))
    if not arms:
        raise DiffMASError(f"no samples with decoding seed {decoding_seed} in {', '.join(map(str, dirs))}")
    return ({task: {arm: dict(seeds) for arm, seeds in by_arm.items()} for task, by_arm in arms.items()},
            {task: {arm: sum(v) / len(v) for arm, v in by_arm.items()} for task, by_arm in tokens.items()})


def _acc(value: float, std: float | None) -> str:
    return f"{100 * value:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _cells(c: Comparison) -> list[str]:
    """arm, n, seeds, acc ± std, diff [CI], p, tokens, verdict; percentages in points."""
    return [c.arm, str(c.n_items), f"{c.n_seeds_arm} vs {c.n_seeds_base}", _acc(c.acc_arm, c.acc_arm_std_over_seeds),
            f"{100 * c.diff:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]", f"{c.paired_p:.3g}",
            "–" if c.tokens_arm is None else f"{c.tokens_arm:.1f}",
            c.verdict + (" (items only; training seeds not resampled)" if c.seeds_uncovered else "")]


_COLUMNS = ("arm", "n", "seeds (arm vs base)", "acc % ± std", "diff pp [95% CI]", "paired p", "tokens", "verdict")


def markdown_table(comparisons: Sequence[Comparison]) -> str:
    """A Markdown table, one row per arm, headed by the baseline's accuracy."""
    if not comparisons:
        return ""
    first = comparisons[0]
    lines = [f"Baseline `{first.baseline}`: accuracy {_acc(first.acc_base, first.acc_base_std_over_seeds)} %.", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(c)) + " |" for c in comparisons]
    return "\n".join(lines) + "\n"


def comparison_table(comparisons: Sequence[Comparison], title: str) -> Table:
    """A rich table: the baseline first (accuracy and tokens only), then one row per arm."""
    table = Table(show_header=True, header_style="bold", title=title)
    for col in _COLUMNS:
        table.add_column(col, justify="left" if col in ("arm", "verdict") else "right", no_wrap=col == "arm")
    if comparisons:
        c = comparisons[0]
        table.add_row(f"{c.baseline} (baseline)", str(c.n_items), str(c.n_seeds_base),
                      _acc(c.acc_base, c.acc_base_std_over_seeds), "", "",
                      "–" if c.tokens_base is None else f"{c.tokens_base:.1f}", "")
    for c in comparisons:
        table.add_row(*_cells(c))
    return table


def forest_plot(comparisons: Sequence[Comparison], path: Path, title: str) -> Path:
    """Forest plot: one row per arm, point = accuracy difference, bar = 95% CI, dashed line at 0. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    colors = {ARM_BETTER: "tab:green", BASELINE_BETTER: "tab:red", NO_DIFFERENCE: "tab:gray"}
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * len(comparisons)), dpi=120)
    ys = list(range(len(comparisons)))[::-1]  # first arm on top
    for y, c in zip(ys, comparisons):
        ax.errorbar(100 * c.diff, y, xerr=[[100 * (c.diff - c.ci_low)], [100 * (c.ci_high - c.diff)]], fmt="o",
                    color=colors[c.verdict], capsize=4)
        ax.annotate(f"{100 * c.acc_arm:.1f}% vs {100 * c.acc_base:.1f}%, p={c.paired_p:.3g}", xy=(1.02, y),
                    xycoords=("axes fraction", "data"), va="center", fontsize=8)
    ax.axvline(0, color="black", linewidth=1, linestyle="--")
    ax.set_yticks(ys, [c.arm for c in comparisons])
    ax.set_ylim(-0.7, len(comparisons) - 0.3)
    baseline = comparisons[0].baseline if comparisons else "baseline"
    ax.set_xlabel(f"accuracy − {baseline} (percentage points, 95% bootstrap CI)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, bbox_inches="tight")  # "tight" keeps the labels written right of the axes
    plt.close(fig)
    return Path(path)


def compare_dirs(dirs: Sequence[Path], baseline: str, *, task: str | None = None, out: Path | None = None,
                 n_boot: int = 10_000, seed: int = 0) -> tuple[dict[str, list[Comparison]], list[Path]]:
    """Compare every arm with ``baseline`` per task; writes ``compare.json`` and ``forest_<task>.png`` to ``out``.

    ``out`` defaults to the first folder; ':' and other characters unsafe in file names become '_' in <task>.
    Returns ({task: comparisons}, [compare.json, plots...]).
    """
    arms, tokens = load_arms(dirs)
    if task is not None:
        if task not in arms:
            raise DiffMASError(f"no samples for task '{task}'; tasks found: {', '.join(arms)}")
        arms = {task: arms[task]}
    by_task = {}
    for name, task_arms in arms.items():
        if baseline not in task_arms:
            raise DiffMASError(f"unknown baseline '{baseline}' for task {name}; arms found: {', '.join(task_arms)}")
        if len(task_arms) < 2:
            raise DiffMASError(f"task {name} has only the baseline '{baseline}': nothing to compare")
        by_task[name] = compare(task_arms, baseline, tokens[name], n_boot=n_boot, seed=seed)
    out_dir = Path(out) if out is not None else Path(dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"dirs": [str(d) for d in dirs], "baseline": baseline, "n_boot": n_boot, "seed": seed,
               "tasks": {name: [asdict(c) for c in comps] for name, comps in by_task.items()}}
    json_path = out_dir / "compare.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    plots = [forest_plot(comps, out_dir / f"forest_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png",
                         f"{name}: each arm vs {baseline}") for name, comps in by_task.items()]
    return by_task, [json_path, *plots]

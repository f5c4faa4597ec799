"""The study's report, rebuilt from its committed files after every finished arm.

Reads ``docs/arms/*.json`` (one per arm x training seed x task) and ``docs/samples/*.jsonl`` (per-item
outcomes), and writes ``results.json`` (every arm x seed x task with n, accuracy, stderr, decoded tokens and
the paired difference against both single_sft baselines; and per arm, pooled over seeds), ``README.md`` (the
tables), forest plots and the held-out loss curves.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from diffmas.eval.compare import Comparison, compare, forest_plot, markdown_table
from diffmas.experiments.curves import plot_heldout

BASELINES = {"sft_answer": "single_sft, answer-only", "sft_worked": "single_sft, worked solutions"}


def _load(docs: Path) -> tuple[list[dict], dict[str, dict[str, dict[int, dict[str, bool]]]]]:
    arms = [json.loads(p.read_text()) for p in sorted((docs / "arms").glob("*.json"))]
    outcomes: dict[str, dict[str, dict[int, dict[str, bool]]]] = defaultdict(lambda: defaultdict(dict))
    for rec in arms:
        stem = f"{rec['task'].removeprefix('rg:')}--{rec['arm']}--s{rec['seed']}"
        lines = (docs / "samples" / f"{stem}.jsonl").read_text().splitlines()
        outcomes[rec["task"]][rec["arm"]][rec["seed"]] = {
            (s := json.loads(line))["id"]: bool(s["correct"]) for line in lines}
    return arms, outcomes


def _summary(c: Comparison) -> dict:
    return {"diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "paired_p": c.paired_p,
            "arm_only": c.arm_only, "base_only": c.base_only, "n_items": c.n_items, "verdict": c.verdict,
            "seeds_uncovered": c.seeds_uncovered, "seeds_arm": c.n_seeds_arm, "seeds_base": c.n_seeds_base}


def _curves(arms: list[dict], docs: Path) -> Path | None:
    runs: dict[str, list] = {}
    for rec in arms:
        stem = f"{rec['task'].removeprefix('rg:')}--{rec['arm']}--s{rec['seed']}"
        runs.setdefault(rec["task"], []).append((rec["label"], docs / "curves" / f"{stem}.jsonl"))
    return plot_heldout(runs, docs / "heldout_loss.png", "inference configuration")


def write_report(docs: Path, n_boot: int = 10_000) -> dict:
    """Rebuild results.json, README.md and the plots under ``docs`` from the finished arms."""
    arms, outcomes = _load(docs)
    tokens: dict[str, dict[str, float]] = defaultdict(dict)
    for task in outcomes:
        for arm in outcomes[task]:
            runs = [a for a in arms if a["task"] == task and a["arm"] == arm]
            tokens[task][arm] = sum(a["tokens_mean"] for a in runs) / len(runs)
    rows = []
    for rec in arms:
        row = {k: rec[k] for k in ("task", "arm", "seed", "system", "n", "accuracy", "stderr", "tokens_mean",
                                   "format_failures", "accuracy_flexible", "train_seconds", "phase")}
        # Arms that predate the field ran on the study's first frozen commit (docs/study/NOTES.md).
        row["code"] = rec.get("code", "4bd81a8")
        if "shuffled" in rec:
            row["shuffled_trace"] = rec["shuffled"]
        for base in BASELINES:
            seeds = outcomes[rec["task"]].get(base)
            if seeds and rec["arm"] != base:
                base_seed = rec["seed"] if rec["seed"] in seeds else min(seeds)
                pair = {rec["arm"]: {rec["seed"]: outcomes[rec["task"]][rec["arm"]][rec["seed"]]},
                        base: {base_seed: seeds[base_seed]}}
                row[f"vs_{base}"] = {"base_seed": base_seed, **_summary(compare(pair, base, n_boot=n_boot)[0])}
        rows.append(row)
    pooled: dict[str, dict[str, list[dict]]] = {}
    text = ["# Grounding study: results so far", "",
            "Built by `make study` (`diffmas study`) from the finished arms in `arms/`; every number is a greedy "
            "evaluation on held-out problems. Intervals are 95% paired bootstrap intervals of the accuracy "
            "difference (items, and training seeds where both sides have 3 or more); p is a paired sign-flip test "
            "of the per-item differences (exact McNemar with one training seed per side; with more, of the per-item "
            "means over seeds). "
            "An interval that contains 0 is reported as no difference detected at this n.", ""]
    for task in sorted(outcomes):
        pooled[task] = {}
        text += [f"## {task}", "", "| arm | seed | n | accuracy ± stderr | decoded tokens | shuffled trace | code |",
                 "|---|---|---|---|---|---|---|"]
        for row in sorted((r for r in rows if r["task"] == task), key=lambda r: (r["arm"], r["seed"])):
            shuffled = row.get("shuffled_trace")
            text.append(f"| {row['arm']} | {row['seed']} | {row['n']} | {row['accuracy']:.3f} ± {row['stderr']:.3f} | "
                        f"{row['tokens_mean']:.1f} | "
                        + (f"{shuffled['accuracy']:.3f} ± {shuffled['stderr']:.3f}" if shuffled else "–")
                        + f" | {row['code']} |")
        text.append("")
        for base, title in BASELINES.items():
            if base not in outcomes[task]:
                continue
            comps = compare(dict(outcomes[task]), base, tokens[task], n_boot=n_boot)
            pooled[task][base] = [{"arm": c.arm, "acc_arm": c.acc_arm, "acc_base": c.acc_base, **_summary(c)}
                                  for c in comps]
            plot = forest_plot(comps, docs / f"forest_{task.removeprefix('rg:')}_vs_{base}.png",
                               f"{task}: accuracy difference vs {title}")
            text += [f"### Against {title} (all seeds pooled)", "", markdown_table(comps), "",
                     f"![forest plot]({plot.name})", ""]
    curves = _curves(arms, docs)
    if curves:
        text += ["## Held-out loss during training", "", f"![held-out loss]({curves.name})", ""]
    if arms:
        text += [f"Machine: {arms[-1]['machine']}. Config of each run: `arms/<id>.json`.", ""]
    results = {"arms": rows, "pooled": pooled}
    (docs / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (docs / "README.md").write_text("\n".join(text))
    return results

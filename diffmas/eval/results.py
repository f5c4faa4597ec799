"""results.json: a pure function of an evaluation's config and its finished samples, plus provenance (commit,
package versions, sandbox isolation), so a killed and resumed run ends with the same results as an uninterrupted
one.
"""

from __future__ import annotations

import math
import subprocess
from collections import Counter, defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

from diffmas.eval.entries import settings_notice
from diffmas.eval.metrics import across_seeds, mean_stderr, pass_at_k, summarize
from diffmas.eval.samples import sample_key
from diffmas.tasks import Example, Task

__all__ = ["compute_results"]


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this package runs from; (None, None) outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if commit.returncode != 0:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "diffmas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _finite(value: Any) -> Any:
    """NaN -> None, recursively: keeps results.json strict JSON and comparable with ``==``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _flexible(record: dict) -> bool:
    """The flexible verdict; samples written before it existed have one verdict, which stands for both."""
    return bool(record.get("flexible", record["correct"]))


def _row(label: str, task: Task, records: list[dict], seeds: list[int], temperature: float,
         partial: str | None) -> dict:
    """One system x task result; ``records`` ordered by (seed, example order) so float sums are reproducible."""
    row: dict[str, Any] = {"system": label, "task": task.name, "partial": partial}
    row.update(summarize([{"correct": r["correct"], "flexible": _flexible(r), "format_ok": r["format_ok"],
                           "tokens": r["tokens"], "seconds": r["seconds"], "nll": r["nll_sum"],
                           "n_tokens_final": r["final_tokens"], "gold_nll": r.get("gold_nll_sum"),
                           "gold_tokens": r.get("gold_tokens", 0)} for r in records]))
    row["n_samples"] = len(records)
    if len(seeds) > 1:
        per_problem: dict[str, list[bool]] = defaultdict(list)
        per_problem_flexible: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            per_problem[r["id"]].append(bool(r["correct"]))
            per_problem_flexible[r["id"]].append(_flexible(r))
        # Samples of one problem are correlated: the standard error is over problems (per-problem mean
        # accuracy), and the spread over seeds is reported beside it.
        row["n"] = len(per_problem)
        row["stderr"] = mean_stderr(sum(c) / len(c) for c in per_problem.values())[1]
        row["stderr_flexible"] = mean_stderr(sum(c) / len(c) for c in per_problem_flexible.values())[1]
        by_seed = [mean_stderr(r["correct"] for r in records if r["seed"] == s)[0] for s in seeds]
        mean, std = across_seeds(by_seed)
        row["seeds"] = {"n": len(seeds), "accuracy_per_seed": by_seed, "accuracy_mean": mean, "accuracy_std": std}
        if temperature > 0:
            k = len(seeds)
            full = [c for c in per_problem.values() if len(c) >= k]
            value, err = mean_stderr(pass_at_k(len(c), sum(c), k) for c in full)
            row["pass_at_k"] = {"k": k, "value": value, "stderr": err, "n": len(full)}
    return row


def constant_floor(task: Task, examples: list[Example]) -> float | None:
    """The accuracy of the best constant answer on ``examples`` (the most common gold answer's share): what a
    system that ignores the question can reach. None for code tasks (no answer to repeat)."""
    if task.kind == "code" or not examples:
        return None
    return max(Counter(ex.answer for ex in examples).values()) / len(examples)


def compute_results(config: dict, samples: dict[tuple, dict], tasks: dict[str, tuple[Task, list[Example]]]) -> dict:
    """results.json contents from the resolved ``config`` and the finished ``samples`` (keyed by sample_key)."""
    seeds = list(config["seeds"])
    rows = []
    for entry in config["systems"]:
        for name, (task, examples) in tasks.items():
            records = [samples[k] for seed in seeds for ex in examples
                       if (k := sample_key(entry["label"], name, seed, ex.id)) in samples]
            partial = task.partial if config["source"] is None else None
            rows.append(_row(entry["label"], task, records, seeds, config["temperature"], partial))
            rows[-1]["floor"] = constant_floor(task, examples)
    notes = []
    if len(seeds) > 1 and config["temperature"] == 0:
        notes.append("greedy decoding (temperature 0): every seed gives the same samples; extra seeds are redundant")
    notice = settings_notice(config["systems"])
    if notice:
        notes.append(notice.removeprefix("notice: "))
    unsplit = sum("flexible" not in r for r in samples.values())
    if unsplit:
        notes.append(f"{unsplit} samples were graded before strict and flexible verdicts were split: their one "
                     "verdict counts as both")
    isolation = None
    if any(task.kind == "code" for task, _ in tasks.values()):
        from diffmas.sandbox import isolation_level  # only code tasks need the sandbox (and its probe)

        isolation = isolation_level()
    commit, dirty = _git_state()
    return _finite({
        "config": config, "git_commit": commit, "git_dirty": dirty, "versions": _versions(),
        "sandbox_isolation": isolation, "notes": notes, "results": rows,
    })

"""Tables and plots from saved results.json files (one eval run, or several merged).

    diffmas eval --report runs/eval runs/eval-trained

The table shows strict and flexible accuracy ± standard error (see diffmas.tasks.grading) next to the cost of
getting it (tokens and seconds per problem), the perplexity of the gold target (the final agent teacher-forced on
the reference answer after the writers' trace) and the perplexity of the model's own output (how sure it was of
what it said: low for confident wrong answers too); the plots put every system x task's strict accuracy on
accuracy-vs-tokens and accuracy-vs-time axes, error bars = standard error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from diffmas.errors import DiffMASError

__all__ = ["load_results", "render_table", "plot", "report", "self_perplexity", "PLOTS"]

#: Plot file -> (x field of a result row, x-axis label).
PLOTS: dict[str, tuple[str, str]] = {
    "accuracy_vs_tokens.png": ("tokens_mean", "generated tokens per problem (all agents)"),
    "accuracy_vs_time.png": ("seconds_mean", "seconds per problem (all agents)"),
}


def read_results(run_dir: Path) -> dict:
    """An eval folder's results.json, with a one-line error when it is missing or not JSON."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise DiffMASError(f"{run_dir} has no results.json (write one with `diffmas eval ... --out {run_dir}`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DiffMASError(f"{path} is not valid JSON: {exc}") from exc


def load_results(dirs: Sequence[Path]) -> dict:
    """Read ``results.json`` from each folder and merge their rows.

    A system that appears in several folders for the same task is relabelled ``system@<folder name>`` so the
    rows stay apart. Returns ``{"runs": [{dir, config, notes, ...}], "results": [rows]}``.
    """
    if not dirs:
        raise DiffMASError("give at least one results folder")
    runs, rows = [], []
    for d in dirs:
        data = read_results(Path(d))
        path = Path(d) / "results.json"
        if data.get("status") != "complete" or "results" not in data:
            raise DiffMASError(f"{path} is from a run that did not finish; rerun the same eval command to resume it")
        runs.append({"dir": str(d), **{k: v for k, v in data.items() if k != "results"}})
        rows += [{**row, "dir": str(d)} for row in data["results"]]
    seen: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        seen.setdefault((row["system"], row["task"]), set()).add(row["dir"])
    for row in rows:
        if len(seen[(row["system"], row["task"])]) > 1:
            row["system"] = f"{row['system']}@{Path(row['dir']).name}"
    return {"runs": runs, "results": rows}


def self_perplexity(row: dict) -> float | None:
    """A result row's perplexity of the model's own output; results.json files written before the rename call it
    ``perplexity``."""
    return row.get("self_perplexity", row.get("perplexity"))


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(scale * value, fmt)


def _percent(mean: float | None, stderr: float | None) -> str:
    """"12.0 ± 3.2"; "–" when missing (flexible accuracy is absent from results written before it existed)."""
    return "–" if mean is None else f"{100 * mean:.1f} ± {100 * stderr:.1f}"


def render_table(results: dict) -> Table:
    """A rich table with one row per system x task (``results``: results.json contents or `load_results`)."""
    rows = results["results"]
    multi_seed = any("seeds" in r for r in rows)
    pass_k = any("pass_at_k" in r for r in rows)
    table = Table(show_header=True, header_style="bold", title="DiffMAS evaluation")
    for col in ("system", "task", "strict % ± se", "flexible % ± se", *(["seeds mean ± std"] if multi_seed else []),
                *(["pass@k %"] if pass_k else []), "n", "tokens", "s/problem", "gold ppl", "own-output ppl",
                "format fail %"):
        text = col in ("system", "task")
        table.add_column(col, justify="left" if text else "right", no_wrap=text)
    notes: list[str] = []
    for r in rows:
        task = r["task"]
        if r.get("partial"):
            task += " *"
            notes.append(f"* {r['task']}: {r['partial']}")
        cells = [r["system"], task, _percent(r["accuracy"], r["stderr"]),
                 _percent(r.get("accuracy_flexible"), r.get("stderr_flexible"))]
        if multi_seed:
            s = r.get("seeds")
            cells.append(f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f} ({s['n']})" if s else "")
        if pass_k:
            p = r.get("pass_at_k")
            cells.append(f"{_num(p['value'], '.1f', 100)} (k={p['k']})" if p else "")
        cells += [str(r["n"]), _num(r["tokens_mean"], ".1f"), _num(r["seconds_mean"], ".3f"),
                  _num(r.get("gold_perplexity"), ".2f"), _num(self_perplexity(r), ".2f"),
                  _num(r["format_failures"], ".1f", 100)]
        table.add_row(*cells)
    for run in results.get("runs", [results]):
        notes += run.get("notes", [])
    if notes:
        table.caption = "\n".join(dict.fromkeys(notes))
    return table


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Write accuracy-vs-tokens and accuracy-vs-time PNGs into ``out_dir``; returns their paths.

    One point per system x task; colour = system, marker = task, error bars = standard error.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    rows = [r for r in results["results"] if r["accuracy"] is not None]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(systems)}
    markers = {t: "osD^v<>pXh*"[i % 11] for i, t in enumerate(tasks)}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, (field, xlabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for r in rows:
            if r.get(field) is None:
                continue
            ax.errorbar(r[field], 100 * r["accuracy"], yerr=100 * r["stderr"], color=colors[r["system"]],
                        marker=markers[r["task"]], markersize=7, capsize=3, linestyle="none")
            label = r["system"] if len(tasks) == 1 else f"{r['system']} / {r['task']}"
            ax.annotate(label, (r[field], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        xs = [r[field] for r in rows if r.get(field)]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:  # e.g. text_mas vs single: keep both ends readable
            ax.set_xscale("log")
        ax.margins(x=0.15)  # room for the point labels at both ends
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy % (± standard error)")
        ax.set_title(", ".join(tasks) if len(tasks) <= 3 else f"{len(tasks)} tasks")
        top = max((100 * (r["accuracy"] + r["stderr"]) for r in rows), default=0.0)
        # From 0, so gaps read as they are, without empty headroom; the pad keeps points at 0 or 100 whole.
        high = min(100.0, 1.15 * top + 5)
        ax.set_ylim(-0.04 * high, 1.04 * high)
        ax.grid(alpha=0.3)
        # Proxy artists: labels of coinciding points overlap, the legend still tells them apart.
        for s in systems:
            ax.plot([], [], marker="o", color=colors[s], linestyle="none", label=s)
        if len(tasks) > 1:
            for t in tasks:
                ax.plot([], [], marker=markers[t], color="grey", linestyle="none", label=t)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def report(dirs: Sequence[Path], out_dir: Path | None = None) -> tuple[dict[str, Any], Table, list[Path]]:
    """Re-render table and plots from saved results; plots go to ``out_dir`` (default: the first folder).

    Returns (merged results, table, plot paths).
    """
    results = load_results(dirs)
    table = render_table(results)
    return results, table, plot(results, Path(out_dir) if out_dir is not None else Path(dirs[0]))

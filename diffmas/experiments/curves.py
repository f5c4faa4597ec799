"""The held-out loss curves of a study's runs, one panel per task (both studies' reports draw them)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_heldout(runs: dict[str, list[tuple[str, Path]]], path: Path, what: str) -> Path | None:
    """Plot, per task of ``runs`` ({task: [(label, metrics.jsonl path)]}), every run's held-out loss against the
    training step (``what`` names the held-out set in the titles); None when there is no run."""
    if not any(runs.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(task for task, found in runs.items() if found)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, metrics_path in runs[task]:
            metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()]
            held = [(m["step"], m["heldout_loss"]) for m in metrics if "heldout_loss" in m]
            ax.plot(*zip(*held), marker=".", label=label)
        ax.set_title(f"{task}: held-out loss ({what})")
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy per target token")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The held-out loss curves of a study's runs, one panel per task (both studies' reports draw them), and the gates
of gated runs over training."""

from __future__ import annotations

import json
from pathlib import Path

SEED_STYLES = ("-", "--", ":", "-.")
"""Line style per training seed; the colour says the arm."""


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def arm_styles(arms: list[str]) -> dict[str, dict]:
    """A colour and a marker per arm, no two arms alike: the ten tab10 colours, then the same colours with the next
    marker (a study draws 15+ arms in one panel, and a repeated colour made two arms read as one)."""
    from matplotlib import pyplot as plt

    palette = plt.get_cmap("tab10").colors
    return {arm: {"color": palette[i % len(palette)], "marker": MARKERS[i // len(palette) % len(MARKERS)]}
            for i, arm in enumerate(arms)}


def _arm_and_seed(label: str) -> tuple[str, int]:
    """``coupled/s1`` -> (``coupled``, 1); a label without a seed is seed 0."""
    arm, _, seed = label.rpartition("/s")
    return (arm, int(seed)) if arm and seed.isdigit() else (label, 0)


def plot_heldout(runs: dict[str, list[tuple[str, Path]]], path: Path, what: str) -> Path | None:
    """Plot, per task of ``runs`` ({task: [(label, metrics.jsonl path)]}), every run's held-out loss against the
    training step (``what`` names the held-out set in the titles), one colour and marker per arm, one line style per seed
    (labels ``arm/sN``); the panels' height is set by the losses after step 0. None when there is no run."""
    if not any(runs.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(task for task, found in runs.items() if found)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        styles = arm_styles(sorted({_arm_and_seed(label)[0] for label, _ in runs[task]}))
        later = []  # losses after the first evaluation, which sets the panel's height
        for label, metrics_path in runs[task]:
            metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()]
            held = [(m["step"], m["heldout_loss"]) for m in metrics if "heldout_loss" in m]
            if not held:
                continue
            arm, seed = _arm_and_seed(label)
            ax.plot(*zip(*held), label=label, markersize=3, linestyle=SEED_STYLES[seed % len(SEED_STYLES)],
                    **styles[arm])
            later += [loss for step, loss in held if step > 0]
        if later:  # the untrained step-0 losses (up to ~4) would flatten every difference that matters
            ax.set_ylim(bottom=min(0.0, min(later)), top=1.1 * max(later))
        ax.set_title(f"{task}: held-out loss ({what})")
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy per target token")
        if ax.get_lines():
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gate_table(runs: list[tuple[str, Path]], every: int = 50) -> list[str]:
    """How far each gated run's gate opened (``gate`` in its metrics: ``--latent-map gated``), every ``every`` steps
    and at its last step, beside the held-out loss there; [] where no run has a gate."""
    rows = []
    for label, metrics_path in runs:
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        gate = {m["step"]: m["gate"] for m in metrics if "gate" in m}
        if not gate:
            continue
        held = {m["step"]: m["heldout_loss"] for m in metrics if "heldout_loss" in m}
        steps = [s for s in sorted(gate) if s % every == 0 or s == max(gate)]
        rows.append(f"| {label} | " + ", ".join(f"{s}: {gate[s]:+.3f}" + (f" ({held[s]:.3f})" if s in held else "")
                                               for s in steps) + " |")
    if not rows:
        return []
    return ["How far the gated runs let the thought in (input = pause's embedding + gate x the realigned thought; "
            "gate 0 is the pause control): step: gate (held-out loss).", "", "| run | gate over training |",
            "|---|---|", *rows, ""]

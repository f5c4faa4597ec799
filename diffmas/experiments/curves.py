"""The held-out loss curves of a study's runs, one panel per task (both studies' reports draw them), the gates of
gated runs over training, and the tables of the controls evaluated after training (gate closed, thoughts
shuffled)."""

from __future__ import annotations

import json
from collections.abc import Callable
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


def control_table(control: str, runs: list[tuple[str, dict[str, bool], list[dict]]], n_boot: int = 10_000,
                  places: Callable[[str, list[dict]], dict[int, tuple[float, float, int]] | None] | None = None
                  ) -> list[str]:
    """Each run's test items as trained and under ``control`` (``gate-closed`` or ``shuffled-thought``; ``runs``:
    ``(label, trained, controlled)``, item id -> correct and the control's kept samples), with the paired
    difference; [] where no run was evaluated so. Under shuffled thoughts, also how often the answer is the
    answer of the item whose thoughts were fed (items whose answers differ), and where ``places(label, samples)``
    reads them (the digits), place by place: the thought's digit / the item's own (items that differ there)."""
    from diffmas.eval.compare import paired_bootstrap

    shuffled = control == "shuffled-thought"
    rows = []
    for label, trained, samples in runs:
        controlled = {s["id"]: s["correct"] for s in samples}
        ci = paired_bootstrap({0: controlled}, {0: trained}, n_boot=n_boot)
        n = len(set(trained) & set(controlled))
        row = (f"| {label} | {n} | {sum(trained.values()) / len(trained):.3f} | "
               f"{sum(controlled.values()) / len(controlled):.3f} | {100 * ci.diff:+.1f} [{100 * ci.low:+.1f}, "
               f"{100 * ci.high:+.1f}] |")
        if shuffled:
            differ = [s for s in samples if s["thought_gold"] != s["gold"]]
            other = sum(s["extracted"] == s["thought_gold"] for s in differ)
            row += f" {other / len(differ):.3f} ({len(differ)}) |" if differ else " – |"
            split = places(label, samples) if places else None
            row += (" " + ", ".join(f"{p}: {t:.2f} / {o:.2f}" for p, (t, o, _) in split.items()) + " |") if split \
                else " – |"
        rows.append(row)
    if not rows:
        return []
    if shuffled:
        return ["The same test items with each writer fed, at its latent steps, the thoughts it computed on another "
                "item of the set (its own prompt prefilled as trained; `diffmas eval --shuffle-thought`): how much of "
                "the answer comes from the thoughts' content, and how often the reader answers the other item's "
                "answer instead (items whose answers differ).", "",
                "| run | n | accuracy as trained | thoughts shuffled | shuffled - trained, points [95% CI] | "
                "the other item's answer (n) | by place: the thought's digit / the item's own |",
                "|---|---|---|---|---|---|---|", *rows, ""]
    return ["The same test items with the gate closed (set to 0 at evaluation: every position is fed pause's trained "
            "embedding alone, the adapters as trained): how much of the answer the reader takes from the thought.",
            "", "| run | n | accuracy as trained | gate closed | closed - trained, points [95% CI] |",
            "|---|---|---|---|---|", *rows, ""]


def controls_tables(docs: Path, controls: tuple[str, ...], runs: dict[str, list[dict]], n_boot: int = 10_000,
                    places: Callable[[str, list[dict]], dict[int, tuple[float, float, int]] | None] | None = None
                    ) -> list[str]:
    """:func:`control_table` for each of ``controls`` over the ``runs`` (run id -> its test samples as trained)
    evaluated under it (``docs/<control>/<run id>.jsonl``)."""
    text = []
    for control in controls:
        paths = {i: docs / control / f"{i}.jsonl" for i in runs}
        text += control_table(control, [(i, {s["id"]: s["correct"] for s in runs[i]},
                                         [json.loads(line) for line in path.read_text().splitlines()])
                                        for i, path in paths.items() if path.is_file()], n_boot, places)
    return text

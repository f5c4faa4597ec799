"""The logit lens over training: what a run's latent inputs said at each of its checkpoints, beside its held-out
loss at the same step.

One lens (:mod:`diffmas.eval.lens`) tells what the fed-back states say at the end; the question it raised on
relay:digits is *when*: whether the state becomes a token naming the first digit as the held-out loss stops falling
and stops naming it as the loss falls again. This reads every chosen checkpoint of a run (exported as an adapter
folder, :mod:`diffmas.train.export`) on the same fresh items and writes one JSON with a point per step, appended
as each step finishes, so a stopped run picks up at the next step; then a plot: per latent position, the share of
items where the state says and where it names the first character (beside the constant's floor), and the held-out
loss. Usage::

    diffmas lens-curve RUN_DIR --task relay:digits --n 150 --every 2 --out docs/.../RUN.json
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from diffmas.errors import DiffMASError
from diffmas.eval.lens import PositionLens, lens_channel
from diffmas.tasks import Task
from diffmas.train.checkpoint import checkpoints
from diffmas.train.export import export_checkpoint

__all__ = ["chosen_steps", "heldout_losses", "lens_curve", "naming_steps", "plot_lens_curve"]


def heldout_losses(run: Path) -> dict[int, float]:
    """Step -> held-out loss, from the run's ``metrics.jsonl`` (empty where none was recorded)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["step"]: row["heldout_loss"] for row in rows if "heldout_loss" in row}


def chosen_steps(run: Path, every: int = 1, steps: list[int] | None = None) -> list[int]:
    """The checkpoint steps to read: ``steps`` (each must exist), else every ``every``-th checkpoint and the last."""
    have = [int(p.name.removeprefix("step-")) for p in checkpoints(run)]
    if not have:
        raise DiffMASError(f"{run} has no checkpoints to read (train with checkpoint_every set)")
    if steps:
        missing = sorted(set(steps) - set(have))
        if missing:
            raise DiffMASError(f"{run} has no checkpoint at step(s) {missing}; it has {have}")
        return sorted(set(steps))
    if every < 1:
        raise DiffMASError(f"--every must be at least 1, got {every}")
    return sorted(set(have[every - 1::every]) | {have[-1]})


def lens_curve(run: str | Path, task: Task, out: Path, steps: list[int], n: int = 150, seed: int = 0,
               batch_size: int = 25, device: str = "cpu", show_progress: bool = True) -> dict:
    """Read the lens of ``run`` at each of ``steps`` into ``out`` (JSON), one point per step appended as it finishes;
    steps already in ``out`` (same items: n and seed) are kept, not read again. Returns the file's content."""
    from diffmas.backbone import load_backbone
    from diffmas.config import load_config
    from diffmas.systems import build_system

    run = Path(run)
    settings = {"run": str(run), "task": task.name, "n": n, "seed": seed}
    done = json.loads(out.read_text()) if out.exists() else {"settings": settings, "points": []}
    given = done["settings"]
    if Path(given.get("run", "")).resolve() != run.resolve() or any(given.get(k) != settings[k] for k in
                                                                      ("task", "n", "seed")):
        raise DiffMASError(f"{out} holds a lens curve of other settings ({done['settings']}); "
                           f"write elsewhere or remove it")
    held = heldout_losses(run)
    trained = load_config(run / "config.yaml").model
    read = {p["step"] for p in done["points"]}
    for step in steps:
        if step in read:
            continue
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="diffmas-lens-") as folder:
            adapter = export_checkpoint(run, Path(folder) / "adapter", step)
            system = build_system("diffmas", load_backbone(trained.name, device, trained.dtype), adapter=str(adapter),
                                  default_topology=getattr(task, "topology", None))
            lenses, answers = lens_channel(system, task, n=n, seed=seed, batch_size=batch_size,
                                           show_progress=show_progress)
        done.setdefault("answers", answers)
        done["points"].append({"step": step, "heldout_loss": held.get(step), "seconds": round(time.time() - started),
                               "positions": [asdict(x) for x in lenses]})
        done["points"].sort(key=lambda p: p["step"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(done) + "\n")
        tmp.replace(out)  # a kill mid-write leaves the last whole file
    return done


def naming_steps(curve: dict, place: str = "1", at_least: float = 0.5) -> dict[tuple[str, int], list[int]]:
    """Per latent position (writer, position), the steps of ``curve`` at which its input names the answer's
    character at ``place``: the share of scored items whose top-1 token stands for it (``read``) is at least
    ``at_least``. Every position read at some step is a key, with no steps where it never names it."""
    named: dict[tuple[str, int], list[int]] = {}
    for point in sorted(curve["points"], key=lambda p: p["step"]):
        for position in point["positions"]:
            steps = named.setdefault((position["writer"], position["position"]), [])
            if position["read"].get(place, 0.0) >= at_least:
                steps.append(point["step"])
    return named


def plot_lens_curve(curve: dict, path: Path, places: tuple[str, ...] = ("1",), title: str | None = None) -> Path:
    """Per latent position and answer place in ``places``, the share of items whose fed state says / names (read)
    the answer's character there against the training step, each place's floor dashed; the held-out loss on the
    right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["points"]
    positions = sorted({(x["writer"], x["position"]) for p in points for x in p["positions"]})
    fig, ax = plt.subplots(figsize=(7, 5))
    # One colour per position, one marker (and a lighter shade) per character: says solid, names (read) dotted.
    colours, markers = plt.get_cmap("tab10").colors, "o^sv"
    for i, key in enumerate(positions):
        rows = [(p["step"], PositionLens(**x)) for p in points for x in p["positions"]
                if (x["writer"], x["position"]) == key]
        steps = [s for s, _ in rows]
        for j, place in enumerate(places):
            style = dict(color=colours[i % 10], marker=markers[j % 4], markersize=3, alpha=1.0 - 0.4 * min(j, 1))
            label = f"position {key[1]}, character {place}"
            ax.plot(steps, [x.places.get(place, 0.0) for _, x in rows], "-", label=f"{label}: says", **style)
            ax.plot(steps, [x.read.get(place, 0.0) for _, x in rows], ":", label=f"{label}: names (read)", **style)
    for j, place in enumerate(places):
        floor = [(p["step"], max((x["read_constant"].get(place, 0.0) for x in p["positions"]), default=0.0))
                 for p in points]
        ax.plot(*zip(*floor), "--", color="grey", alpha=1.0 - 0.3 * j, label=f"character {place}: one fixed token")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of items")
    handles, labels = ax.get_legend_handles_labels()
    held = [(p["step"], p["heldout_loss"]) for p in points if p.get("heldout_loss") is not None]
    if held:
        right = ax.twinx()
        handles += right.plot(*zip(*held), "-", color="black", linewidth=2, alpha=0.5)
        labels.append("held-out loss (right axis)")
        right.set_ylabel("held-out loss")
        right.set_ylim(bottom=0)
    # Below the axes: inside, the legend hid the readings where they peak.
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7)
    ax.set_title(title or f"logit lens over training: {Path(curve['settings']['run']).name}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

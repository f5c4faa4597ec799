"""A training run's folder across interruptions: what a resume may change, the metrics it keeps, the stopping rule
read from them, and a run that starts from another run's checkpoint.

A checkpoint fixes everything a step computes. What a resume may change is the budget: how many steps there are at
most, how the global batch is split over processes (checked against the checkpoint's data position), and the
held-out stopping rule, which only decides when to stop. So a run that stopped early on a plateau can go on under a
looser rule, in its own folder (``--resume``) or in a new one (:func:`continue_run`), and computes what one run
trained under that rule from step 0 would have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffmas.config import StopConfig, TrainConfig, load_config, to_dict
from diffmas.errors import DiffMASError
from diffmas.train.checkpoint import latest_checkpoint, read_state

METRICS_FILE = "metrics.jsonl"
BUDGET = ("steps", "batch_size", "grad_accum", "stop")
"""Settings a resume may change (see the module docstring)."""
INHERITED = "inherited_from"
"""The key that marks a metrics line copied from the run a continuation started from (its time is that run's)."""


def resume_differences(ckpt: Path, cfg: TrainConfig) -> list[str]:
    """The settings, other than the budget's, in which ``cfg`` differs from checkpoint ``ckpt``'s."""
    saved = ckpt / "config.yaml"
    if not saved.is_file():
        return []
    old, new = to_dict(load_config(saved)), to_dict(cfg)
    for key in BUDGET:
        old.pop(key), new.pop(key)
    return sorted(k for k in new if old.get(k) != new.get(k))


def prepare_out(out: Path, resume: bool, cfg: TrainConfig) -> Path | None:
    """The checkpoint a run in ``out`` resumes from (None: a fresh run); refuses a resume with other settings and
    a fresh run over an existing one."""
    ckpt = latest_checkpoint(out)
    if resume:
        if ckpt is None:
            raise DiffMASError(f"--resume: no complete checkpoint under {out}/checkpoints")
        diff = resume_differences(ckpt, cfg)
        if diff:
            raise DiffMASError(f"--resume: config differs from checkpoint {ckpt.name} in {diff}")
        return ckpt
    if ckpt is not None or (out / METRICS_FILE).exists():
        raise DiffMASError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    return None


def continue_run(parent: Path, cfg: TrainConfig, out: Path) -> Path:
    """Start run ``out`` (which holds no checkpoint) from run ``parent``'s latest checkpoint, for ``cfg``, which may
    differ from the parent's settings only in the budget: the checkpoint is copied, and the parent's metrics up to
    its step, each line marked with :data:`INHERITED`. Resuming ``out`` then computes what training ``cfg`` from
    step 0 would have. Returns the copied checkpoint."""
    ckpt = latest_checkpoint(parent)
    if ckpt is None:
        raise DiffMASError(f"cannot continue {parent}: it holds no complete checkpoint")
    diff = resume_differences(ckpt, cfg)
    if diff:
        raise DiffMASError(f"cannot continue {parent} ({ckpt.name}): its settings differ in {diff}")
    if latest_checkpoint(out) is not None:
        raise DiffMASError(f"{out} already holds checkpoints: resume it instead")
    step = read_state(ckpt)["step"]
    lines = []
    if (parent / METRICS_FILE).is_file():
        for line in (parent / METRICS_FILE).read_text().splitlines():
            record = json.loads(line) if line.strip() else None
            if record and record["step"] <= step:
                record.pop("stopped_early", None)  # the decision of the parent's rule, not this run's
                lines.append(json.dumps({**record, INHERITED: parent.name}) + "\n")
    if out.exists():  # killed before its first checkpoint: nothing of its own to keep
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True)
    copied = out / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, copied.with_name(copied.name + ".tmp"))
    (out / METRICS_FILE).write_text("".join(lines))
    copied.with_name(copied.name + ".tmp").rename(copied)  # complete only once everything is in place
    return copied


def heldout_history(path: Path) -> list[tuple[int, float]]:
    """``(step, held-out loss)`` pairs logged so far (after a resume's truncation), in step order."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r]


def flattened(history: list[tuple[int, float]], stop: StopConfig) -> bool:
    """Whether training should stop: ``stop`` is enabled, at least ``stop.min_steps`` were taken, and the best
    held-out loss of the last ``stop.window`` share of the steps is less than ``stop.tolerance`` (relative) below
    the loss at the window's start (the last one logged at or before it)."""
    if not stop.enabled or not history or history[-1][0] < stop.min_steps:
        return False
    since = history[-1][0] * (1 - stop.window)
    before = [loss for step, loss in history if step <= since]
    recent = [loss for step, loss in history if step > since]
    return bool(before) and before[-1] - min(recent) < stop.tolerance * before[-1]


def truncate_metrics(path: Path, last_step: int, going_on: bool) -> None:
    """Keep the metrics of steps up to ``last_step`` (a run killed after logging step k+1 but before checkpointing
    it would otherwise log that step twice); a run ``going_on`` past a step its old rule stopped at loses that
    mark."""
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else None
            if record and record.get("step", 0) <= last_step:
                if going_on:
                    record.pop("stopped_early", None)
                kept.append(json.dumps(record) + "\n")
        path.write_text("".join(kept))

"""What every experiment driver shares: the machine's description and training a run once (reused when finished
with the same config, resumed when interrupted). Their precision is the library's ``mixed_precision: auto``."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import torch

from diffmas.adapters import META_FILE
from diffmas.config import TrainConfig, load_config, to_dict
from diffmas.errors import DiffMASError
from diffmas.train.checkpoint import latest_checkpoint

__all__ = ["finished_with", "machine_description", "train_once"]


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def finished_with(run: Path, cfg: TrainConfig) -> bool:
    """Whether ``run`` holds finished adapters trained with exactly ``cfg``."""
    return (run / META_FILE).is_file() and (run / "config.yaml").is_file() and \
        to_dict(load_config(run / "config.yaml")) == to_dict(cfg)


def train_once(cfg: TrainConfig, out: Path, reuse: tuple[Path, ...] = (), continue_from: Path | None = None) -> Path:
    """Train into ``out`` unless it already holds finished adapters of exactly ``cfg`` (other finished adapters
    are an error, never silently reused); resume a run that was interrupted.

    A finished run in ``reuse`` with exactly the same config is used instead of training again. A new run starts
    from ``continue_from``'s latest checkpoint where that run has one and differs from ``cfg`` only in its budget
    (:func:`diffmas.train.resume.continue_run`: the same computation, without repeating its steps).
    """
    from diffmas.train.loop import train
    from diffmas.train.resume import continue_run

    if (out / META_FILE).is_file():
        if not finished_with(out, cfg):
            raise DiffMASError(f"{out} holds adapters trained with a different config than asked for; "
                               "delete that folder or choose another output folder")
        print(f"[train] {out} already trained with this config; reusing it (delete the folder to retrain)")
        return out
    for candidate in reuse:
        if finished_with(candidate, cfg):
            print(f"[train] reusing {candidate}: same config as {out}")
            return candidate
    resume = latest_checkpoint(out) is not None
    if not resume and continue_from is not None and latest_checkpoint(continue_from) is not None:
        print(f"[train] {out} starts from {continue_from}'s {continue_run(continue_from, cfg, out).name}")
        resume = True
    if not resume and out.exists():  # killed before its first checkpoint: nothing to resume, start over
        print(f"[train] {out} holds no checkpoint; training it from the start")
        shutil.rmtree(out)
    train(cfg, out, resume=resume)
    return out

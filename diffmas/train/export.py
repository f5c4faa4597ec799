"""A training checkpoint as an adapter folder, so that a run can be evaluated as it stood at an earlier step.

    diffmas export-checkpoint runs/x --step 300 --out runs/x-step300
    diffmas eval --systems diffmas:runs/x-step300 ...

The folder is what training writes at its end (peft adapters, the role map, the latent map, the settings), with the
checkpoint's tensors: evaluating the export of the last step is evaluating the run.
"""

from __future__ import annotations

from pathlib import Path

from diffmas.backbone import load_backbone, resolve_device, resolve_precision
from diffmas.config import load_config
from diffmas.errors import DiffMASError
from diffmas.train.checkpoint import checkpoint_dir, checkpoints, read_state, restore_trained
from diffmas.train.loop import attach_trainable, save_trained

__all__ = ["export_checkpoint"]


def _checkpoint(run: Path, step: int | None) -> Path:
    done = checkpoints(run)
    if not done:
        raise DiffMASError(f"{run} has no checkpoints (train with checkpoint_every set)")
    if step is None:
        return done[-1]
    path = checkpoint_dir(run, step)
    if path not in done:
        steps = ", ".join(str(int(p.name.removeprefix("step-"))) for p in done)
        raise DiffMASError(f"{run} has no checkpoint at step {step}; it has steps {steps}")
    return path


def export_checkpoint(run: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write the adapters of ``run``'s checkpoint at ``step`` (default: its last) to ``out``; returns ``out``."""
    run, out = Path(run), Path(out)
    path = _checkpoint(run, step)
    state = read_state(path)
    cfg = load_config(path / "config.yaml")
    if out.resolve() == run.resolve():
        raise DiffMASError(f"export into a folder of its own, not the run's ({run})")
    backbone = load_backbone(cfg.model.name, "cpu", cfg.model.dtype)
    spec = attach_trainable(backbone, cfg)
    restore_trained(path, backbone)
    out.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(cfg.mixed_precision, resolve_device(cfg.model.device))
    save_trained(backbone, spec, cfg, out, state["step"], precision)
    return out

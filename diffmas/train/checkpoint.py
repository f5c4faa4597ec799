"""Training checkpoints: written atomically, verified on load, never overwritten by a failed run.

A checkpoint folder ``checkpoints/step-000050`` holds the LoRA tensors (and a trainable latent map's) (exact values, for resuming), the
optimizer and scheduler states, the step and data position, every process's RNG states, and the resolved
config. It is assembled in a temporary folder and renamed into place, so a run killed mid-write leaves the
previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffmas.adapters import trainable_parameters
from diffmas.backbone import Backbone
from diffmas.config import save_config
from diffmas.errors import DiffMASError

STATE_FILE = "state.json"
LORA_FILE = "lora.safetensors"


MAP_PREFIX = "latent_map."


def _trainable(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Every trained tensor by name: the LoRA weights and, when there is one, the trainable latent map's."""
    names = {id(p): n for n, p in backbone.model.named_parameters()}
    params = {names[id(p)]: p for p in trainable_parameters(backbone)}
    latent_map = backbone.cache.get("latent_map")
    if latent_map is not None:
        params.update({MAP_PREFIX + n: p for n, p in latent_map.named_parameters()})
    return params


def _lora_tensors(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in _trainable(backbone).items()}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(out: Path, step: int, data_position: int, backbone: Backbone, optimizer, scheduler, config,
                    accelerator) -> Path:
    """Write checkpoint ``step`` (all processes call this; rank 0 writes the shared parts)."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(_lora_tensors(backbone), str(tmp / LORA_FILE))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_config(config, tmp / "config.yaml")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "data_position": data_position,
                                                  "num_processes": accelerator.num_processes}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The highest-step complete checkpoint (temporary folders of interrupted writes are ignored)."""
    root = out / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, backbone: Backbone, optimizer, scheduler, process_index: int) -> dict:
    """Restore a checkpoint in place; returns its state (step, data_position). Nothing is written."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(str(path / LORA_FILE))
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        sched_state = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False)
        rng_file = path / f"rng-{process_index}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    except Exception as exc:  # any unreadable part means the checkpoint cannot be trusted
        raise DiffMASError(f"checkpoint {path} is corrupt or incomplete: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    current = _lora_tensors(backbone)
    if set(tensors) != set(current) or any(tensors[k].shape != current[k].shape for k in current):
        raise DiffMASError(f"checkpoint {path} does not match this model/LoRA configuration "
                           f"({len(tensors)} saved tensors vs {len(current)} expected)")
    params = _trainable(backbone)
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))
    try:
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise DiffMASError(f"checkpoint {path} optimizer state does not match: {exc}") from exc
    if rng is not None:
        set_rng_state(rng)
    return state

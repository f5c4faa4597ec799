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
import sys
import warnings
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


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2 keeps parameters (and their optimizer states) as DTensor shards, gathered here
    (a collective: every process must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _to_param_layout(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out like ``param``: sharded the same way when ``param`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return value


def _lora_tensors(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Full copies on CPU of every trained tensor (all processes must call this: shards are gathered)."""
    return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in _trainable(backbone).items()}


def full_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The model's LoRA tensors by their full name, gathered (for saving adapters; all processes call it)."""
    return {n: full_tensor(p.detach()).cpu() for n, p in backbone.model.named_parameters() if "lora_" in n}


def _optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with sharded states gathered (all processes call it)."""
    sd = optimizer.state_dict()
    sd["state"] = {k: {n: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for n, v in st.items()}
                   for k, st in sd["state"].items()}
    return sd


def _shard_optimizer_state(optimizer, sd: dict) -> dict:
    """Inverse of :func:`_optimizer_state` for this process: full states become shards of sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for k, st in sd["state"].items():
        p = params[int(k)] if int(k) < len(params) else None
        state[k] = {n: _to_param_layout(v, p) if p is not None and isinstance(v, torch.Tensor) else v
                    for n, v in st.items()}
    return {**sd, "state": state}


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
    tensors, opt_state = _lora_tensors(backbone), _optimizer_state(optimizer)  # every process: gathers shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(tensors, str(tmp / LORA_FILE))
        torch.save(opt_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_config(config, tmp / "config.yaml")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "data_position": data_position,
                                                  "num_processes": accelerator.num_processes,
                                                  "mixed_precision": accelerator.mixed_precision}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run, by step (temporary folders of interrupted writes are ignored)."""
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if root.is_dir() else []


def latest_checkpoint(out: Path) -> Path | None:
    """The highest-step complete checkpoint."""
    done = checkpoints(out)
    return done[-1] if done else None


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json``: step, data_position (examples consumed) and num_processes."""
    try:
        return json.loads((path / STATE_FILE).read_text())
    except Exception as exc:
        raise DiffMASError(f"checkpoint {path} is corrupt or incomplete: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def check_resume(path: Path, global_batch: int, num_processes: int, mixed_precision: str | None = None) -> dict:
    """The checkpoint's state, after checking that this run continues its data order exactly and computes as the
    checkpoint's run did.

    The data order depends only on the global batch (every process builds the same global batch and takes
    its share of it), so a different process count is fine when the global batch is the same; a different
    global batch would silently skip or repeat examples and is an error. So is another precision than the one
    the checkpoint trained under (``mixed_precision``: this run's, resolved): ``auto`` resolves per machine, and a
    run resumed on another machine would change precision mid-run under the same config. (Checkpoints written
    before the precision was recorded are not checked.)
    """
    state = read_state(path)
    step, position = state.get("step"), state.get("data_position")
    if not isinstance(step, int) or not isinstance(position, int) or step < 1:
        raise DiffMASError(f"checkpoint {path} is corrupt or incomplete: state.json lacks step/data_position")
    if position != step * global_batch:
        saved = position // step
        raise DiffMASError(
            f"--resume: checkpoint {path.name} was trained with a global batch of {saved} examples per step "
            f"({state.get('num_processes', '?')} process(es)); this run's is {global_batch} ({num_processes} "
            f"process(es) x batch_size x grad_accum): keep the global batch (batch_size x grad_accum x processes) "
            f"or start a new run")
    saved = state.get("mixed_precision")
    if mixed_precision is not None and saved is not None and saved != mixed_precision:
        raise DiffMASError(
            f"--resume: checkpoint {path.name} was trained under mixed precision '{saved}', this run would compute "
            f"under '{mixed_precision}' (mixed_precision 'auto' resolves per machine): set mixed_precision: "
            f"{saved} to continue it as it was trained, or start a new run")
    return state


def restore_trained(path: Path, backbone: Backbone, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Copy checkpoint ``path``'s trained tensors (or ``tensors``, already read from it) into ``backbone``'s LoRA
    weights and latent map, after checking that they are the ones this configuration trains."""
    if tensors is None:
        try:
            tensors = load_file(str(path / LORA_FILE))
        except Exception as exc:
            raise DiffMASError(f"checkpoint {path} is corrupt or incomplete: {type(exc).__name__}") from exc
    current = {n: p.shape for n, p in _trainable(backbone).items()}  # a DTensor's shape is the full one
    if set(tensors) != set(current) or any(tensors[k].shape != current[k] for k in current):
        raise DiffMASError(f"checkpoint {path} does not match this model/LoRA configuration "
                           f"({len(tensors)} saved tensors vs {len(current)} expected)")
    params = _trainable(backbone)
    with torch.no_grad():
        for name, value in tensors.items():
            param = params[name]
            param.copy_(_to_param_layout(value.to(param.dtype), param).to(param.device))


def load_checkpoint(path: Path, backbone: Backbone, optimizer, scheduler, process_index: int,
                    num_processes: int | None = None, seed: int = 0) -> dict:
    """Restore a checkpoint in place; returns its state (step, data_position). Nothing is written.

    Each process restores its own RNG state (dropout). A missing RNG file is an error, except when the
    checkpoint was written by a different number of processes: then every process is re-seeded from
    (seed, step, rank) with a loud warning, since dropout masks cannot continue the old streams.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(str(path / LORA_FILE))
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        sched_state = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False)
        saved_world = state.get("num_processes")
        same_world = num_processes is None or saved_world == num_processes
        rng_file = path / f"rng-{process_index}.pt"
        if same_world and not rng_file.is_file():
            raise FileNotFoundError(f"no {rng_file.name} (the RNG state of process {process_index})")
        rng = torch.load(rng_file, map_location="cpu", weights_only=False) if same_world else None
    except Exception as exc:  # any unreadable part means the checkpoint cannot be trusted
        raise DiffMASError(f"checkpoint {path} is corrupt or incomplete: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    restore_trained(path, backbone, tensors)
    try:
        optimizer.load_state_dict(_shard_optimizer_state(optimizer, opt_state))
        scheduler.load_state_dict(sched_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise DiffMASError(f"checkpoint {path} optimizer state does not match: {exc}") from exc
    if rng is not None:
        set_rng_state(rng)
    else:
        if process_index == 0:
            msg = (f"WARNING: checkpoint {path.name} was written by {saved_world} process(es), this run has "
                   f"{num_processes}: same data order (same global batch), but the RNG streams are re-seeded, so "
                   "with lora.dropout > 0 the continuation differs from an uninterrupted run")
            warnings.warn(msg, stacklevel=2)
            print(msg, file=sys.stderr, flush=True)
        set_seed_all(seed * 1_000_003 + int(state["step"]) * 1_009 + process_index)
    return state


def set_seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

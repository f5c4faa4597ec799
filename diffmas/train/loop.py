"""The training recipe, top to bottom: setup, train, save. Runs as-is under ``accelerate launch`` (DDP).

    diffmas train --config configs/train/demo.yaml --out runs/demo/diffmas

The loss of a step is the mean cross-entropy over every target token of the global batch (all micro-batches
of all processes). Each process scales its summed loss by the global token count, known up front because
every process builds the same global batch, so 1 process and N processes follow the same loss curve.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from diffmas.adapters import attach_lora, save_adapters, trainable_parameters
from diffmas.backbone import Backbone, load_backbone
from diffmas.config import TrainConfig, save_config, to_dict
from diffmas.errors import DiffMASError
from diffmas.latent import build_latent_map, get_realigner, save_latent_map
from diffmas.prompts import SINGLE, TOPOLOGIES, load_topology
from diffmas.rollout import RolloutSpec, rollout
from diffmas.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffmas.train.data import TrainExample, build_datasets
from diffmas.train.link import pretrain_link
from diffmas.train.objectives import StepPlan, heldout_targets, plan_step, plan_tokens, starts_new_stage, step_loss

METRICS_FILE = "metrics.jsonl"


class TrajectoryLoss(torch.nn.Module):
    """The rollout as a module, so DDP wraps one forward whose graph covers the whole trajectory."""

    def __init__(self, backbone: Backbone, spec: RolloutSpec, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = backbone.model  # registers the parameters for DDP
        if isinstance(spec.latent_map, torch.nn.Module):
            self.latent_map = spec.latent_map
        self.backbone, self.spec, self.cfg = backbone, spec, cfg

    def forward(self, plan: StepPlan, n_tokens: int, n_rows: int) -> tuple[torch.Tensor, ...]:
        """This share's contribution to the global step loss, its summed CE and distillation distance."""
        return step_loss(self.backbone, self.spec, self.cfg, plan, n_tokens, n_rows,
                         checkpoint=self.cfg.activation_checkpointing)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    warmup = max(1, int(round(cfg.warmup_ratio * cfg.steps))) if cfg.warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def attach_trainable(backbone: Backbone, cfg: TrainConfig) -> RolloutSpec:
    """Attach fresh LoRA adapter(s) (and a trainable latent map) for the system; returns the spec that uses them."""
    topology = load_topology(cfg.topology) if cfg.system == "diffmas" else SINGLE
    roles = attach_lora(backbone, cfg.lora, [a.role for a in topology.agents])
    latent_map = build_latent_map(backbone, cfg.latent_map, cfg.realign) if cfg.latent_map != "ridge" else None
    if latent_map is not None:
        backbone.cache["latent_map"] = latent_map
    writer_steps = cfg.latent_steps if cfg.system == "diffmas" else 0
    final_steps = cfg.latent_steps if cfg.system == "single_latent" else 0
    return RolloutSpec(topology, "latent", writer_steps, realign=cfg.realign, adapters=roles,
                       final_latent_steps=final_steps, latent_map=latent_map)


def heldout_loss(backbone: Backbone, spec: RolloutSpec, examples: list[TrainExample], batch_size: int,
                 cfg: TrainConfig) -> float:
    """Token-mean teacher-forced loss on held-out examples in the inference configuration (dropout off, no grad)."""
    was_training = backbone.model.training
    backbone.model.eval()
    if isinstance(spec.latent_map, torch.nn.Module):
        spec.latent_map.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo: lo + batch_size]
            r = rollout(backbone, spec, [e.prompt for e in chunk], targets=heldout_targets(cfg, chunk),
                        grad_mode="detached")
            total += float(r.loss) * r.target_tokens
            tokens += r.target_tokens
    backbone.model.train(was_training)
    if isinstance(spec.latent_map, torch.nn.Module):
        spec.latent_map.train(was_training)
    return total / max(1, tokens)


def _prepare_out(out: Path, resume: bool, cfg: TrainConfig) -> Path | None:
    ckpt = latest_checkpoint(out)
    if resume:
        if ckpt is None:
            raise DiffMASError(f"--resume: no complete checkpoint under {out}/checkpoints")
        saved = (ckpt / "config.yaml")
        from diffmas.config import load_config

        old = to_dict(load_config(saved)) if saved.is_file() else None
        new = to_dict(cfg)
        if old is not None:
            old.pop("steps"), new.pop("steps")
            if old != new:
                diff = sorted(k for k in new if old.get(k) != new.get(k))
                raise DiffMASError(f"--resume: config differs from checkpoint {ckpt.name} in {diff}")
        return ckpt
    if ckpt is not None or (out / METRICS_FILE).exists():
        raise DiffMASError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    return None


def _truncate_metrics(path: Path, last_step: int) -> None:
    # A run killed after logging step k+1 but before checkpointing it would otherwise log that step twice.
    if path.is_file():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= last_step]
        path.write_text("".join(l + "\n" for l in lines))


def _trackers() -> list[str]:
    """Experiment trackers, used only when installed (wandb also needs credentials or an explicit mode)."""
    found = [name for name in ("tensorboard",) if importlib.util.find_spec(name)]
    if importlib.util.find_spec("wandb") and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
        found.append("wandb")
    return found


def train(cfg: TrainConfig, out: str | Path, resume: bool = False) -> dict:
    """Train ``cfg.system``'s LoRA adapter(s); writes adapters, checkpoints, metrics and config under ``out``."""
    out = Path(out)
    # One process may train several runs (the demo, the study): the accelerator's settings (mixed precision)
    # are per run, so forget the last run's; the distributed state (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.model.device == "cpu",
        # Detached mode and per-agent adapters leave some adapters without gradient in a step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=_trackers() or None,
        project_dir=str(out),
    )
    ckpt = _prepare_out(out, resume, cfg)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.batch_size * world  # examples per micro-batch over all processes
    global_batch = micro * cfg.grad_accum

    # Data first: a method that the data cannot support fails before the model is even loaded.
    train_set, heldout = build_datasets(cfg, cfg.steps * global_batch)
    backbone = load_backbone(cfg.model.name, str(accelerator.device), cfg.model.dtype)
    spec = attach_trainable(backbone, cfg)
    backbone.model.train()
    params = trainable_parameters(backbone)
    if isinstance(spec.latent_map, torch.nn.Module):
        params += list(spec.latent_map.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Not passed to accelerate: its scheduler wrapper steps once per process, which would change the schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    module = accelerator.prepare(TrajectoryLoss(backbone, spec, cfg))

    start_step = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, backbone, optimizer, scheduler, rank)
        start_step = state["step"]
        if accelerator.is_main_process:
            _truncate_metrics(out / METRICS_FILE, start_step)
    elif cfg.latent_map == "link" and cfg.link.pretrain_steps:
        # Fresh LoRA adapters start as the identity, so this is the frozen base model, as intended.
        texts = [f"{ex.prompt}\n{ex.target}" for ex in train_set[: max(64, cfg.link.pretrain_steps * 8)]]
        losses = pretrain_link(backbone, spec.latent_map, texts, cfg.link.pretrain_steps, cfg.link.pretrain_lr,
                               cfg.batch_size, cfg.seed, show_progress=accelerator.is_main_process)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "link_pretrain.json").write_text(json.dumps({"loss": losses}))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    if accelerator.log_with:
        accelerator.init_trackers("diffmas", config={k: str(v) for k, v in to_dict(cfg).items()})

    def log(record: dict) -> None:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if accelerator.is_main_process:
            with open(out / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    if start_step == 0:
        log({"step": 0, "heldout_loss": heldout_loss(backbone, spec, heldout, cfg.batch_size, cfg)})
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=f"train {cfg.system}",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    last_good = ckpt
    for step in bar:
        started = time.perf_counter()
        if starts_new_stage(step, cfg) and cfg.curriculum.reset_optimizer:
            optimizer.state.clear()  # fresh AdamW moments for the new stage, as Coconut does
        plan = plan_step(cfg, step, train_set[step * global_batch: (step + 1) * global_batch])
        n_tokens, n_rows = plan_tokens(backbone, spec, plan), len(plan.prompts)
        local = torch.zeros(3, device=accelerator.device)
        for m in range(cfg.grad_accum):
            mine = plan.rows(slice(m * micro, (m + 1) * micro)).rows(slice(rank, None, world))
            sync = accelerator.no_sync(module) if m < cfg.grad_accum - 1 else nullcontext()
            with sync:
                loss_part, ce_sum, distill_sum = module(mine, n_tokens, n_rows)
                # DDP averages gradients over processes: scale so the result is the global objective.
                accelerator.backward(loss_part * world)
            local += torch.stack([loss_part.detach(), ce_sum, distill_sum])
        totals = accelerator.reduce(local, "sum")
        loss = float(totals[0])
        if not math.isfinite(loss):
            raise DiffMASError(f"non-finite loss ({loss}) at step {step + 1}; stopped before the update. "
                               f"Last good checkpoint: {last_good or 'none'}")
        grad_norm = float(accelerator.clip_grad_norm_(params, cfg.clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        record = {"step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "target_tokens": n_tokens, "tokens_per_s": n_tokens / seconds, "seconds": seconds}
        if cfg.method != "answer":
            record["ce"] = float(totals[1]) / n_tokens
        if cfg.method == "distill":
            record["distill"] = float(totals[2]) / n_rows
        if plan.stage is not None:
            record["stage"] = plan.stage
        done = step + 1 == cfg.steps
        if done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            record["heldout_loss"] = heldout_loss(backbone, spec, heldout, cfg.batch_size, cfg)
        log(record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}",
                        target_tok_s=f"{record['tokens_per_s']:.0f}")
        if done or (step + 1) % cfg.checkpoint_every == 0:
            last_good = save_checkpoint(out, step + 1, (step + 1) * global_batch, backbone, optimizer, scheduler,
                                        cfg, accelerator)

    if accelerator.is_main_process:
        builtin = TOPOLOGIES.get(spec.topology.name) == spec.topology
        topology = spec.topology.name if builtin else spec.topology.to_dict()
        save_adapters(backbone, out, spec.adapters, cfg.lora,
                      extra={"system": cfg.system, "topology": topology, "latent_steps": cfg.latent_steps,
                             "grad_mode": cfg.grad_mode, "task": cfg.data.task, "steps": cfg.steps,
                             "method": cfg.method, "realign": cfg.realign, "seed": cfg.seed,
                             "latent_map": save_latent_map(spec.latent_map or get_realigner(backbone, cfg.realign), out),
                             "curriculum": to_dict(cfg.curriculum) if cfg.method == "curriculum" else None,
                             "distill": to_dict(cfg.distill) if cfg.method == "distill" else None})
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it also tears down the process group
        tracker.finish()
    metrics = [json.loads(l) for l in (out / METRICS_FILE).read_text().splitlines()] if (out / METRICS_FILE).exists() else []
    held = [m["heldout_loss"] for m in metrics if "heldout_loss" in m]
    return {"out": str(out), "steps": cfg.steps, "heldout_loss_start": held[0] if held else None,
            "heldout_loss_end": held[-1] if held else None, "world_size": world,
            "is_main_process": accelerator.is_main_process}

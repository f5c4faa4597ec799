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
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from diffmas.adapters import attach_lora, save_adapters, trainable_parameters
from diffmas.backbone import Backbone, load_backbone, precision_name, resolve_device, resolve_precision
from diffmas.config import ChannelConfig, TrainConfig, save_config, to_dict
from diffmas.errors import DiffMASError
from diffmas.memory import configure_allocator, step_done
from diffmas.latent import (GatedThought, Realigner, build_latent_map, get_realigner, install_realigner,
                            realignment_path, save_latent_map)
from diffmas.prompts import SINGLE, TOPOLOGIES, Topology, load_topology, question_text
from diffmas.rollout import RolloutSpec, rollout
from diffmas.train.checkpoint import check_resume, full_state_dict, full_tensor, load_checkpoint, save_checkpoint
from diffmas.train.data import TrainExample, build_datasets
from diffmas.train.interrupt import StopRequests, TrainingStopped
from diffmas.tasks import get_task
from diffmas.train.link import pretrain_link
from diffmas.train.objectives import (StepNorm, StepPlan, heldout_targets, plan_norm, plan_step, starts_new_stage,
                                      step_loss)
from diffmas.train.resume import METRICS_FILE, flattened, heldout_history, prepare_out, truncate_metrics


class TrajectoryLoss(torch.nn.Module):
    """The rollout as a module, so DDP wraps one forward whose graph covers the whole trajectory."""

    def __init__(self, backbone: Backbone, spec: RolloutSpec, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = backbone.model  # registers the parameters for DDP
        if isinstance(spec.latent_map, torch.nn.Module):
            self.latent_map = spec.latent_map
        self.backbone, self.spec, self.cfg = backbone, spec, cfg
        # No `_no_split_modules` on purpose: FSDP2 must shard this module as one unit. Per-layer units reshard a
        # layer after each of its calls, but a layer's K/V of one call receive gradients from later calls through
        # the trace, after it was resharded (a backward on freed storage).

    def forward(self, plan: StepPlan, norm: StepNorm | None = None, heldout: bool = False) -> tuple[torch.Tensor, ...]:
        """This share's contribution to the global step loss and its sums [CE, distillation distance, teacher CE]
        (``norm``: the global batch's normalisers).

        ``heldout=True``: the teacher-forced held-out rollout of ``plan`` (detached, call it under no_grad), as
        (summed CE, target tokens). It runs here, inside the wrapped module's forward, because FSDP2 gathers
        sharded weights only around that forward; a rollout outside it would see the shards.
        """
        if heldout:
            # accelerate autocasts this forward under bf16; the held-out loss stays in the model's own dtype.
            with torch.autocast(torch.device(self.backbone.device).type, enabled=False):
                r = rollout(self.backbone, self.spec, plan.prompts, targets=plan.targets, grad_mode="detached")
            return r.loss.detach() * r.target_tokens, torch.tensor(float(r.target_tokens))
        return step_loss(self.backbone, self.spec, self.cfg, plan, norm, checkpoint=self.cfg.activation_checkpointing)


def share_realigner(backbone: Backbone, realign: bool, accelerator: Accelerator) -> None:
    """Compute the realigner once, on the main process (on the CPU, in float64, written to the on-disk cache),
    and give it to every process, which loads it from that cache and moves it to its device.

    Call it before sharding (FSDP2) with every process. The other processes never solve it themselves: under
    FSDP2's cpu_ram_efficient_loading their weights are not even loaded, so they take the main process's
    cache path and norm rather than fingerprinting their own weights.
    """
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        get_realigner(backbone, realign)
        return
    shared: list = [None, None]
    if accelerator.is_main_process:
        realigner = get_realigner(backbone, realign)
        shared = [str(realignment_path(backbone)) if realign else None, realigner.target_norm]
    accelerator.wait_for_everyone()  # the cache file is complete before anyone reads it
    path, target_norm = broadcast_object_list(shared, from_process=0)
    if not accelerator.is_main_process:
        matrix = torch.load(path, map_location="cpu", weights_only=True).to(backbone.device) if path else None
        install_realigner(backbone, Realigner(matrix, target_norm), realign)


def wrapped_trainable(backbone: Backbone, spec: RolloutSpec) -> list[torch.nn.Parameter]:
    """The trained parameters as the module holds them now, in a fixed order (LoRA by name, then the latent
    map's). Call it after wrapping: FSDP2 swaps every parameter for a sharded one, so lists taken before (the
    adapters' cached list included, refreshed here) would point at tensors that no longer train."""
    backbone.cache["lora_params"] = [p for n, p in backbone.model.named_parameters() if "lora_" in n]
    params = trainable_parameters(backbone)
    if isinstance(spec.latent_map, torch.nn.Module):
        params += list(spec.latent_map.parameters())
    return params


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    warmup = max(1, int(round(cfg.warmup_ratio * cfg.steps))) if cfg.warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_topology(cfg: TrainConfig) -> Topology:
    """The topology ``cfg`` trains: its own, else its task's (relay and split tasks name one), else ``sequential``;
    a single agent for the single-agent systems. Channel training that the topology cannot support fails here."""
    if cfg.system != "diffmas":
        return SINGLE
    topology = load_topology(cfg.topology or get_task(cfg.data.task).topology or "sequential")
    scope = cfg.trace or topology.trace or "keep"
    if cfg.channel.anneal and scope != "latents":
        raise DiffMASError(f"channel.anneal narrows the trace to the writers' latent steps: it needs trace "
                           f"'latents', not '{scope}'")
    if cfg.channel.autoencode_steps and (topology.final.sees != "none" or not topology.writers):
        raise DiffMASError(f"channel.autoencode_steps trains the final agent to repeat what the writers saw: topology "
                           f"'{topology.name}' needs writers and a final agent with sees: none")
    return topology


def attach_trainable(backbone: Backbone, cfg: TrainConfig) -> RolloutSpec:
    """Attach fresh LoRA adapter(s) (and a trainable latent map) for the system; returns the spec that uses them."""
    topology = resolve_topology(cfg)
    roles = attach_lora(backbone, cfg.lora, [a.role for a in topology.agents])
    latent_map = build_latent_map(backbone, cfg.latent_map, cfg.realign) if cfg.latent_map != "ridge" else None
    if latent_map is not None:
        backbone.cache["latent_map"] = latent_map
    writer_steps = cfg.latent_steps if cfg.system == "diffmas" else 0
    final_steps = cfg.latent_steps if cfg.system == "single_latent" else 0
    return RolloutSpec(topology, "latent", writer_steps, realign=cfg.realign, adapters=roles,
                       final_latent_steps=final_steps, latent_map=latent_map, think=cfg.think,
                       trace=cfg.trace if cfg.system == "diffmas" else None)


def save_trained(backbone: Backbone, spec: RolloutSpec, cfg: TrainConfig, out: Path, steps: int, mixed_precision: str,
                 lora_state: dict | None = None, map_state: dict | None = None) -> None:
    """Write the trained adapters (and latent map) with everything inference needs to rebuild the system."""
    builtin = TOPOLOGIES.get(spec.topology.name) == spec.topology
    topology = spec.topology.name if builtin else spec.topology.to_dict()
    save_adapters(backbone, out, spec.adapters, cfg.lora, state_dict=lora_state,
                  extra={"system": cfg.system, "topology": topology, "latent_steps": cfg.latent_steps,
                         "trace": spec.scope, "grad_mode": cfg.grad_mode, "task": cfg.data.task,
                         "mixed_precision": mixed_precision, "steps": steps,
                         "method": cfg.method, "realign": cfg.realign, "think": cfg.think, "seed": cfg.seed,
                         "latent_map": save_latent_map(spec.latent_map or get_realigner(backbone, cfg.realign), out,
                                                       map_state),
                         "curriculum": to_dict(cfg.curriculum) if cfg.method == "curriculum" else None,
                         "channel": to_dict(cfg.channel) if cfg.channel != ChannelConfig() else None,
                         "distill": to_dict(cfg.distill) if cfg.method == "distill" else None})


def heldout_loss(module: torch.nn.Module, examples: list[TrainExample], batch_size: int, cfg: TrainConfig) -> float:
    """Token-mean teacher-forced loss on held-out examples in the inference configuration (dropout off, no grad).

    ``module`` is the (wrapped) :class:`TrajectoryLoss`; every process computes the whole held-out set.
    """
    was_training = module.training
    module.eval()
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo: lo + batch_size]
            ce_sum, n = module(StepPlan([e.prompt for e in chunk], heldout_targets(cfg, chunk)), heldout=True)
            total += float(ce_sum)
            tokens += float(n)
    if hasattr(module, "reshard"):  # FSDP2 keeps the root gathered after a forward without backward
        module.reshard()
    module.train(was_training)
    return total / max(1.0, tokens)


def _trackers() -> list[str]:
    """Experiment trackers, used only when installed (wandb also needs credentials or an explicit mode)."""
    found = [name for name in ("tensorboard",) if importlib.util.find_spec(name)]
    if importlib.util.find_spec("wandb") and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
        found.append("wandb")
    return found


def train(cfg: TrainConfig, out: str | Path, resume: bool = False) -> dict:
    """Train ``cfg.system``'s LoRA adapter(s); writes adapters, checkpoints, metrics and config under ``out``."""
    configure_allocator()  # long latent chains would otherwise leave freed K/V resident (diffmas.memory)
    out = Path(out)
    # One process may train several runs (the demo, the study): the accelerator's settings (mixed precision)
    # are per run, so forget the last run's; the distributed state (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.mixed_precision, resolve_device(cfg.model.device)),
        cpu=cfg.model.device == "cpu",
        # Detached mode and per-agent adapters leave some adapters without gradient in a step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=_trackers() or None,
        project_dir=str(out),
    )
    ckpt = prepare_out(out, resume, cfg)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.batch_size * world  # examples per micro-batch over all processes
    global_batch = micro * cfg.grad_accum
    if ckpt is not None:  # before anything is loaded: a resume that would change the data order fails at once
        check_resume(ckpt, global_batch, world, accelerator.mixed_precision)

    # Data first: a method that the data cannot support fails before the model is even loaded.
    train_set, heldout = build_datasets(cfg, cfg.steps * global_batch)
    backbone = load_backbone(cfg.model.name, str(accelerator.device), cfg.model.dtype)
    share_realigner(backbone, cfg.realign, accelerator)
    spec = attach_trainable(backbone, cfg)
    backbone.model.train()
    module = accelerator.prepare(TrajectoryLoss(backbone, spec, cfg))
    params = wrapped_trainable(backbone, spec)  # after prepare: FSDP2 replaces the parameters by DTensor shards
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Not passed to accelerate: its scheduler wrapper steps once per process, which would change the schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    start_step = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, backbone, optimizer, scheduler, rank, world, cfg.seed)
        start_step = state["step"]
    elif cfg.latent_map == "link" and cfg.link.pretrain_steps:
        # Fresh LoRA adapters start as the identity, so this is the frozen base model, as intended.
        texts = [f"{question_text(ex.prompt)}\n{ex.target}" for ex in train_set[: max(64, cfg.link.pretrain_steps * 8)]]
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

    def timed_heldout() -> dict:
        started = time.perf_counter()
        loss = heldout_loss(module, heldout, cfg.batch_size, cfg)
        return {"heldout_loss": loss, "heldout_seconds": time.perf_counter() - started}

    if start_step == 0:
        record = {"step": 0, **timed_heldout()}
        history = [(0, record["heldout_loss"])]
        log(record)
        end = cfg.steps
    else:
        history = [h for h in heldout_history(out / METRICS_FILE) if h[0] <= start_step]
        # A run that stopped early and is resumed under the same rule has nothing left to do: the decision is a
        # function of its history. Under a looser rule (resume.BUDGET) it goes on.
        end = start_step if flattened(history, cfg.stop) else cfg.steps
        accelerator.wait_for_everyone()  # every process has read the file before the main one rewrites it
        if accelerator.is_main_process:
            truncate_metrics(out / METRICS_FILE, start_step, going_on=end > start_step)
    bar = tqdm(range(start_step, end), initial=start_step, total=cfg.steps,
               desc=f"train {cfg.system} ({precision_name(accelerator.mixed_precision, cfg.model.dtype)})",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    last_good = ckpt
    with StopRequests() as stop:
        for step in bar:
            started = time.perf_counter()
            if starts_new_stage(step, cfg) and cfg.curriculum.reset_optimizer:
                optimizer.state.clear()  # fresh AdamW moments for the new stage, as Coconut does
            plan = plan_step(cfg, step, train_set[step * global_batch: (step + 1) * global_batch], spec.topology)
            norm = plan_norm(backbone, spec, plan)
            local = torch.zeros(4, device=accelerator.device)
            for m in range(cfg.grad_accum):
                mine = plan.rows(slice(m * micro, (m + 1) * micro)).rows(slice(rank, None, world))
                sync = accelerator.no_sync(module) if m < cfg.grad_accum - 1 else nullcontext()
                with sync:
                    loss_part, sums = module(mine, norm)
                    # DDP averages gradients over processes: scale so the result is the global objective.
                    accelerator.backward(loss_part * world)
                local += torch.cat([loss_part.detach()[None], sums])
            # The stop request rides on the step's one reduction: every process stops after the same step.
            totals = accelerator.reduce(torch.cat([local, local.new_tensor([stop.signum is not None])]), "sum")
            loss = float(totals[0])
            if not math.isfinite(loss):
                raise DiffMASError(f"non-finite loss ({loss}) at step {step + 1}; stopped before the update. "
                                   f"Last good checkpoint: {last_good or 'none'}")
            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_done()  # the allocator policy's step boundary (diffmas.memory)
            seconds = time.perf_counter() - started
            record = {"step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "target_tokens": norm.tokens, "tokens_per_s": norm.tokens / seconds, "seconds": seconds}
            if cfg.method != "answer":
                record["ce"] = float(totals[1]) / norm.tokens
            if cfg.method == "distill":
                record["distill"] = float(totals[2]) / norm.rows
                record["teacher_ce"] = float(totals[3]) / max(1, norm.teacher_tokens)
            if plan.stage is not None:
                record["stage"] = plan.stage
            if isinstance(spec.latent_map, GatedThought):  # how much thought content the map lets in
                record["gate"] = full_tensor(spec.latent_map.gate).item()
            done = step + 1 == cfg.steps
            if done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                record.update(timed_heldout())  # its own seconds: "seconds" stays the training step's
                history.append((step + 1, record["heldout_loss"]))
                if not done and flattened(history, cfg.stop):
                    record["stopped_early"] = done = True
            log(record)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}",
                            target_tok_s=f"{record['tokens_per_s']:.0f}")
            stopping = bool(totals[4]) and not done
            if done or stopping or (step + 1) % cfg.checkpoint_every == 0:
                last_good = save_checkpoint(out, step + 1, (step + 1) * global_batch, backbone, optimizer, scheduler,
                                            cfg, accelerator)
            if stopping:
                signum = int(stop.signum or signal.SIGTERM)  # another process may have been the one asked
                raise TrainingStopped(f"{signal.Signals(signum).name} after step {step + 1} of {cfg.steps}; "
                                      f"checkpoint saved at {last_good}: to go on, run the same command (with "
                                      "--resume for diffmas train; the demo and the studies resume by themselves)",
                                      signum)
            if done:
                break

    # Every process gathers full tensors (FSDP2 holds shards; a no-op copy otherwise), the main one writes.
    lora_state = full_state_dict(backbone)
    map_state = ({k: full_tensor(v).cpu() for k, v in spec.latent_map.state_dict().items()}
                 if isinstance(spec.latent_map, torch.nn.Module) else None)
    if accelerator.is_main_process:
        save_trained(backbone, spec, cfg, out, history[-1][0] if history else cfg.steps, accelerator.mixed_precision,
                     lora_state, map_state)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it also tears down the process group
        tracker.finish()
    metrics = [json.loads(l) for l in (out / METRICS_FILE).read_text().splitlines()] if (out / METRICS_FILE).exists() else []
    held = [m["heldout_loss"] for m in metrics if "heldout_loss" in m]
    return {"out": str(out), "steps": history[-1][0] if history else cfg.steps, "heldout_loss_start": held[0] if held else None,
            "heldout_loss_end": held[-1] if held else None, "world_size": world,
            "mixed_precision": accelerator.mixed_precision,
            "is_main_process": accelerator.is_main_process}

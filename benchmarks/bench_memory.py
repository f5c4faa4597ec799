"""python benchmarks/bench_memory.py --out docs/benchmarks   (P4: activation checkpointing, memory at equal gradients)

Peak memory of one diffmas training step (coupled, shared LoRA, sequential topology, m latent steps per writer,
answer-only chain_sum targets) without and with per-agent activation checkpointing (``rollout(checkpoint=True)``:
each agent call is recomputed in backward). Each setting runs in a FRESH subprocess (so one setting's freed heap
cannot hide or inflate the other's peak); the children run one after the other, never at the same time.

What is measured (CPU; torch has no CPU allocator statistics):
- peak RSS of the step: the kernel's peak-RSS mark (VmHWM, the same mark ``getrusage().ru_maxrss`` reads) is reset
  to the current RSS just before the step (``/proc/self/clear_refs``), after the model is loaded, a tiny warm-up step
  has paged in torch's kernels (libtorch's code pages count as RSS) and the freed heap is trimmed; reported as the
  peak minus the RSS right before the step. Where the kernel refuses the reset, the child falls back to ru_maxrss
  minus that RSS (reported as such). Two allocator settings, each pair in fresh processes:
  ``glibc default`` (what ``ps`` shows a user; freed blocks below glibc's dynamic mmap threshold, up to 32 MiB,
  stay in the heap, so RSS overstates live tensors) and ``mmap >= 64 KiB`` (``MALLOC_MMAP_THRESHOLD_=65536``:
  every tensor above 64 KiB is its own mapping, returned on free, so RSS tracks live tensor bytes);
- activations held after the forward: the bytes of the distinct tensors autograd saved for backward
  (``saved_tensors_hooks``), parameters excluded; a deterministic count, independent of the allocator.

Gradients: both children save every LoRA gradient; the parent checks they match (dropout is 0 so the two runs
are the same function). Goal: peak (no checkpointing) / peak (checkpointing) >= 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import (load, machine, parser, peak_rss_mib, release_memory, reset_peak_rss, rss_mib, setup, table,
                     write_json)
from bench_train_step import training_batch
from diffmas.adapters import LoraSettings, attach_lora, trainable_parameters
from diffmas.prompts import load_topology
from diffmas.rollout import RolloutSpec, rollout


class SavedBytes:
    """Counts the distinct storages autograd saves for backward (parameters excluded).

    Saved 4-D per-head tensors ``[B, heads, L > 1, head_dim]`` are counted apart: in a latent step they are the
    whole concatenated key/value cache (``DynamicLayer.update`` builds a new ``torch.cat`` of the trace every
    step and SDPA saves it), which is what makes un-checkpointed coupled training grow as O(m * T).
    """

    def __init__(self, params: list[torch.Tensor], head_dim: int) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.head_dim = head_dim
        self.seen: dict[int, tuple[int, bool]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            per_head = t.dim() == 4 and t.shape[-1] == self.head_dim and t.shape[2] > 1
            self.seen[storage.data_ptr()] = (storage.nbytes(), per_head)
        return t

    @property
    def mib(self) -> float:
        return sum(n for n, _ in self.seen.values()) / 2**20

    @property
    def per_head_mib(self) -> float:
        return sum(n for n, per_head in self.seen.values() if per_head) / 2**20


def child(args: Any) -> None:
    """One setting, in its own process; prints one JSON line and saves the LoRA gradients."""
    setup(args.threads)
    import resource

    backbone = load(args.model, args.device)
    topology = load_topology("sequential")
    # Dropout 0: with and without recomputation must be the same function for the gradient check.
    roles = attach_lora(backbone, LoraSettings(dropout=0.0), [a.role for a in topology.agents])
    backbone.model.train()
    spec = RolloutSpec(topology, "latent", latent_steps=args.latent_steps, adapters=roles)
    prompts, targets = training_batch(args.batch)
    params = trainable_parameters(backbone)
    # The realignment matrix is computed (or read from disk) on first use: do it before the measured region.
    from diffmas.latent import get_realigner

    get_realigner(backbone)
    # Warm-up: a tiny step pages in the kernels this step uses, so their code pages are not counted as its memory.
    warm = RolloutSpec(topology, "latent", latent_steps=1, adapters=roles)
    rollout(backbone, warm, prompts[:1], targets=targets[:1], grad_mode="coupled",
            checkpoint=args.checkpoint).loss.backward()
    for p in params:
        p.grad = None
    release_memory()
    load_rss = rss_mib()
    load_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset_ok = reset_peak_rss()

    cfg = backbone.lm.config
    counter = SavedBytes(list(backbone.model.parameters()), cfg.hidden_size // cfg.num_attention_heads)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        result = rollout(backbone, spec, prompts, targets=targets, grad_mode="coupled", checkpoint=args.checkpoint,
                         keep_trace=True)
    forward_s = time.perf_counter() - start
    after_forward = rss_mib()
    result.loss.backward()
    step_s = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = peak_rss_mib() - load_rss if reset_ok else maxrss - load_rss
    names = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    grads = {n: p.grad.detach().clone() for n, p in zip(names, params)}
    assert len(names) == len(params) and all(g is not None for g in grads.values()), "a LoRA parameter got no grad"
    torch.save(grads, args.grads)
    print(json.dumps({
        "checkpoint": args.checkpoint, "loss": float(result.loss), "rss_before_step_mib": load_rss,
        "maxrss_after_load_mib": load_maxrss, "peak_method": "VmHWM reset" if reset_ok else "ru_maxrss - load RSS",
        "peak_step_mib": peak, "rss_after_forward_mib": after_forward - load_rss,
        "saved_activations_mib": counter.mib, "saved_attention_kv_mib": counter.per_head_mib,
        "forward_s": forward_s, "step_s": step_s,
        "trace_positions": int(result.trace.length)}))


ALLOCATORS = {"glibc default": {}, "mmap >= 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536",
                                                       "MALLOC_TRIM_THRESHOLD_": "65536"}}


def run_child(args: Any, checkpoint: bool, allocator: str, grads: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--model", args.model,
           "--device", args.device, "--batch", str(args.batch), "--latent-steps", str(args.latent_steps),
           "--grads", str(grads)] + (["--checkpoint"] if checkpoint else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | ALLOCATORS[allocator]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return {"allocator": allocator, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent-steps", type=int, default=20)
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--checkpoint", action="store_true", help=argparse_hidden())
    p.add_argument("--grads", type=Path, help=argparse_hidden())
    args = p.parse_args()
    if args.quick:
        args.latent_steps = min(args.latent_steps, 5)
    if args.child:
        child(args)
        return
    runs: list[dict[str, Any]] = []
    grads: list[dict[str, torch.Tensor]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (allocator, ckpt) in enumerate((a, c) for a in ALLOCATORS for c in (False, True)):
            runs.append(run_child(args, ckpt, allocator, Path(tmp) / f"{i}.pt"))
            grads.append(torch.load(Path(tmp) / f"{i}.pt"))
    ref = grads[0]
    scale = max(float(g.abs().max()) for g in ref.values())
    max_abs = max(float((ref[k] - g[k]).abs().max()) for g in grads[1:] for k in ref)
    close = all(g.keys() == ref.keys() and all(torch.allclose(ref[k], g[k], rtol=1e-4, atol=1e-6 * scale) for k in ref)
                for g in grads[1:])
    summary: dict[str, Any] = {"grad_max_abs_diff": max_abs, "grad_max_abs": scale, "grads_match": close,
                               "lora_tensors": len(ref), "losses": [r["loss"] for r in runs]}
    for allocator in ALLOCATORS:
        plain, ckpt = (r for r in runs if r["allocator"] == allocator)
        summary[allocator] = {"peak_ratio": plain["peak_step_mib"] / ckpt["peak_step_mib"],
                              "time_ratio_ckpt_over_plain": ckpt["step_s"] / plain["step_s"]}
    summary["saved_activations_ratio"] = runs[0]["saved_activations_mib"] / max(runs[1]["saved_activations_mib"], 1e-9)

    print(f"\nP4 training-step memory, coupled, batch {args.batch}, m={args.latent_steps}, "
          f"{runs[0]['trace_positions']} trace positions/row ({args.threads} thread(s), one fresh process per row)")
    rows = [[r["allocator"], "per-agent checkpointing" if r["checkpoint"] else "none", r["peak_step_mib"],
             r["rss_after_forward_mib"], r["saved_activations_mib"], r["step_s"]] for r in runs]
    print(table(["allocator", "checkpointing", "peak RSS of step MiB", "RSS held after fwd MiB",
                 "saved activations MiB", "fwd+bwd s (single run)"], rows))
    for allocator in ALLOCATORS:
        print(f"{allocator}: peak ratio {summary[allocator]['peak_ratio']:.2f}x, "
              f"time ckpt/plain {summary[allocator]['time_ratio_ckpt_over_plain']:.2f}")
    print(f"without checkpointing, {runs[0]['saved_attention_kv_mib']:.0f} of the "
          f"{runs[0]['saved_activations_mib']:.0f} MiB saved are per-head attention tensors (K/V copies of the trace)")
    print(f"saved-activation ratio {summary['saved_activations_ratio']:.1f}x; gradients match: {close} "
          f"(max |diff| {max_abs:.2e}, max |grad| {scale:.2e})")
    assert close, "gradients with and without checkpointing differ"
    write_json(args.out, "memory", {"machine": machine(args.threads, args.device), "goal": "peak ratio >= 2",
                                    "batch": args.batch, "latent_steps": args.latent_steps, "runs": runs, **summary})


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

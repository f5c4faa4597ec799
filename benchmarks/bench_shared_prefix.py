"""python benchmarks/bench_shared_prefix.py --out docs/benchmarks   (P10: the first writer's shared prompt prefix)

A training step of the relay study's arms prefills the first writer's prompt rows; every row starts with the same
tokens (the chat template and the writer's instructions), so training prefills that prefix once and copies its K/V
to every row (`rollout._prefill_shared_prefix`). This measures the library's own training step (rollout, backward,
clipping, AdamW) at the relay study's settings (`diffmas.experiments.relay.train_config`: batch 8, m = 6, LoRA
r = 16, fp32) with the prefix shared against the same step prefilling every row's whole prompt, interleaved, for
the arms the study still runs: coupled (latents only), pause and open on relay:digits and relay:chain_sum; then an
evaluation rollout (latent_mas on the relay topology, m = 6, latents only, batch 16, 24 tokens decoded per row, the
study's evaluation settings) with and without the shared prefix.
Reported: the time ratios shared / whole, and the share of the writer's prompt tokens the prefix is.
"""

from __future__ import annotations

from typing import Any

import torch

from _common import (DEFAULT_MODEL, compare, fixed_length, interleaved, library_training_step, load, machine, parser,
                     setup, table, write_json)
from diffmas import rollout as rollout_module
from diffmas.decode import DecodeConfig
from diffmas.experiments.relay import Arm, RelayConfig, train_config
from diffmas.prompts import load_topology, render_agent, view_text
from diffmas.rollout import RolloutSpec, rollout
from diffmas.tasks import get_task

SHARED_PREFIX = rollout_module._shared_prefix


def make_step(arm: Arm, share: bool):
    """The library's training step of ``arm`` (the study's config), sharing the prefix or not; and the
    mean prompt length and shared prefix of its first writer on the step's batch."""

    def choose() -> None:
        rollout_module._shared_prefix = SHARED_PREFIX if share else (lambda seqs: 0)

    step, backbone, spec, plan = library_training_step(train_config(arm, RelayConfig()), before=choose)
    writer = spec.topology.writers[0]
    seqs = [render_agent(backbone.tokenizer, writer, view_text(writer, p)) for p in plan.prompts]
    return step, sum(map(len, seqs)) / len(seqs), SHARED_PREFIX(seqs)


def make_inference(task_name: str, share: bool, batch: int, tokens: int):
    """An evaluation rollout of latent_mas on ``batch`` of the task's evaluation items (its relay topology, m = 6,
    latents only; exactly ``tokens`` decoded per row), sharing the prefix or not."""
    task = get_task(task_name)
    views = [task.views(ex) for ex in task.load(limit=batch)]
    backbone = fixed_length(load(DEFAULT_MODEL))
    spec = RolloutSpec(load_topology(task.topology), "latent", 6, trace="latents")
    cfg = DecodeConfig(max_new_tokens=tokens)

    def run() -> None:
        rollout_module._shared_prefix = SHARED_PREFIX if share else (lambda seqs: 0)
        with torch.no_grad():
            rollout(backbone, spec, views, decode_cfg=cfg)

    return run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--arms", nargs="+", default=["coupled:relay:digits", "pause:relay:digits",
                                                  "coupled:relay:chain_sum", "open:relay:chain_sum"],
                   help="name:task of the relay study's arms to time")
    p.add_argument("--batch", type=int, default=16, help="evaluation rollout: rows (the study's eval batch)")
    p.add_argument("--tokens", type=int, default=24, help="evaluation rollout: tokens decoded per row")
    args = p.parse_args()
    setup(args.threads)
    results: dict[str, Any] = {}
    rows = []
    for spec in args.arms:
        name, task = spec.split(":", 1)
        arm = Arm(name, task)
        step_shared, prompt, prefix = make_step(arm, True)
        step_whole = make_step(arm, False)[0]
        times = interleaved({"shared": step_shared, "whole": step_whole}, 1 if args.quick else args.reps)
        ratio = compare(times, "shared", "whole")
        results[arm.id] = {"seconds": times, "ratio": ratio, "writer_prompt_tokens": prompt, "shared_prefix": prefix}
        wall = ratio["wall"]
        rows.append([arm.id, f"{prompt:.1f}", prefix, f"{wall['median_a']:.2f}", f"{wall['median_b']:.2f}",
                     f"{wall['ratio_of_medians']:.3f}", f"{wall['min_ratio']:.3f}-{wall['max_ratio']:.3f}"])
        print(table(["arm", "writer prompt (mean tokens)", "shared prefix", "shared s", "whole s",
                     "shared / whole", "range of paired ratios"], rows))
    inference: dict[str, Any] = {}
    rows = []
    for task in ("relay:digits", "relay:chain_sum"):
        fns = {"shared": make_inference(task, True, args.batch, args.tokens),
               "whole": make_inference(task, False, args.batch, args.tokens)}
        times = interleaved(fns, 1 if args.quick else args.reps)
        inference[task] = {"seconds": times, "ratio": compare(times, "shared", "whole")}
        wall = inference[task]["ratio"]["wall"]
        rows.append([task, f"{wall['median_a']:.2f}", f"{wall['median_b']:.2f}", f"{wall['ratio_of_medians']:.3f}",
                     f"{wall['min_ratio']:.3f}-{wall['max_ratio']:.3f}"])
        print(table(["evaluation rollout", "shared s", "whole s", "shared / whole", "range of paired ratios"], rows))
    write_json(args.out, "shared_prefix", {"machine": machine(args.threads), "reps": args.reps, "results": results,
                                           "inference": inference, "batch": args.batch, "tokens": args.tokens})


if __name__ == "__main__":
    main()

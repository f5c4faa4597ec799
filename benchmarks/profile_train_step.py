"""python benchmarks/profile_train_step.py --out docs/benchmarks --thread-counts 1 2   (P9: where a training step's time goes)

A diffmas and a single_sft training step at the demo's settings (configs/train/demo.yaml: duo, m = 5, batch 8,
answer-only chain_sum targets, the embedded model, the precision the file resolves to here), each the library's
own step (rollout, backward, clipping, AdamW). Two measurements:

1. Step time, the two systems interleaved (A B, B A, ...), and the ratio diffmas / single_sft against the ratio of
   their positions per row: the issue-20 goal is diffmas <= 1.1 x (positions ratio) x single_sft, i.e. no
   overhead beyond the extra positions.
2. A torch.profiler table of each step's self CPU time by operator family: linear layers (every matmul, LoRA's
   included), attention, casts and copies, concatenation and indexing (the trace), the optimizer, elementwise
   work, and Python/dispatch (the step's wall time minus all operators' self time).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from _common import interleaved, library_training_step, machine, merged, parser, setup, table, write_json
from diffmas.backbone import resolve_precision
from diffmas.experiments.demo import DemoConfig

FAMILIES = [
    ("linear layers (matmul, LoRA included)", ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm")),
    ("attention (SDPA, softmax)", ("scaled_dot_product", "softmax", "_flash_attention", "_efficient_attention")),
    ("casts and copies", ("_to_copy", "copy_", "clone", "contiguous", "to", "_copy_from")),
    ("concatenation and indexing (trace)", ("cat", "index", "gather", "scatter", "slice", "select", "where",
                                           "masked_fill", "nonzero", "stack")),
    ("optimizer (AdamW)", ("_foreach", "addcdiv", "lerp", "_fused_adamw")),
]


def family(op: str) -> str:
    name = op.removeprefix("aten::")
    for label, stems in FAMILIES:
        if any(name == s or name.startswith(s) or s in name for s in stems):
            return label
    return "elementwise, norms, activations, other"


def make_step(system: str, precision: str = "auto"):
    """The library's training step for ``system`` at the demo's settings, and its positions per row."""
    cfg = DemoConfig(device="cpu").train_config(system, mixed_precision=precision)
    bf16 = resolve_precision(cfg.mixed_precision, torch.device("cpu")) == "bf16"
    step, backbone, spec, plan = library_training_step(cfg, bf16)

    from diffmas.rollout import rollout

    with torch.no_grad():
        shape = rollout(backbone, spec, plan.prompts, targets=plan.targets)
    positions = sum(sum(a.prompt_tokens) + a.latent_steps * len(plan.prompts) for a in shape.agents) / len(plan.prompts)
    positions += shape.target_tokens / len(plan.prompts)
    return step, positions


def profile(step) -> dict[str, float]:
    """Self CPU seconds per operator family over one step, and Python/dispatch as the rest of its wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    started = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - started
    out: dict[str, float] = {}
    for event in prof.key_averages():
        out[family(event.key)] = out.get(family(event.key), 0.0) + event.self_cpu_time_total / 1e6
    out["Python and dispatch (wall minus operators)"] = max(0.0, wall - sum(out.values()))
    out["wall (under the profiler)"] = wall
    return out


def measure(precision: str, reps: int) -> dict[str, Any]:
    """Both systems' steps at ``precision`` with the current torch threads: interleaved times and profiles."""
    steps, positions = {}, {}
    for system in ("diffmas", "single_sft"):
        steps[system], positions[system] = make_step(system, precision)
        steps[system]()  # warm-up: allocator, kernels, the realignment matrix
    times = interleaved(steps, reps, warmup=0)
    median = {s: sorted(t["wall"])[len(t["wall"]) // 2] for s, t in times.items()}
    ratio, pos_ratio = median["diffmas"] / median["single_sft"], positions["diffmas"] / positions["single_sft"]
    return {"seconds": times, "median": median, "ratio": ratio, "positions_per_row": positions,
            "positions_ratio": pos_ratio, "goal_met": ratio <= 1.1 * pos_ratio,
            "profile": {s: profile(steps[s]) for s in steps}}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=["auto"], choices=("auto", "no", "bf16"),
                   help="mixed precision (auto: the demo's, bf16 only where the CPU computes it natively)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    setup(args.threads)
    results: dict[str, dict[str, Any]] = {}
    for threads in args.thread_counts:
        torch.set_num_threads(threads)
        for precision in args.precisions:
            r = results.setdefault(str(threads), {})[precision] = measure(precision, 1 if args.quick else args.reps)
            r["machine"] = machine(threads)
            print(f"\n{threads} thread(s), precision {precision}")
            print(table(["family", "diffmas s", "single_sft s"],
                        [[k, f"{r['profile']['diffmas'].get(k, 0):.2f}", f"{r['profile']['single_sft'].get(k, 0):.2f}"]
                         for k in r["profile"]["diffmas"]]))
            print(f"step: diffmas {r['median']['diffmas']:.2f} s, single_sft {r['median']['single_sft']:.2f} s, "
                  f"ratio {r['ratio']:.2f}; positions per row {r['positions_per_row']['diffmas']:.0f} vs "
                  f"{r['positions_per_row']['single_sft']:.0f} ({r['positions_ratio']:.2f}x); goal <= "
                  f"{1.1 * r['positions_ratio']:.2f}: {'met' if r['goal_met'] else 'not met'}")
    write_json(args.out, "profile", {"machine": machine(max(args.thread_counts)),
                                     "goal": "diffmas / single_sft <= 1.1 x positions ratio",
                                     "results": merged(args.out, "profile", "results", results)})


if __name__ == "__main__":
    main()

"""python benchmarks/bench_scaling.py --out docs/benchmarks   (P5: rollout time and memory vs agents K, latent steps m)

latent_mas inference on one rg:chain_sum problem (batch 1, greedy, exactly ``--new-tokens`` decoded: EOS hidden)
over sequential topologies of K = 2..5 agents (K-1 latent writers, then the judger) and m latent steps per writer.
Time: median of ``--reps`` runs, the grid walked forwards then backwards so load drift hits both ends alike.
Memory, in a child process whose allocator maps every block >= 64 KiB on its own (``MALLOC_MMAP_THRESHOLD_``,
so RSS follows live tensors instead of glibc's free lists), per configuration in ascending size: the peak RSS
increase over the RSS just before the rollout (freed heap trimmed and the kernel's peak mark reset first), and the
exact bytes of the writers' KV trace the judger reads. The child also compares, at the largest configuration and
batch 4, that peak against the bare-forward floor of P1 (one DynamicCache, same shapes): how many copies of the KV
trace the rollout keeps alive. Writes ``scaling.png`` (two panels) beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import (chain_sum_prompts, fixed_length, load, machine, parser, peak_rss_mib, release_memory,
                     reset_peak_rss, rss_mib, setup, table, timed, write_json)
from bench_rollout import make_floor, segment_ids
from diffmas.backbone import Backbone
from diffmas.decode import DecodeConfig
from diffmas.prompts import SEQUENTIAL, Agent, Topology
from diffmas.rollout import RolloutSpec, rollout

VERIFIER = Agent("verifier", "You are the Verifier in a team of agents that solve a problem together.",
                 "Verify the refined plan above step by step and point out anything still wrong.")


def topology(k: int) -> Topology:
    """K agents: the first K-1 of planner, critic, refiner, verifier, then the judger."""
    writers = (*SEQUENTIAL.writers, VERIFIER)
    assert 2 <= k <= len(writers) + 1, f"K must be in 2..{len(writers) + 1}"
    return Topology(f"sequential-{k}", (*writers[: k - 1], SEQUENTIAL.final))


def trace_mib(result: Any) -> float:
    trace = result.trace
    return sum(t.numel() * t.element_size() for t in (*trace.keys, *trace.values)) / 2**20


def plot(path: Path, ks: list[int], ms: list[int], cells: dict[tuple[int, int], dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, k in enumerate(ks):
        color = f"C{i}"  # one colour per K in both panels
        ax_t.plot(ms, [cells[k, m]["seconds"] for m in ms], marker="o", color=color, label=f"K={k}")
        ax_m.plot(ms, [cells[k, m]["peak_rss_mib"] for m in ms], marker="o", color=color,
                  label=f"K={k} peak RSS increase")
        ax_m.plot(ms, [cells[k, m]["trace_mib"] for m in ms], ls="--", marker=".", color=color, alpha=0.6,
                  label=f"K={k} KV trace (exact)")
    ax_t.set(xlabel="latent steps per writer (m)", ylabel="seconds per rollout (batch 1)",
             title="latent_mas rollout time")
    ax_m.set(xlabel="latent steps per writer (m)", ylabel="MiB", title="latent_mas rollout memory")
    ax_t.legend()
    ax_m.legend(fontsize=7, ncol=2)
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def peak_of(fn: Any) -> tuple[float, Any]:
    """(peak RSS increase in MiB while ``fn`` runs, its result)."""
    release_memory()
    before = rss_mib()
    reset_peak_rss()
    result = fn()
    return peak_rss_mib() - before, result


def memory_child(args: Any) -> None:
    """The memory pass (see module docstring); prints one JSON line."""
    setup(args.threads)
    backbone: Backbone = fixed_length(load(args.model, args.device, args.dtype))
    cfg = DecodeConfig(max_new_tokens=args.new_tokens)

    def run(k: int, m: int, prompts: list[str]) -> Any:
        return rollout(backbone, RolloutSpec(topology(k), "latent", latent_steps=m), prompts, decode_cfg=cfg,
                       keep_trace=True)

    one = chain_sum_prompts(1)
    run(max(args.agents), 1, one)  # warm-up: kernels' code pages, realignment matrix
    cells = []
    grid = [(k, m) for k in args.agents for m in args.latent_steps]
    for k, m in sorted(grid, key=lambda c: (c[0] - 1) * c[1] + c[0]):  # ascending trace size
        peak, result = peak_of(lambda: run(k, m, one))
        cells.append({"agents": k, "latent_steps": m, "peak_rss_mib": peak, "trace_mib": trace_mib(result),
                      "trace_positions": int(result.trace.length)})
        del result
    k, m = max(args.agents), max(args.latent_steps)
    four = chain_sum_prompts(4)
    floor = make_floor(backbone, segment_ids(backbone, topology(k), four), m, args.new_tokens)
    floor()  # warm-up at this shape
    floor_peak, _ = peak_of(floor)
    ours_peak, result = peak_of(lambda: run(k, m, four))
    kv_per_position = trace_mib(result) / result.trace.length
    final_positions = result.trace.length + len(segment_ids(backbone, topology(k), four)[-1][0]) + args.new_tokens - 1
    vs_floor = {"agents": k, "latent_steps": m, "batch": 4, "ours_peak_mib": ours_peak, "floor_peak_mib": floor_peak,
                "ratio": ours_peak / floor_peak, "final_kv_mib": kv_per_position * final_positions}
    print(json.dumps({"cells": cells, "vs_floor": vs_floor}))


def measure_memory(args: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-child", "--threads", str(args.threads), "--model", args.model,
           "--device", args.device, "--new-tokens", str(args.new_tokens), "--agents", *map(str, args.agents),
           "--latent-steps", *map(str, args.latent_steps)]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def linear_fit(cells: dict[tuple[int, int], dict[str, Any]]) -> dict[str, float]:
    """Least squares seconds ~ a + b*K + c*(K-1)*m: b is an agent's prefill, c one latent step."""
    import numpy as np

    keys = list(cells)
    x = np.array([[1.0, k, (k - 1) * m] for k, m in keys])
    y = np.array([cells[c]["seconds"] for c in keys])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"intercept_s": float(coef[0]), "per_agent_s": float(coef[1]), "per_latent_step_s": float(coef[2]),
            "max_residual_s": float(np.abs(x @ coef - y).max())}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--agents", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--latent-steps", type=int, nargs="+", default=[0, 5, 10, 20, 40])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    setup(args.threads)
    reps = 1 if args.quick else args.reps
    backbone: Backbone = fixed_length(load(args.model, args.device, args.dtype))
    prompts = chain_sum_prompts(1)
    cfg = DecodeConfig(max_new_tokens=args.new_tokens)
    grid = [(k, m) for k in args.agents for m in args.latent_steps]

    def run(k: int, m: int) -> Any:
        return rollout(backbone, RolloutSpec(topology(k), "latent", latent_steps=m), prompts, decode_cfg=cfg,
                       keep_trace=True)

    run(max(args.agents), 1)  # warm-up: kernels, realignment matrix
    seconds: dict[tuple[int, int], list[float]] = {c: [] for c in grid}
    for rep in range(reps):
        for c in grid if rep % 2 == 0 else grid[::-1]:
            seconds[c].append(timed(lambda: run(*c))[0])

    memory = measure_memory(args)
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for cell in memory["cells"]:
        c = (cell["agents"], cell["latent_steps"])
        cells[c] = {**cell, "seconds": statistics.median(seconds[c]), "runs": seconds[c]}

    rows = [[k, m, cells[k, m]["trace_positions"], cells[k, m]["seconds"], cells[k, m]["trace_mib"],
             cells[k, m]["peak_rss_mib"]] for k, m in grid]
    print(f"\nP5 latent_mas rollout scaling, batch 1, {args.new_tokens} decoded tokens ({args.threads} thread(s))")
    print(table(["K agents", "m", "trace positions", "seconds", "KV trace MiB", "peak RSS increase MiB"], rows))
    fit = linear_fit(cells)
    print(f"fit: seconds ~ {fit['intercept_s']:.2f} + {fit['per_agent_s']:.3f}*K "
          f"+ {fit['per_latent_step_s']:.4f}*(K-1)*m (max residual {fit['max_residual_s']:.2f} s)")
    vs = memory["vs_floor"]
    print(f"K={vs['agents']}, m={vs['latent_steps']}, batch {vs['batch']}: "
          f"peak RSS increase {vs['ours_peak_mib']:.0f} MiB vs {vs['floor_peak_mib']:.0f} MiB for the bare-forward "
          f"floor ({vs['ratio']:.2f}x); "
          f"the final KV is {vs['final_kv_mib']:.0f} MiB")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "scaling.png", args.agents, args.latent_steps, cells)
    write_json(args.out, "scaling", {"machine": machine(args.threads, args.device), "batch": 1,
                                     "new_tokens": args.new_tokens, "cells": list(cells.values()),
                                     "memory_vs_floor": vs, "time_fit": fit})


if __name__ == "__main__":
    main()

"""python benchmarks/bench_allocator.py --out docs/benchmarks --thread-counts 1 2   (P8: allocator policy vs step time)

glibc's allocator settings against a training step at the demo's settings (configs/train/demo.yaml: duo, m = 5,
batch 8, fp32, the embedded model): for every candidate, step time AND memory, each candidate in its own fresh
process (an allocator's state is per process), the candidates interleaved (A B C, then C B A, ...) so that the
machine's drift cancels. Every child runs the library's own ``train()`` for ``--steps`` steps (the first one is
warm-up) and reports the per-step seconds from metrics.jsonl, the peak RSS (VmHWM), the RSS held at the end of each
step (after the policy's own step boundary), minor page faults and system CPU time per step.

Candidates (``DIFFMAS_MALLOC`` selects the library's policy, see diffmas.memory):
- ``mmap64k``: every block >= 64 KiB its own mapping, returned at free (the default before 2026-12-05);
- ``glibc``: glibc's own dynamic thresholds, nothing else;
- ``trim``: glibc's thresholds, and the free heap handed back (``malloc_trim``) after every optimizer step;
- ``mmap4m``: only blocks >= 4 MiB mapped on their own (the large activations and K/V blocks);
- ``jemalloc``: jemalloc instead of glibc's malloc (``LD_PRELOAD``, Debian's libjemalloc2), when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, merged, parser, table, write_json

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
# candidate -> (DIFFMAS_MALLOC policy, extra environment)
CANDIDATES = {"mmap64k": ("mmap64k", {}), "glibc": ("glibc", {}), "trim": ("trim", {}), "mmap4m": ("mmap4m", {}),
              **({"jemalloc": ("glibc", {"LD_PRELOAD": str(JEMALLOC)})} if JEMALLOC.is_file() else {})}


def child(steps: int) -> None:
    """One candidate: train ``steps`` steps at the demo's settings; print the measurements as JSON."""
    from diffmas.config import load_config
    from diffmas.memory import configure_allocator, rss_mib
    from diffmas.train import loop

    configure_allocator()
    held: list[float] = []
    faults: list[int] = []
    system: list[float] = []
    original = loop.step_done

    def step_done() -> None:  # the end of the library's step, after its policy's own step boundary
        original()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        held.append(rss_mib())
        faults.append(usage.ru_minflt)
        system.append(usage.ru_stime)

    loop.step_done = step_done
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "train" / "demo.yaml",
                          {"steps": steps, "checkpoint_every": steps, "data.heldout_examples": 8,
                           "model.device": "cpu"})
        loop.train(cfg, Path(tmp) / "run")
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = [m["seconds"] for m in metrics if "seconds" in m]
    peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "held_rss_mib": held,
                      "minor_faults_per_step": [b - a for a, b in zip(faults, faults[1:])],
                      "system_s_per_step": [b - a for a, b in zip(system, system[1:])]}))


def run_child(name: str, threads: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DIFFMAS_MMAP_THRESHOLD"}
    policy, extra = CANDIDATES[name]
    env.update(DIFFMAS_MALLOC=policy, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra)
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"candidate {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.time() - started
    return result


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    p.add_argument("--steps", type=int, default=4, help="training steps per child (the first is warm-up)")
    p.add_argument("--reps", type=int, default=2, help="children per candidate and thread count")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.steps)
        return
    runs: dict[str, dict[str, list[dict]]] = {}
    for threads in args.thread_counts:
        runs[str(threads)] = {name: [] for name in args.candidates}
        for rep in range(args.reps):
            order = args.candidates if rep % 2 == 0 else args.candidates[::-1]
            for name in order:
                print(f"[P8] {threads} thread(s), rep {rep + 1}/{args.reps}: {name}", flush=True)
                runs[str(threads)][name].append(run_child(name, threads, args.steps))
    rows, summary = [], {}
    for threads, by_name in runs.items():
        base = statistics.median(s for r in by_name.get("glibc", []) for s in r["seconds"][1:]) \
            if "glibc" in by_name else None
        for name, results in by_name.items():
            step = statistics.median(s for r in results for s in r["seconds"][1:])
            item = {"step_s": step, "vs_glibc": step / base if base else None,
                    "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in results),
                    "held_rss_mib": statistics.median(r["held_rss_mib"][-1] for r in results),
                    "minor_faults_per_step": statistics.median(f for r in results for f in r["minor_faults_per_step"]),
                    "system_s_per_step": statistics.median(s for r in results for s in r["system_s_per_step"])}
            summary.setdefault(threads, {})[name] = {**item, "machine": machine(int(threads))}
            rows.append([threads, name, item["step_s"], item["vs_glibc"] or "-", item["peak_rss_mib"],
                         item["held_rss_mib"], item["minor_faults_per_step"], item["system_s_per_step"]])
    print(table(["threads", "candidate", "s/step", "vs glibc", "peak RSS MiB", "held RSS MiB", "minor faults/step",
                 "system s/step"], rows))
    write_json(args.out, "allocator", {"machine": machine(max(args.thread_counts)), "steps": args.steps,
                                       "reps": args.reps, "summary": merged(args.out, "allocator", "summary", summary),
                                       "runs": merged(args.out, "allocator", "runs", runs)})


if __name__ == "__main__":
    main()

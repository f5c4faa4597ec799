"""python benchmarks/run_all.py --out docs/benchmarks   (runs P1..P11, then writes docs/benchmarks.md)

Each benchmark runs in its own process, one after the other (never two at once: they would time each other), with
the same thread count. Their JSONs land in ``--out``; this script then renders docs/benchmarks.md from them.
``--only P3 P4`` reruns some and re-renders the page from whatever JSONs are present; ``--render-only`` just renders.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHES = {"P1": "bench_rollout.py", "P2": "bench_tokens.py", "P3": "bench_train_step.py",
           "P4": "bench_memory.py", "P5": "bench_scaling.py", "P6": "bench_throughput.py", "P7": "bench_serve.py",
           "P8": "bench_allocator.py", "P9": "profile_train_step.py", "P10": "bench_shared_prefix.py",
           "P11": "bench_heldout.py"}
DOC_DIR = ROOT / "docs"  # set by render(): links in the page are relative to it
JSONS = {"P1": "rollout", "P2": "tokens", "P3": "train_step", "P4": "memory", "P5": "scaling", "P6": "throughput",
         "P7": "serve", "P8": "allocator", "P9": "profile", "P10": "shared_prefix", "P11": "heldout"}


def f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def command(key: str, out: Path) -> str:
    return f"python benchmarks/{BENCHES[key]} --out {os.path.relpath(out, ROOT)}"


def machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m['cpu']} (`/proc/cpuinfo`), {m['cores']} cores shared with other jobs, "
            f"{m['threads']} torch thread(s), torch {m['torch']}, transformers {m['transformers']}, "
            f"{m['date']}, load average at start {m['loadavg_at_start']:.2f}.")


def goal(met: bool) -> str:
    return "**met**" if met else "**not met**"


def ratio_row(r: dict[str, Any], first: list[Any]) -> list[Any]:
    """A ratio table's row: ``first`` cells, then ours and floor seconds, the ratio (wall), its range, the CPU-time
    ratio and the repetitions."""
    w, c = r["ratio"]["wall"], r["ratio"]["cpu"]
    return [*first, f(w["median_a"]), f(w["median_b"]), f"**{f(w['median_of_ratios'])}**",
            f"{f(w['min_ratio'])}-{f(w['max_ratio'])}", f(c["median_of_ratios"]), w["reps"]]


def section_p1(d: dict[str, Any], out: Path) -> str:
    rows = [ratio_row(r, [r["batch"], r["latent_steps"], r["new_tokens"]]) for r in d["overhead"]]
    b1 = d["overhead"][0]["ratio"]["wall"]["median_of_ratios"]
    overhead = md_table(["batch", "m", "decoded tokens", "ours s", "floor s", "ours/floor (wall)", "range",
                         "ours/floor (CPU)", "reps"], rows)
    m = d["overhead"][0]["latent_steps"]
    tp = md_table(["batch", "problems/s", "speedup vs batch 1", "mean generated tokens"],
                  [[t["batch"], f(t["problems_per_s"], 3), f(t["speedup_vs_batch_1"]), f(t["mean_generated_tokens"], 1)]
                   for t in d["throughput"]])
    return f"""## P1 — rollout overhead vs a bare-forward floor

`{command('P1', out)}` — {machine_line(d['machine'])}

latent_mas inference, sequential topology (3 latent writers + judger), m latent steps per writer, greedy decoding
of exactly the same number of tokens on both sides (EOS hidden from the decoder). Floor: plain `body(...)` calls
on one persistent `DynamicCache` with the same segment widths, the same number of single-token latent forwards
(random input embeddings) and of decode forwards, LM head on the last position only, no attention mask and no
position ids. Ours and floor alternate (A B, B A, ...); the ratio is the median of the per-repetition ratios
(wall clock), with the CPU-time ratio beside it (CPU time ignores the time this process waited for a core).

{overhead}

Goal ours/floor <= 1.15 at batch 1: {goal(b1 <= 1.15)} ({f(b1)}).

Throughput of the real system (`System.run`, EOS honoured, max_new_tokens=48, m={m}, 8 rg:chain_sum problems;
absolute numbers, so they move with the machine's load):

{tp}
"""


def section_p2(d: dict[str, Any], out: Path) -> str:
    rows = [[name, f(s["decoded_tokens_per_problem"], 1), f(s["writer_tokens_per_problem"], 1),
             f(s["final_answer_tokens_per_problem"], 1), s["latent_steps_per_problem"],
             f(s["trace_positions_per_problem"], 0), f(s["seconds_per_problem"]), f(s["accuracy"]), f(s["format_ok"])]
            for name, s in d["systems"].items()]
    systems = md_table(["system", "decoded tokens/problem", "by writers", "final answer", "latent steps/problem",
                        "trace positions read by judger", "s/problem", f"accuracy (n={d['problems']})", "format ok"],
                       rows)
    fewer, speed = d["fewer_tokens_pct"], d["time_ratio_text_over_latent"]
    per_batch = ", ".join(f(r) for r in d["time_ratio_per_batch"])
    return f"""## P2 — decoded tokens and time, latent_mas vs text_mas

`{command('P2', out)}` — {machine_line(d['machine'])}

{d['problems']} rg:chain_sum evaluation problems, sequential topology, batch {d['batch']}, greedy with EOS, final
max_new_tokens={d['max_new_tokens']} for both; text_mas writers decode up to {d['writer_max_new_tokens']} tokens each;
latent_mas writers take m={d['latent_steps']} latent steps each. "Decoded tokens" counts every token any agent decoded.

{systems}

latent_mas decodes **{f(fewer, 1)}% fewer tokens** (goal >= 70%: {goal(fewer >= 70)}); text_mas takes
**{f(speed)}x** the time of latent_mas (median of per-batch ratios {per_batch}; batches run in alternating order).
"""


def section_p3(d: dict[str, Any], out: Path) -> str:
    rows = [ratio_row(r, [r["latent_steps"], r["batch"], r["positions_per_row"]]) for r in d["results"]]
    r0, rm = d["results"][0], d["results"][-1]
    m, batch = rm["latent_steps"], rm["batch"]
    ratio_m = rm["ratio"]["wall"]["median_of_ratios"]
    # Extra seconds of ours over the floor at m, beyond the m=0 difference, spread over the 3m latent steps.
    extra = (rm["ratio"]["wall"]["median_a"] - rm["ratio"]["wall"]["median_b"]) - \
            (r0["ratio"]["wall"]["median_a"] - r0["ratio"]["wall"]["median_b"])
    per_step = extra / (3 * m) if m else float("nan")
    per_position = rm["ratio"]["wall"]["median_b"] / (batch * rm["positions_per_row"])
    steps = md_table(["m", "batch", "positions/row", "ours s", "floor s", "ours/floor (wall)", "range",
                      "ours/floor (CPU)", "reps"], rows)
    return f"""## P3 — one diffmas training step vs a one-forward floor

`{command('P3', out)}` — {machine_line(d['machine'])}

Coupled gradients, one shared LoRA (r=16, alpha=32, dropout 0.05, q/k/v/o/gate/up/down), sequential topology,
answer-only chain_sum targets, batch {batch}. Timed: forward + backward (the optimizer step, the same on both sides, is
left out). Floor: the rollout's exact padded layout as one sequence per row (every prompt segment, m random
embeddings after each writer, the judger's prompt + target), one `body` forward on `inputs_embeds`, LM head on
target positions, cross-entropy, backward. m=0 puts identical tokens on both sides.

{steps}

Goal ours/floor <= 1.3 at m={m}: {goal(ratio_m <= 1.3)} ({f(ratio_m)}). Beyond the m=0 difference, each latent step
(forward + backward) cost ~{f(per_step)} s here, against {1000 * per_position:.1f} ms per row-position in the floor.
{joined_line(rm)}
"""


def joined_line(r: dict[str, Any]) -> str:
    """The same step with transformers' joined cache (a copy of the past per latent step), where measured."""
    j = (r.get("joined_over_ours") or {}).get("wall")
    if not j:
        return ""
    return (f"The same step with the cache joined as transformers does (`diffmas.kv.joined_attention`) took "
            f"**{f(j['median_of_ratios'])}x** the library's split-attention step (range "
            f"{f(j['min_ratio'])}-{f(j['max_ratio'])}), interleaved in the same run.")


def section_p4(d: dict[str, Any], out: Path) -> str:
    names = {"floor": "floor (one fwd+bwd)", "joined": "joined cache (transformers' update)",
             "split": "split attention (the library)"}
    rows = [[names[r["path"]], "per-agent" if r["checkpoint"] else "none", f(r["peak_step_mib"], 0),
             f(r["rss_after_forward_mib"], 0), f(r["saved_activations_mib"], 0), f(r["saved_attention_kv_mib"], 0),
             f(r["step_s"], 1)] for r in d["runs"]]
    cuda = d["runs"][0].get("peak_method", "").startswith("cuda")
    kind = "CUDA allocated" if cuda else "RSS"
    runs = md_table(["attention path", "checkpointing", f"peak {kind} of step MiB", f"{kind} held after forward MiB",
                     "saved activations MiB", "of which per-head K/V MiB", "fwd+bwd s (1 run)"], rows)
    over = d["peak_over_floor"]
    diff = "identical" if d["grad_max_abs_diff"] == 0 else f"max |diff| {d['grad_max_abs_diff']:.2e}"
    dtype = d.get("dtype", "float32")
    tolerance = "rtol 1e-4, atol 1e-5" if dtype in ("float32", "fp32") else "rtol 5e-2, atol 2e-2"
    where = ("All settings run in one process, the model loaded once per topology" if cuda else
             "Each setting runs in a fresh process, one\nafter the other,")
    peak = ("Peak = the CUDA caching allocator's peak (`max_memory_allocated`), reset just before the step, minus what "
            "was allocated then (the weights)." if cuda else "Peak = the kernel's peak-RSS mark (VmHWM), reset just\n"
            "before the step, minus the RSS at that moment.")
    return f"""## P4 — training-step memory against a one-pass floor

`{command('P4', out)}` — {machine_line(d['machine'])}

One coupled training step (shared LoRA, dropout 0, sequential, batch {d['batch']}, m={d['latent_steps']}) and the floor: one
forward + backward over the same positions as one sequence (P3's floor). {where} with the allocator setting `diffmas train` applies. "joined" is the step with single-token
attention joining the cache as transformers does (`diffmas.kv.joined_attention`: each latent step saves a copy of
the past for backward); "split" is the library's path. {peak} "Saved activations" = distinct tensors autograd saved during the
forward (parameters excluded, `saved_tensors_hooks`); "per-head K/V" = the 4-D attention tensors among them.

{runs}

Peak against the floor: joined **{f(over['joined'])}x**, split **{f(over['split'])}x**, split with checkpointing
**{f(over['split+ckpt'])}x** (the split path's peak is {f(d['joined_over_split_peak'])}x lower than the joined one).
Gradients of the three diffmas settings: {diff} over {d['lora_tensors']} LoRA tensors (max |grad| {d['grad_max_abs']:.2e};
check: allclose {tolerance} x max |grad|; {dtype}) — {'match' if d['grads_match'] else 'MISMATCH'}.
Goal: un-checkpointed peak <= 1.5x the floor's: {goal(over['split'] <= 1.5)} ({f(over['split'])}x).
Step times are single runs (indicative only).
{demo_settings(d)}"""


def demo_settings(d: dict[str, Any]) -> str:
    """P4's second part: a diffmas step against a single_sft step at the demo's settings (absent in older runs)."""
    if not d.get("demo_runs"):  # absent in older runs, skipped with --no-demo
        return ""
    *ours, single = d["demo_runs"]
    rows = [["diffmas (duo)", "per-agent" if r["checkpoint"] else "none", f(r["peak_step_mib"], 0),
             f(r["rss_before_step_mib"] + r["peak_step_mib"], 0), f(r["saved_activations_mib"], 0), f(r["step_s"], 1)]
            for r in ours]
    rows.append(["single_sft", "none", f(single["peak_step_mib"], 0),
                 f(single["rss_before_step_mib"] + single["peak_step_mib"], 0),
                 f(single["saved_activations_mib"], 0), f(single["step_s"], 1)])
    plain, ckpt = d["demo_over_single_sft"]["plain"], d["demo_over_single_sft"]["checkpointed"]
    return f"""
At the demo's settings (`configs/train/demo.yaml`: duo, m = 5, batch 8, answer-only chain_sum targets), each in
a fresh process; "process peak" = the RSS before the step plus its peak (weights and runtime included, what
`top` shows):

{md_table(["system", "checkpointing", "peak RSS of step MiB", "process peak RSS MiB", "saved activations MiB",
           "fwd+bwd s (1 run)"], rows)}

diffmas over single_sft: step peak **{f(plain['step_peak'])}x** without checkpointing, **{f(ckpt['step_peak'])}x** with
it; process peak {f(plain['process_peak'])}x and {f(ckpt['process_peak'])}x. Goal (diffmas step <= 1.5x single_sft's):
{goal(plain['step_peak'] <= 1.5)} without checkpointing, {goal(ckpt['step_peak'] <= 1.5)} with it.
"""


def section_p5(d: dict[str, Any], out: Path) -> str:
    cells = sorted(d["cells"], key=lambda c: (c["agents"], c["latent_steps"]))
    rows = [[c["agents"], c["latent_steps"], c["trace_positions"], f(c["seconds"]), f(c["trace_mib"], 1),
             f(c["peak_rss_mib"], 0)] for c in cells]
    fit, vs = d["time_fit"], d["memory_vs_floor"]
    return f"""## P5 — scaling with agents K and latent steps m

`{command('P5', out)}` — {machine_line(d['machine'])}

latent_mas inference on one chain_sum problem (batch 1, {d['new_tokens']} decoded tokens, EOS hidden), sequential
topologies of K agents (K-1 latent writers from planner, critic, refiner, verifier; then the judger). Time: median
of the grid walked forwards and backwards. Memory: separate child process with `MALLOC_MMAP_THRESHOLD_=65536`,
peak RSS increase over the RSS before the rollout; "KV trace" = exact bytes of the writers' trace.

![scaling]({os.path.relpath(out / 'scaling.png', DOC_DIR)})

{md_table(["K", "m", "trace positions", "seconds", "KV trace MiB", "peak RSS increase MiB"], rows)}

Least-squares fit: seconds ≈ {f(fit['intercept_s'])} + {f(fit['per_agent_s'], 3)}·K +
{f(fit['per_latent_step_s'], 4)}·(K−1)·m (max residual {f(fit['max_residual_s'])} s): each latent step costs about one
single-token forward, each agent one prompt prefill.
Memory against the bare-forward floor (K={vs['agents']}, m={vs['latent_steps']}, batch {vs['batch']}): peak RSS increase
{f(vs['ours_peak_mib'], 0)} MiB vs {f(vs['floor_peak_mib'], 0)} MiB (**{f(vs['ratio'])}x**; goal ≤ 1.3x {goal(vs['ratio'] <= 1.3)}),
for a final KV of {f(vs['final_kv_mib'], 0)} MiB.
"""


REFERENCE_PROBLEMS_PER_S = 0.061
"""LatentMAS's reference code on the same 16 GSM8K questions, m = 10, 256 new tokens, batch 8, one thread (issue 10)."""


def section_p6(d: dict[str, Any], out: Path) -> str:
    rows = [[r["batch"], f(r["problems_per_s"], 3), f(r["speedup_vs_batch_1"]), f(min(r["seconds"]), 1)]
            for r in d["results"]]
    lengths = sorted(d["generated_tokens"])
    same = "identical" if d["answers_identical"] else f"DIFFERENT at problems {d['mismatched_problems']}"
    best8 = max(r["problems_per_s"] for r in d["results"] if r["batch"] == 8)
    reference = (" --reference LatentMAS --reference-python .venv-reference/bin/python"
                 if d.get("reference") else "")
    return f"""## P6 — throughput of latent_mas on GSM8K, batch 1 vs 8, and against the LatentMAS reference

`{command('P6', out)}{reference}` — {machine_line(d['machine'])}

`System.run` of latent_mas (sequential topology, m={d['latent_steps']} latent steps per writer, greedy with EOS, up to
{d['max_new_tokens']} new tokens) on the first {d['problems']} GSM8K questions; answers of {lengths[0]} to {lengths[-1]}
tokens (median {lengths[len(lengths) // 2]}): decoding drops the rows that hit EOS, so a batch costs what its live
rows cost. {d['reps']} repetition(s), batch sizes in alternating order; absolute numbers move with the machine's load.

{md_table(["batch", "problems/s", "speedup vs batch 1", "fastest s"], rows)}

Answers at every batch size: {same} (max |NLL difference| {d['max_nll_diff']:.1e}, float32).
{_p6_goal(d, best8)}
"""


def _p6_goal(d: dict[str, Any], best8: float) -> str:
    ref = next((r for r in d.get("reference", []) if r["batch"] == 8), None)
    if ref is None:
        return f"""Goal (issue 10): >= 4x the LatentMAS reference's problems/s at batch 8. The reference was not run in this
run (`--reference`, see below); issue 10 recorded {REFERENCE_PROBLEMS_PER_S} problems/s for it against 0.175
for latent_mas at batch 8, side by side, one thread each (2.9x). This run's batch 8 is
{f(best8 / REFERENCE_PROBLEMS_PER_S)}x that recorded figure, at load average {d['machine']['loadavg_at_start']:.1f} at start
({_p6_condition(d['machine']['loadavg_at_start'])})."""
    tokens = statistics.median(ref["decoded_tokens"])
    ours_tokens = statistics.median(d["generated_tokens"])
    ratio = ref["ours_over_reference"]
    return f"""The LatentMAS reference (`benchmarks/reference_latentmas.py`: its own prompts and `run_batch`, greedy, left
padding; what is changed and why is in that file) ran in the same run on the same questions and model, at batch 8:
{f(ref['problems_per_s'], 3)} problems/s (median decoded tokens per problem {tokens:g}, ours {ours_tokens:g}).
Goal (issue 10): latent_mas >= 4x the reference's problems/s at batch 8: **{f(ratio)}x**, {goal(ratio >= 4)}."""


def _p6_condition(load: float) -> str:
    """How far this run's conditions match the recorded reference run (two one-thread jobs side by side)."""
    if load > 2.5:
        return "more load than the recorded run had: no ratio can be read, the goal is **not judged**"
    return ("about the recorded run's condition, one other one-thread job beside it; a ratio across sessions is "
            "indicative only, and a same-session reference run would be needed to judge the goal")


def section_p7(d: dict[str, Any], out: Path) -> str:
    rows = [[r["setting"] if r["concurrency"] is None else f"server, {r['concurrency']} client(s)",
             f(r["requests_per_s"], 3), f(r["p50_s"]), f(r["p95_s"]),
             f"**{f(r['vs_sequential'])}**" if r["concurrency"] == 8 else f(r["vs_sequential"]),
             f"{f(r['vs_sequential_range'][0])}-{f(r['vs_sequential_range'][1])}"] for r in d["results"]]
    best8 = next((r["vs_sequential"] for r in d["results"] if r["concurrency"] == 8), None)
    same = "identical" if d["answers_identical"] else f"DIFFERENT ({d['mismatches']})"
    busy = "; the machine's other core ran another job (load average above 1.5 at start)" \
        if d["machine"]["loadavg_at_start"] > 1.5 else ""
    verdict = "" if best8 is None else \
        f"\nGoal (issue 21): >= 2x the sequential requests/s at concurrency 8: {goal(best8 >= 2)} ({f(best8)}x)."
    return f"""## P7 — `diffmas serve` under concurrent clients vs sequential calls

`{command('P7', out)}` — {machine_line(d['machine'])}

latent_mas ({d['topology']} topology, m={d['latent_steps']} latent steps per writer, greedy with EOS, max_tokens
{d['max_tokens']}) answering {d['requests']} rg:chain_sum questions: sequentially in one process (`System.run` on one
question at a time), and through `diffmas serve` (its own process, `--max-batch {d['max_batch']}`,
`--batch-window-ms {d['batch_window_ms']:g}`) with 1, 4 or 8 clients each sending its next question when its answer
arrives (HTTP, JSON, the server's queue and batching included). Both sides run with the allocator settings of every
diffmas command and {d['machine']['threads']} torch thread(s) (`OMP_NUM_THREADS={d['machine']['threads']}`){busy}.
{d['reps']} repetition(s), settings in alternating order; latencies pooled over repetitions.

{md_table(["setting", "requests/s", "p50 latency s", "p95 latency s", "x sequential", "range"], rows)}

Answers: {same} to the sequential ones at every concurrency.{verdict}

With 8 clients the server answers 8 requests per rollout, so its gain is the rollout's own batch-8 gain (P1, P6) less
what a batch waits for its slowest row: single-token steps (latent steps, decoding) read the weights once for the
whole batch, but every request's four prompt prefills are compute-bound on a CPU thread and cost as much batched as
alone. A client's latency is its batch's time, so p50 grows with concurrency while requests/s does.
"""


def section_p8(d: dict[str, Any], out: Path) -> str:
    rows = [[threads, name, f(r["step_s"]), f(r["vs_glibc"]) if r["vs_glibc"] else "–", f(r["peak_rss_mib"], 0),
             f(r["held_rss_mib"], 0), f(r["minor_faults_per_step"] / 1e6, 2), f(r["system_s_per_step"])]
            for threads, by_name in sorted(d["summary"].items()) for name, r in by_name.items()]
    when = "; ".join(f"{t} thread(s): {r['machine']['date']}, load average at start "
                     f"{r['machine']['loadavg_at_start']:.2f}" for t, by_name in sorted(d["summary"].items())
                     for r in list(by_name.values())[:1])
    return f"""## P8 — the allocator policy: step time and resident memory

`python benchmarks/bench_allocator.py --out {os.path.relpath(out, ROOT)}` — {machine_line(d['machine'])}

A training step at the demo's settings (configs/train/demo.yaml, the library's own `train()`) under each allocator
policy (`DIFFMAS_MALLOC`, see `diffmas/memory.py`), each in {d['reps']} fresh process(es) per thread count, the
policies in alternating order; {d['steps']} steps per process, the first one warm-up. Step time = median over steps
and processes; peak RSS = the process's high-water mark (training, held-out evaluation and the final save
included); held RSS = resident memory at the end of the last step (after the policy's own step boundary).
Measured: {when}.

{md_table(["threads", "policy", "s / step", "vs glibc", "peak RSS MiB", "held RSS MiB", "minor faults / step (M)",
           "system CPU s / step"], rows)}
"""


def section_p9(d: dict[str, Any], out: Path) -> str:
    parts = [f"""## P9 — where a training step's time goes (diffmas vs single_sft)

`python benchmarks/profile_train_step.py --out {os.path.relpath(out, ROOT)}` — {machine_line(d['machine'])}

The library's own training step (rollout, backward, clipping, AdamW) at the demo's settings, diffmas against
single_sft in one process (glibc's allocator defaults), interleaved; then one step of each under torch.profiler,
self CPU time by operator family. Goal (issue 20): diffmas / single_sft <= 1.1 x the ratio of their positions per
row (no overhead beyond the extra positions)."""]
    for threads, by_precision in sorted(d["results"].items()):
        for precision, r in by_precision.items():
            fams = list(r["profile"]["diffmas"])
            rows = [[k, f(r["profile"]["diffmas"].get(k, 0)), f(r["profile"]["single_sft"].get(k, 0))] for k in fams]
            parts.append(f"""**{threads} thread(s), mixed precision {precision}** ({r['machine']['date']}, load average \
at start {f(r['machine']['loadavg_at_start'])}): diffmas {f(r['median']['diffmas'])} s, single_sft \
{f(r['median']['single_sft'])} s per step: **{f(r['ratio'])}x** for {f(r['positions_ratio'])}x the positions per row \
({f(r['positions_per_row']['diffmas'], 0)} vs {f(r['positions_per_row']['single_sft'], 0)}); goal <= \
{f(1.1 * r['positions_ratio'])}: {goal(r['goal_met'])}.

{md_table(["operator family (self CPU s, one step)", "diffmas", "single_sft"], rows)}""")
    return "\n\n".join(parts) + "\n"


def section_p10(d: dict[str, Any], out: Path) -> str:
    rows = [[arm, f(r["writer_prompt_tokens"], 1), r["shared_prefix"],
             *ratio_row(r, [])[:4]] for arm, r in d["results"].items()]
    evals = [ratio_row(r, [task])[:5] for task, r in d["inference"].items()]
    return f"""## P10 — the first writer's shared prompt prefix, prefilled once per batch

`python benchmarks/bench_shared_prefix.py --out {os.path.relpath(out, ROOT)}` — {machine_line(d['machine'])}

Every row of a batch starts its first writer's prompt with the same tokens (the chat template and the writer's
instructions); the rollout prefills that prefix once and gives its K/V to every row (`rollout._prefill_shared_prefix`;
tested in float64: training's loss and gradients, and inference's answers, NLLs and gold NLLs, equal those of
prefilling whole prompts; the prefix is embedded once). Timed: the library's own training step (rollout, backward,
clipping, AdamW) at the relay study's settings (batch 8, m = 6, LoRA r = 16, fp32), sharing the prefix against
prefilling whole prompts, interleaved, {d['reps']} paired repetitions after a warm-up; then an evaluation rollout the
same way (latent_mas on the relay topology, m = 6, latents only, batch {d['batch']}, {d['tokens']} tokens decoded per
row: the study's evaluation settings), where the prefix is copied into the trace's preallocated columns (P5). A
writer after the first has nothing to share (its prompt attends to a trace that differs per row); the final agent's
prompt attends to the trace too.

{md_table(["arm (relay study)", "writer prompt (mean tokens)", "shared prefix", "shared s", "whole s",
           "shared / whole", "range"], rows)}

{md_table(["evaluation rollout", "shared s", "whole s", "shared / whole", "range"], evals)}
"""


def section_p11(d: dict[str, Any], out: Path) -> str:
    rows = []
    for arm, r in d["results"].items():
        base = next(iter(r["seconds"]))
        for key, t in r["seconds"].items():
            wall, cpu = (r["ratio"][key]["wall"], r["ratio"][key]["cpu"]) if key in r["ratio"] else (None, None)
            rows.append([arm, key, f(statistics.mean(t["wall"]), 1),
                         "1" if wall is None else f"**{f(wall['ratio_of_medians'])}**",
                         "" if wall is None else f"{f(wall['min_ratio'])}-{f(wall['max_ratio'])}",
                         "1" if cpu is None else f(cpu["ratio_of_medians"]),
                         f"{abs(r['loss'][key] - r['loss'][base]):.1e}"])
    return f"""## P11 — the held-out loss at larger batches

`python benchmarks/bench_heldout.py --out {os.path.relpath(out, ROOT)}` — {machine_line(d['machine'])}

The library's held-out loss (`diffmas.train.loop.heldout_loss`: teacher-forced, no gradient, fp32) at the relay
study's settings (m = 6, latents only, LoRA r = 16) on the same {d['items']} validation items at several batch sizes,
interleaved, {d['reps']} paired repetitions after a warm-up. The study computes it at the training batch (8) on 200
items every 25 steps, which costs about 40-50% on top of the training steps' time (its report).

{md_table(["arm", "held-out batch", "wall s (mean)", "wall / batch 8", "range", "CPU / batch 8",
           "abs(loss - loss at batch 8)"], rows)}
"""


def section_gpu(gpu: Path) -> str:
    """The one-off GPU run (``scripts/gpu-checks.sh``), from the files it left in ``gpu``."""
    parts = []
    tests = gpu / "tests_cuda.txt"
    if tests.is_file():
        summary = [line for line in tests.read_text().splitlines() if " passed" in line or " failed" in line]
        parts.append(f"Equivalence tests on CUDA (`DIFFMAS_TEST_DEVICE=cuda`, five test files): "
                     f"`{summary[-1].strip() if summary else 'no summary line'}`.")
    machine = None
    probe = gpu / "cuda_sdpa.json"
    if probe.is_file():
        d = json.loads(probe.read_text())
        machine = d["machine"]
        shape = ", ".join(f"{k} {v}" for k, v in d["shape"].items())
        rows = [[r["dtype"], r["layout"], r["backend"], "yes" if r["ok"] else f"no ({r['error'][:40]})",
                 f(r["peak_mib"], 0) if r["ok"] else "", f(r["ms"]) if r["ok"] else "",
                 f"{r['max_rel_err_vs_float64']:.1e}" if r["ok"] else ""] for r in d["results"]]
        parts.append(f"Which SDPA kernels take a wide segment with a padding mask, forward + backward "
                     f"(`benchmarks/probe_cuda_sdpa.py`; {shape}): `repeat_kv` copies K/V per query head as "
                     f"transformers does, `grouped` passes `enable_gqa=True`.\n\n"
                     + md_table(["dtype", "layout", "backend", "runs", "peak MiB above inputs", "fwd+bwd ms",
                                 "max rel. error vs float64"], rows))
    for folder, model in ((gpu, "random-weight copy of the embedded model"),
                          (gpu / "large", "random weights in Qwen3-8B's layer shapes")):
        for name, key in (("rollout.json", "P1"), ("train_step.json", "P3"), ("memory.json", "P4")):
            path = folder / name
            if path.is_file():
                d = json.loads(path.read_text())
                machine = machine or d["machine"]
                body = SECTIONS[key](d, folder).split("\n", 3)[3]  # the section without its CPU heading and command
                parts.append(f"**{key} on the GPU** ({model}, {d.get('dtype', 'float32')}):\n{body}")
    if not parts:
        return ""
    head = "## On a GPU (one-off run)\n\n`bash scripts/gpu-checks.sh OUT` — "
    if machine:
        head += (f"{machine.get('gpu', 'GPU')}, host {machine['cpu']} ({machine['cores']} cores), torch "
                 f"{machine['torch']}, transformers {machine['transformers']}, {machine['date']}. ")
    head += f"Files: `{os.path.relpath(gpu, DOC_DIR)}/`; what they mean is discussed below (\"On the GPU\")."
    return "\n\n".join([head, *parts]) + "\n"


SECTIONS = {"P1": section_p1, "P2": section_p2, "P3": section_p3, "P4": section_p4, "P5": section_p5,
            "P6": section_p6, "P7": section_p7, "P8": section_p8, "P9": section_p9, "P10": section_p10,
            "P11": section_p11}


def render(out: Path, doc: Path, notes: Path) -> None:
    global DOC_DIR
    DOC_DIR = doc.resolve().parent
    parts = ["# Benchmarks\n",
             "Generated by `python benchmarks/run_all.py --out docs/benchmarks` (the numbers below come from the JSONs in "
             "`docs/benchmarks/`). Every ratio is measured in one run with the two sides interleaved (A B, B A, ...) "
             "and is the median of per-repetition ratios: the machine is shared, so absolute seconds move with other "
             "people's load while interleaved ratios mostly do not. Absolute times are for scale only.\n"]
    for key, fn in SECTIONS.items():
        path = out / f"{JSONS[key]}.json"
        parts.append(fn(json.loads(path.read_text()), out.resolve()) if path.is_file() else f"## {key}\n\n(not run)\n")
    if (out / "gpu").is_dir():
        parts.append(section_gpu(out / "gpu"))
    if notes.is_file():  # hand-written analysis: where goals are missed and why, inefficiencies found
        parts.append(notes.read_text())
    doc.write_text("\n".join(parts))
    print(f"wrote {doc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=list(BENCHES))
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--reference", type=Path,
                   help="a checkout of Gen-Verse/LatentMAS, timed beside latent_mas in P6 (bench_throughput.py)")
    p.add_argument("--reference-python", help="the Python of the reference's environment (scripts/reference-env.sh)")
    args = p.parse_args()
    if not args.render_only:
        for key in args.only or list(BENCHES):
            cmd = [sys.executable, str(HERE / BENCHES[key]), "--out", str(args.out), "--threads", str(args.threads)]
            cmd += ["--quick"] if args.quick else []
            if key == "P6" and args.reference:
                cmd += ["--reference", str(args.reference)]
                cmd += ["--reference-python", args.reference_python] if args.reference_python else []
            print(f"\n=== {key}: {' '.join(cmd)}", flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(f"=== {key} took {time.perf_counter() - start:.0f} s", flush=True)
    render(args.out, args.doc, HERE / "NOTES.md")


if __name__ == "__main__":
    main()

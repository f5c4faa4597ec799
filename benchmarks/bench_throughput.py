"""python benchmarks/bench_throughput.py --out docs/benchmarks   (P6: latent_mas throughput, batch 1 vs 8, GSM8K)

problems/s of the real system (``System.run``: sequential topology, 3 latent writers with m latent steps each, then
the judger decodes greedily with EOS honoured, up to ``--new-tokens``) on the first ``--problems`` GSM8K questions
(offline), at batch 1 and batch 8. GSM8K answers differ a lot in length, so this is where decoding with batch
compaction (rows that hit EOS leave the batch) shows: a batch costs what its live rows cost. The batch sizes
alternate order per repetition (A B, B A, ...); absolute numbers move with the machine's load.

Check: the answers at batch 8 are the answers at batch 1, token for token (batch invariance).
"""

from __future__ import annotations

import statistics
from typing import Any

from _common import load, machine, parser, setup, table, timed, write_json
from diffmas.decode import DecodeConfig
from diffmas.systems import build_system


def gsm8k_prompts(n: int) -> list[str]:
    from diffmas.tasks import get_task

    task = get_task("gsm8k")
    return [task.prompt(ex) for ex in task.load(n)]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.problems, args.latent_steps, args.new_tokens = min(args.problems, 4), min(args.latent_steps, 2), \
            min(args.new_tokens, 16)
    setup(args.threads)
    backbone = load(args.model, args.device)
    prompts = gsm8k_prompts(args.problems)
    system = build_system("latent_mas", backbone, topology="sequential", latent_steps=args.latent_steps)
    cfg = DecodeConfig(max_new_tokens=args.new_tokens)
    system.run(prompts[:2], DecodeConfig(max_new_tokens=2), batch_size=2)  # warm-up: realigner, kernels

    seconds: dict[int, list[float]] = {b: [] for b in args.batches}
    records: dict[int, list[dict]] = {}
    for rep in range(args.reps):
        for b in args.batches if rep % 2 == 0 else args.batches[::-1]:
            took, _, records[b] = timed(lambda: system.run(prompts, cfg, batch_size=b), args.device)
            seconds[b].append(took)
    base = args.batches[0]
    mismatches = [i for b in args.batches[1:] for i, (x, y) in enumerate(zip(records[base], records[b]))
                  if x["answer"] != y["answer"] or x["generated_tokens"] != y["generated_tokens"]]
    nll_diff = max((abs(x["nll_sum"] - y["nll_sum"]) for b in args.batches[1:]
                    for x, y in zip(records[base], records[b])), default=0.0)
    lengths = [r["generated_tokens"] for r in records[base]]
    rows: list[dict[str, Any]] = []
    for b in args.batches:
        med = statistics.median(seconds[b])
        rows.append({"batch": b, "seconds": seconds[b], "problems_per_s": len(prompts) / med,
                     "speedup_vs_batch_1": statistics.median(seconds[base]) / med})
    print(f"\nP6 latent_mas throughput, {len(prompts)} GSM8K problems, m={args.latent_steps}, "
          f"max_new_tokens={args.new_tokens} with EOS ({args.threads} thread(s))")
    print(table(["batch", "problems/s", "speedup vs batch 1", "s (median)"],
                [[r["batch"], r["problems_per_s"], r["speedup_vs_batch_1"], statistics.median(r["seconds"])]
                 for r in rows]))
    print(f"generated tokens per problem: min {min(lengths)}, median {statistics.median(lengths)}, max {max(lengths)}")
    print(f"answers identical at every batch size: {not mismatches} (max |NLL diff| {nll_diff:.1e})")
    write_json(args.out, "throughput", {
        "machine": machine(args.threads, args.device), "problems": len(prompts), "latent_steps": args.latent_steps,
        "max_new_tokens": args.new_tokens, "reps": args.reps, "results": rows, "generated_tokens": lengths,
        "answers_identical": not mismatches, "mismatched_problems": mismatches, "max_nll_diff": nll_diff})
    assert not mismatches, f"answers differ between batch sizes at problems {mismatches}"


if __name__ == "__main__":
    main()

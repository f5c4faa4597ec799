"""python benchmarks/bench_tokens.py --out docs/benchmarks   (P2: decoded tokens and time, latent_mas vs text_mas)

Both systems run the sequential topology (planner, critic, refiner, judger) on the same rg:chain_sum evaluation
problems, through the public ``System.run`` path (greedy, EOS honoured), with the same final ``max_new_tokens``.
latent_mas writers take m latent steps (no token decoded); text_mas writers each decode up to
``--writer-tokens`` tokens of text into the trace. Counted per problem: every token the system DECODED (all
agents); latent steps are reported beside them, since they cost a forward each but produce no token.

Time is interleaved per batch: batch 1 runs latent then text, batch 2 text then latent, and so on; the time ratio
is the median over batches of text/latent. Goal: latent_mas decodes >= 70% fewer tokens.
"""

from __future__ import annotations

import statistics
from typing import Any

from _common import load, machine, parser, setup, table, timed, write_json
from diffmas.decode import DecodeConfig
from diffmas.systems import build_system
from diffmas.tasks import get_task


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--writer-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48, help="final agent's max_new_tokens (both systems)")
    args = p.parse_args()
    setup(args.threads)
    n = 8 if args.quick else args.problems
    backbone = load(args.model, args.device, args.dtype)
    task = get_task("rg:chain_sum")
    examples = task.load(limit=n)
    systems = {
        "latent_mas": build_system("latent_mas", backbone, topology="sequential", latent_steps=args.latent_steps),
        "text_mas": build_system("text_mas", backbone, topology="sequential", writer_max_new_tokens=args.writer_tokens),
    }
    cfg = DecodeConfig(max_new_tokens=args.new_tokens)
    systems["latent_mas"].run([task.prompt(examples[0])], cfg, batch_size=1)  # warm-up (realignment matrix)

    # Grouped by prompt length, as System.run would; each group is one rollout per system.
    order = sorted(range(n), key=lambda i: len(task.prompt(examples[i])))
    groups = [order[i: i + args.batch] for i in range(0, n, args.batch)]
    records: dict[str, dict[int, dict]] = {name: {} for name in systems}
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for g, idx in enumerate(groups):
        for name in names if g % 2 == 0 else names[::-1]:
            took, _, recs = timed(lambda: systems[name].run([task.prompt(examples[i]) for i in idx], cfg,
                                                            batch_size=args.batch))
            seconds[name].append(took)
            records[name].update(zip(idx, recs))

    stats: dict[str, dict[str, Any]] = {}
    for name, recs in records.items():
        per = [recs[i] for i in range(n)]
        decoded = [sum(a["generated_tokens"] for a in r["agents"]) for r in per]
        grades = [task.grade(examples[i], recs[i]["answer"]) for i in range(n)]
        stats[name] = {
            "decoded_tokens_per_problem": statistics.mean(decoded),
            "final_answer_tokens_per_problem": statistics.mean(r["generated_tokens"] for r in per),
            "writer_tokens_per_problem": statistics.mean(d - r["generated_tokens"] for d, r in zip(decoded, per)),
            "latent_steps_per_problem": sum(a["latent_steps"] for a in per[0]["agents"]),
            "trace_positions_per_problem": statistics.mean(r["trace_tokens"] for r in per),
            "seconds_per_problem": sum(seconds[name]) / n,
            "batch_seconds": seconds[name],
            "accuracy": sum(g.correct for g in grades) / n,
            "format_ok": sum(g.format_ok for g in grades) / n,
        }
    lat, txt = stats["latent_mas"], stats["text_mas"]
    fewer = 1 - lat["decoded_tokens_per_problem"] / txt["decoded_tokens_per_problem"]
    time_ratios = [t / l for t, l in zip(seconds["text_mas"], seconds["latent_mas"])]
    summary = {"fewer_tokens_pct": 100 * fewer, "time_ratio_text_over_latent": statistics.median(time_ratios),
               "time_ratio_per_batch": time_ratios}

    print(f"\nP2 latent_mas vs text_mas, {n} rg:chain_sum problems, sequential, batch {args.batch}, "
          f"final max_new_tokens={args.new_tokens}, text writers <= {args.writer_tokens} tokens, m={args.latent_steps} "
          f"({args.threads} thread(s))")
    print(table(["system", "decoded tokens/problem", "of which writers", "final answer", "latent steps/problem",
                 "trace positions read by judger", "s/problem", "accuracy (n=%d)" % n, "format ok"],
                [[name, s["decoded_tokens_per_problem"], s["writer_tokens_per_problem"],
                  s["final_answer_tokens_per_problem"], s["latent_steps_per_problem"],
                  s["trace_positions_per_problem"], s["seconds_per_problem"], s["accuracy"], s["format_ok"]]
                 for name, s in stats.items()]))
    print(f"latent_mas decodes {summary['fewer_tokens_pct']:.1f}% fewer tokens; text_mas/latent_mas time "
          f"{summary['time_ratio_text_over_latent']:.2f}x (median over {len(groups)} interleaved batches)")
    write_json(args.out, "tokens", {"machine": machine(args.threads, args.device), "goal": ">= 70% fewer tokens",
                                    "problems": n, "batch": args.batch, "latent_steps": args.latent_steps,
                                    "writer_max_new_tokens": args.writer_tokens, "max_new_tokens": args.new_tokens,
                                    "systems": stats, **summary})


if __name__ == "__main__":
    main()

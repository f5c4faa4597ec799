"""python benchmarks/bench_throughput.py --out docs/benchmarks   (P6: latent_mas throughput, batch 1 vs 8, GSM8K)

problems/s of the real system (``System.run``: sequential topology, 3 latent writers with m latent steps each, then
the judger decodes greedily with EOS honoured, up to ``--new-tokens``) on the first ``--problems`` GSM8K questions
(offline), at batch 1 and batch 8. GSM8K answers differ a lot in length, so this is where decoding with batch
compaction (rows that hit EOS leave the batch) shows: a batch costs what its live rows cost. The batch sizes
alternate order per repetition (A B, B A, ...); absolute numbers move with the machine's load.

Check: the answers at batch 8 are the answers at batch 1, token for token (batch invariance).

With ``--reference DIR`` (a checkout of github.com/Gen-Verse/LatentMAS) the reference code runs on the same
questions and model in the same run, interleaved with ours (``reference_latentmas.py``, one subprocess per timing;
``--reference-python`` for its environment, see scripts/reference-env.sh), and the goal's ratio is ours/reference
at batch 8, with decoded tokens per problem on both sides.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import load, machine, parser, setup, table, timed, write_json
from diffmas.decode import DecodeConfig
from diffmas.systems import build_system
from diffmas.tasks import get_task


class Reference:
    """Runs the reference code on the same questions and model, one subprocess per timed run."""

    def __init__(self, args, examples: list, scratch: Path):
        from diffmas.assets import resolve_model

        self.args, self.scratch = args, scratch
        self.questions = scratch / "questions.json"
        self.questions.write_text(json.dumps([{"question": ex.question, "gold": ex.answer} for ex in examples]))
        self.model_dir = resolve_model(args.model)

    def run(self, batch: int) -> dict[str, Any]:
        out = self.scratch / f"reference_b{batch}.json"
        cmd = [self.args.reference_python, str(Path(__file__).with_name("reference_latentmas.py")),
               "--reference-dir", str(self.args.reference), "--model-dir", self.model_dir,
               "--questions", str(self.questions), "--batch", str(batch), "--threads", str(self.args.threads),
               "--latent-steps", str(self.args.latent_steps), "--new-tokens", str(self.args.new_tokens),
               "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads))
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"the reference run failed (batch {batch}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--reference", type=Path, help="a checkout of Gen-Verse/LatentMAS: time it in the same run")
    p.add_argument("--reference-python", default=sys.executable,
                   help="the Python of the reference's environment (scripts/reference-env.sh makes one)")
    p.add_argument("--reference-batches", type=int, nargs="+", default=[8])
    args = p.parse_args()
    if args.quick:
        args.problems, args.latent_steps, args.new_tokens = min(args.problems, 4), min(args.latent_steps, 2), \
            min(args.new_tokens, 16)
    setup(args.threads)
    backbone = load(args.model, args.device, args.dtype)
    task = get_task("gsm8k")
    examples = task.load(args.problems)
    prompts = [task.prompt(ex) for ex in examples]
    scratch = tempfile.TemporaryDirectory(prefix="p6-reference-")  # removed when the script ends
    reference = Reference(args, examples, Path(scratch.name)) if args.reference else None
    system = build_system("latent_mas", backbone, topology="sequential", latent_steps=args.latent_steps)
    cfg = DecodeConfig(max_new_tokens=args.new_tokens)
    system.run(prompts[:2], DecodeConfig(max_new_tokens=2), batch_size=2)  # warm-up: realigner, kernels

    seconds: dict[int, list[float]] = {b: [] for b in args.batches}
    records: dict[int, list[dict]] = {}
    ref_runs: dict[int, list[dict]] = {b: [] for b in args.reference_batches} if reference else {}
    runs = [("ours", b) for b in args.batches] + [("reference", b) for b in ref_runs]
    for rep in range(args.reps):
        for side, b in runs if rep % 2 == 0 else runs[::-1]:
            if side == "reference":
                ref_runs[b].append(reference.run(b))
                continue
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
    ref_rows = []
    for b, done in ref_runs.items():
        ref_s = statistics.median(r["seconds"] for r in done)
        ours = next((r for r in rows if r["batch"] == b), None)
        ref_rows.append({"batch": b, "seconds": [r["seconds"] for r in done], "problems_per_s": len(prompts) / ref_s,
                         "decoded_tokens": done[0]["decoded_tokens"], "transformers": done[0].get("transformers"),
                         "ours_over_reference": ours and ours["problems_per_s"] * ref_s / len(prompts)})
        print(f"reference at batch {b}: {len(prompts) / ref_s:.3f} problems/s, decoded tokens per problem median "
              f"{statistics.median(done[0]['decoded_tokens'])}; ours/reference "
              f"{ref_rows[-1]['ours_over_reference'] or float('nan'):.2f}x")
    write_json(args.out, "throughput", {
        "machine": machine(args.threads, args.device), "problems": len(prompts), "latent_steps": args.latent_steps,
        "max_new_tokens": args.new_tokens, "reps": args.reps, "results": rows, "generated_tokens": lengths,
        "answers_identical": not mismatches, "mismatched_problems": mismatches, "max_nll_diff": nll_diff,
        "reference": ref_rows})
    assert not mismatches, f"answers differ between batch sizes at problems {mismatches}"


if __name__ == "__main__":
    main()

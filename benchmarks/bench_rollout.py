"""python benchmarks/bench_rollout.py --out docs/benchmarks   (P1: rollout overhead vs a bare-forward floor)

latent_mas inference (sequential topology: 3 latent writers + a judger that decodes) against the FLOOR: the same
model forwards with no orchestration at all, i.e. plain ``body(...)`` calls on one persistent DynamicCache with
the same segment shapes (each agent's left-padded prompt width), the same number of single-token latent steps
(fed random embeddings, so no realignment), and the same number of decode steps with the LM head on the last
position only and greedy argmax. The floor passes no attention mask and no position ids, so everything the library
adds (trace bookkeeping, masks and positions for batch invariance, realignment, chat rendering, per-step NLL and
EOS/stop checks) counts as overhead. EOS is hidden from the decoder so both sides decode exactly the same count.

Goal: ours / floor <= 1.15. Also: problems/s of latent_mas (``System.run``, EOS honoured) at batch 1, 4, 8.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from transformers import DynamicCache

from _common import (chain_sum_prompts, compare, fixed_length, interleaved, load, machine, parser, setup, table,
                     timed, write_json)
from diffmas.backbone import Backbone
from diffmas.decode import DecodeConfig
from diffmas.positions import left_pad
from diffmas.prompts import Topology, load_topology, render_agent
from diffmas.rollout import RolloutSpec, rollout
from diffmas.systems import build_system


def segment_ids(backbone: Backbone, topology: Topology, prompts: list[str]) -> list[torch.Tensor]:
    """Each agent's left-padded prompt ids, exactly as the rollout renders them (same widths)."""
    return [left_pad([render_agent(backbone.tokenizer, a, p) for p in prompts], backbone.pad_id, backbone.device)[0]
            for a in topology.agents]


def make_floor(backbone: Backbone, segments: list[torch.Tensor], latent_steps: int, new_tokens: int):
    """The bare-forward floor for one rollout shape (see module docstring)."""
    body, head = backbone.body, backbone.lm.get_output_embeddings()
    batch, dim = segments[0].shape[0], backbone.lm.config.hidden_size
    # Drawn once, outside the timed region: the floor measures forwards, not the RNG.
    latents = torch.randn(len(segments) - 1, latent_steps, batch, 1, dim, device=backbone.device,
                          dtype=backbone.dtype) * 0.02

    @torch.no_grad()
    def run() -> None:
        cache = DynamicCache()
        for w, ids in enumerate(segments[:-1]):
            body(input_ids=ids, cache=cache, use_cache=True)
            for s in range(latent_steps):
                body(inputs_embeds=latents[w, s], cache=cache, use_cache=True)
        hidden = body(input_ids=segments[-1], cache=cache, use_cache=True).last_hidden_state[:, -1]
        # Same count as decode(): new_tokens LM-head calls, new_tokens - 1 forwards (the last token is not fed back).
        for step in range(new_tokens):
            token = head(hidden).argmax(-1)
            if step == new_tokens - 1:
                break
            hidden = body(input_ids=token[:, None], cache=cache, use_cache=True).last_hidden_state[:, -1]

    return run


def overhead(backbone: Backbone, prompts: list[str], latent_steps: int, new_tokens: int, reps: int) -> dict[str, Any]:
    topology = load_topology("sequential")
    fixed = fixed_length(backbone)
    spec = RolloutSpec(topology, "latent", latent_steps=latent_steps)
    cfg = DecodeConfig(max_new_tokens=new_tokens)

    def ours() -> None:
        result = rollout(fixed, spec, prompts, decode_cfg=cfg)
        assert all(len(t) == new_tokens for t in result.tokens), "decode length differs from the floor's"

    floor = make_floor(backbone, segment_ids(backbone, topology, prompts), latent_steps, new_tokens)
    times = interleaved({"ours": ours, "floor": floor}, reps, device=backbone.device)
    return {"batch": len(prompts), "latent_steps": latent_steps, "new_tokens": new_tokens, "seconds": times,
            "ratio": compare(times, "ours", "floor")}


def throughput(backbone: Backbone, prompts: list[str], batches: list[int], latent_steps: int, new_tokens: int,
               reps: int) -> list[dict[str, Any]]:
    """problems/s of the real system (EOS honoured, prompts grouped by length as System.run does)."""
    system = build_system("latent_mas", backbone, topology="sequential", latent_steps=latent_steps)
    cfg = DecodeConfig(max_new_tokens=new_tokens)
    system.run(prompts[:2], cfg, batch_size=2)  # warm-up
    seconds: dict[int, list[float]] = {b: [] for b in batches}
    tokens: dict[int, float] = {}
    for rep in range(reps):  # batch sizes alternate order per repetition, as in interleaved()
        for b in batches if rep % 2 == 0 else batches[::-1]:
            took, _, records = timed(lambda: system.run(prompts, cfg, batch_size=b), backbone.device)
            seconds[b].append(took)
            tokens[b] = statistics.mean(r["generated_tokens"] for r in records)
    base = statistics.median(seconds[batches[0]])
    return [{"batch": b, "problems": len(prompts), "seconds": seconds[b],
             "problems_per_s": len(prompts) / statistics.median(seconds[b]),
             "speedup_vs_batch_1": base / statistics.median(seconds[b]),
             "mean_generated_tokens": tokens[b]} for b in batches]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--throughput-reps", type=int, default=1)
    args = p.parse_args()
    setup(args.threads)
    reps = 3 if args.quick else args.reps
    backbone = load(args.model, args.device, args.dtype)
    prompts = chain_sum_prompts(8)

    rows, results = [], []
    for batch, n_reps in ((1, reps), (4, max(3, reps // 2))):
        res = overhead(backbone, prompts[:batch], args.latent_steps, args.new_tokens, n_reps)
        results.append(res)
        wall, cpu = res["ratio"]["wall"], res["ratio"]["cpu"]
        rows.append([batch, args.latent_steps, args.new_tokens, wall["median_a"], wall["median_b"],
                     wall["median_of_ratios"], f"{wall['min_ratio']:.2f}-{wall['max_ratio']:.2f}",
                     cpu["median_of_ratios"], wall["reps"]])
    print(f"\nP1 latent_mas rollout vs bare-forward floor ({args.threads} thread(s), interleaved)")
    print(table(["batch", "m", "decode tokens", "ours s", "floor s", "ours/floor wall", "wall range",
                 "ours/floor CPU", "reps"], rows))

    tp = throughput(backbone, prompts, [1, 4, 8], args.latent_steps, 48, 1 if args.quick else args.throughput_reps)
    print(f"\nP1 latent_mas throughput, {len(prompts)} rg:chain_sum problems, m={args.latent_steps}, "
          "max_new_tokens=48 with EOS")
    print(table(["batch", "problems/s", "speedup vs batch 1", "mean generated tokens"],
                [[t["batch"], t["problems_per_s"], t["speedup_vs_batch_1"], t["mean_generated_tokens"]] for t in tp]))
    write_json(args.out, "rollout", {"machine": machine(args.threads, args.device), "goal": "ours/floor <= 1.15",
                                     "overhead": results, "throughput": tp})


if __name__ == "__main__":
    main()

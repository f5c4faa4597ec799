"""python benchmarks/bench_train_step.py --out docs/benchmarks   (P3: one diffmas training step vs a one-forward floor)

One diffmas training step (coupled gradients, one shared LoRA, sequential topology: 3 latent writers + a judger
teacher-forced on its target, m latent steps per writer) against the FLOOR: one forward + backward of the same
model (same LoRA) over the concatenated trajectory. Each floor row holds exactly the rollout's layout: every
agent's left-padded prompt segment (same widths, same pad positions masked out), m random input embeddings after
each writer's prompt, and the judger's prompt + target; one ``body`` forward on ``inputs_embeds`` with that
attention mask, the LM head on target positions only, summed cross-entropy / target count, backward.
Timed: forward + backward (the optimizer step is the same on both sides and is left out of both).

Goal: ours / floor <= 1.3. The latent steps cannot be one forward (step t+1's input is step t's last hidden
state), so ours runs 3*m single-token forwards (and their backwards) where the floor runs none; the benchmark also
measures m = 0, where both sides process identical tokens, to separate the cost of the trace (segmented prefill
over a growing KV cache) from the cost of the sequential latent steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from _common import compare, interleaved, load, machine, parser, setup, table, write_json
from diffmas.adapters import LoraSettings, attach_lora, trainable_parameters
from diffmas.backbone import Backbone
from diffmas.kv import joined_attention
from diffmas.positions import left_pad
from diffmas.prompts import Topology, load_topology, render_agent, render_target
from diffmas.rollout import RolloutSpec, rollout
from diffmas.tasks import get_task
from diffmas.tasks.rg import training_examples


def training_batch(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` rg:chain_sum training (prompt, answer-only target) pairs."""
    task = get_task("rg:chain_sum")
    examples = training_examples("chain_sum", n, seed, "answer", set())
    return [task.prompt(ex) for ex in examples], [ex.target or "" for ex in examples]


def trajectory_layout(backbone: Backbone, topology: Topology, prompts: list[str], targets: list[str],
                      latent_steps: int) -> tuple[list[torch.Tensor | int], torch.Tensor, torch.Tensor]:
    """The rollout's padded layout as one sequence per row.

    Returns (pieces, mask [B, T], labels [B, T]) where ``pieces`` lists token-id blocks [B, W] and ints (a run of
    that many latent positions), in trace order.
    """
    tok, pad, device = backbone.tokenizer, backbone.pad_id, backbone.device
    pieces: list[torch.Tensor | int] = []
    masks: list[torch.Tensor] = []
    batch = len(prompts)
    for agent in topology.writers:
        ids, mask = left_pad([render_agent(tok, agent, p) for p in prompts], pad, device)
        pieces.append(ids)
        masks.append(mask)
        if latent_steps:
            pieces.append(latent_steps)
            masks.append(torch.ones(batch, latent_steps, dtype=torch.long, device=device))
    final = [render_agent(tok, topology.final, p) for p in prompts]
    target = [render_target(tok, t) for t in targets]
    ids, mask = left_pad([p + t for p, t in zip(final, target)], pad, device)
    pieces.append(ids)
    masks.append(mask)
    full_mask = torch.cat(masks, 1)
    labels = torch.full_like(full_mask, -100)
    for row, tgt in enumerate(target):
        labels[row, full_mask.shape[1] - len(tgt):] = torch.tensor(tgt, device=device)
    return pieces, full_mask, labels


def make_floor(backbone: Backbone, topology: Topology, prompts: list[str], targets: list[str], latent_steps: int):
    pieces, mask, labels = trajectory_layout(backbone, topology, prompts, targets, latent_steps)
    dim = backbone.lm.config.hidden_size
    latents = [torch.randn(len(prompts), p, dim, device=backbone.device, dtype=backbone.dtype) * 0.02
               for p in pieces if isinstance(p, int)]
    n_target = int((labels != -100).sum())

    def step() -> torch.Tensor:
        """The floor's loss (call ``.backward()`` on it)."""
        lat = iter(latents)
        embeds = torch.cat([next(lat) if isinstance(p, int) else backbone.embed(p) for p in pieces], 1)
        hidden = backbone.body(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        targets_ = labels[:, 1:]
        keep = targets_ != -100
        logits = backbone.logits(hidden[:, :-1][keep])
        return F.cross_entropy(logits, targets_[keep], reduction="sum") / n_target

    return step, int(mask.shape[1])


def compare_step(backbone: Backbone, roles: dict[str, str], prompts: list[str], targets: list[str],
                 latent_steps: int, reps: int) -> dict[str, Any]:
    topology = load_topology("sequential")
    spec = RolloutSpec(topology, "latent", latent_steps=latent_steps, adapters=roles)
    params = trainable_parameters(backbone)

    def zero() -> None:
        for p in params:
            p.grad = None

    def ours() -> None:
        zero()
        rollout(backbone, spec, prompts, targets=targets, grad_mode="coupled").loss.backward()

    def joined() -> None:  # the same step with the cache joined as transformers does (a copy per latent step)
        with joined_attention():
            ours()

    floor_step, width = make_floor(backbone, topology, prompts, targets, latent_steps)

    def floor() -> None:
        zero()
        floor_step().backward()

    sides = {"ours": ours, "floor": floor} | ({"joined": joined} if latent_steps else {})
    times = interleaved(sides, reps, device=backbone.device)
    return {"latent_steps": latent_steps, "batch": len(prompts), "positions_per_row": width, "seconds": times,
            "ratio": compare(times, "ours", "floor"),
            "joined_over_ours": compare(times, "joined", "ours") if latent_steps else None}


def step_args(doc: str | None) -> Any:
    """The options of a latent-step benchmark (batch, m, repetitions), parsed, with torch set up."""
    p = parser(doc)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    setup(args.threads)
    return args


def main() -> None:
    args = step_args(__doc__)
    reps = 2 if args.quick else args.reps
    backbone = load(args.model, args.device, args.dtype)
    topology = load_topology("sequential")
    roles = attach_lora(backbone, LoraSettings(), [a.role for a in topology.agents])  # shared, r=16, all projections
    backbone.model.train()
    prompts, targets = training_batch(args.batch)

    results = [compare_step(backbone, roles, prompts, targets, m, reps) for m in (0, args.latent_steps)]
    rows = []
    for res in results:
        wall, cpu = res["ratio"]["wall"], res["ratio"]["cpu"]
        rows.append([res["latent_steps"], res["batch"], res["positions_per_row"], wall["median_a"], wall["median_b"],
                     wall["median_of_ratios"], f"{wall['min_ratio']:.2f}-{wall['max_ratio']:.2f}",
                     cpu["median_of_ratios"], wall["reps"]])
    print(f"\nP3 diffmas training step (coupled, shared LoRA, sequential) vs one fwd+bwd floor "
          f"({args.threads} thread(s), interleaved)")
    print(table(["m", "batch", "positions/row", "ours s", "floor s", "ours/floor wall", "wall range",
                 "ours/floor CPU", "reps"], rows))
    j = results[-1]["joined_over_ours"]["wall"]
    print(f"joined cache / split (ours) at m={args.latent_steps}: {j['median_of_ratios']:.2f} "
          f"({j['min_ratio']:.2f}-{j['max_ratio']:.2f})")
    write_json(args.out, "train_step", {"machine": machine(args.threads, args.device), "goal": "ours/floor <= 1.3",
                                        "results": results})


if __name__ == "__main__":
    main()

"""python benchmarks/bench_heldout.py --out docs/benchmarks   (P11: the held-out loss at larger batches)

A run whose budget is set by its held-out loss (the relay study: 200 validation items every 25 steps) spends about
half as long on those evaluations as on its training steps, computed at the training batch (8). Forward-only, with
no activations kept, a held-out batch can be wider: the single-token latent steps then read every weight once for
more rows. This times the library's own held-out loss (`diffmas.train.loop.heldout_loss`, the study's config:
`diffmas.experiments.relay.train_config`, m = 6, LoRA r = 16, fp32) on the same items at several batch sizes,
interleaved, and reports each against batch 8 (wall and this process's CPU time, which another job on the machine
disturbs less) with the difference in the loss (the token mean does not depend on the batch:
tests/test_relay.py checks it to float32 rounding on a tiny model).
"""

from __future__ import annotations

from typing import Any

from _common import compare, interleaved, machine, parser, setup, table, write_json
from diffmas.backbone import load_backbone
from diffmas.experiments.relay import Arm, RelayConfig, train_config
from diffmas.train.data import build_datasets
from diffmas.train.loop import TrajectoryLoss, attach_trainable, heldout_loss


def make_heldout(arm: Arm, items: int):
    """A function computing ``arm``'s held-out loss on ``items`` validation items at a given batch size."""
    cfg = train_config(arm, RelayConfig())
    _, heldout = build_datasets(cfg, cfg.batch_size)
    backbone = load_backbone(cfg.model.name, "cpu", cfg.model.dtype)
    module = TrajectoryLoss(backbone, attach_trainable(backbone, cfg), cfg)
    return lambda batch: heldout_loss(module, heldout[:items], batch, cfg)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--items", type=int, default=64, help="validation items per evaluation")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--arms", nargs="+", default=["coupled:relay:digits"], help="name:task of relay study arms")
    args = p.parse_args()
    setup(args.threads)
    results: dict[str, Any] = {}
    rows = []
    base = f"batch {args.batches[0]}"
    for spec in args.arms:
        name, task = spec.split(":", 1)
        arm = Arm(name, task)
        loss_at = make_heldout(arm, args.items)
        losses: dict[str, float] = {}

        def run(batch: int):
            def fn() -> None:
                losses[f"batch {batch}"] = loss_at(batch)
            return fn

        times = interleaved({f"batch {b}": run(b) for b in args.batches}, 1 if args.quick else args.reps)
        ratios = {key: compare(times, key, base) for key in times if key != base}
        results[arm.id] = {"seconds": times, "ratio": ratios, "loss": losses}
        for key in times:
            wall, cpu = (ratios[key]["wall"], ratios[key]["cpu"]) if key in ratios else (None, None)
            rows.append([arm.id, key, f"{sum(times[key]['wall']) / len(times[key]['wall']):.1f}",
                         "1" if wall is None else f"**{wall['ratio_of_medians']:.2f}**",
                         "" if wall is None else f"{wall['min_ratio']:.2f}-{wall['max_ratio']:.2f}",
                         "1" if cpu is None else f"{cpu['ratio_of_medians']:.2f}",
                         f"{abs(losses[key] - losses[base]):.1e}"])
        print(table(["arm", "held-out batch", "wall s (mean)", f"wall / {base}", "range of paired ratios",
                     f"CPU / {base}", f"abs(loss - loss at {base})"], rows))
    write_json(args.out, "heldout", {"machine": machine(args.threads), "reps": args.reps, "items": args.items,
                                     "results": results})


if __name__ == "__main__":
    main()

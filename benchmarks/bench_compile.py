"""python benchmarks/bench_compile.py --out docs/benchmarks   (P3 follow-up: does torch.compile speed up latent steps?)

m latent steps with gradients (forward + backward) of the embedded model at batch 4 over one writer's prompt, with
the decoder layers' MLP blocks eager and compiled (``torch.compile(dynamic=True)``; the MLP is the part of a layer
dynamo takes whole: attention goes through the trace's cache, whose Python bookkeeping breaks the graph), timed
interleaved after the compiled variant's warm-up. Exploratory: not part of ``run_all.py``.
"""

from __future__ import annotations

import time

import torch

from _common import compare, interleaved, load, machine, write_json
from bench_train_step import step_args, training_batch
from diffmas.adapters import LoraSettings, attach_lora
from diffmas.kv import Trace
from diffmas.positions import left_pad
from diffmas.latent import get_realigner, take_latent_steps
from diffmas.prompts import load_topology, render_agent


def main() -> None:
    args = step_args(__doc__)
    backbone = load(args.model, args.device, args.dtype)
    topology = load_topology("sequential")
    attach_lora(backbone, LoraSettings(dropout=0.0), [a.role for a in topology.agents])
    backbone.model.train()
    prompts, _ = training_batch(args.batch)
    ids, mask = left_pad([render_agent(backbone.tokenizer, topology.writers[0], q) for q in prompts],
                         backbone.pad_id, backbone.device)
    realigner = get_realigner(backbone)
    layers = [m for m in backbone.model.modules() if type(m).__name__.endswith("DecoderLayer")]
    eager = [layer.mlp for layer in layers]
    compiled = [torch.compile(mlp, dynamic=True) for mlp in eager]

    def steps(mlps) -> None:
        for layer, mlp in zip(layers, mlps):
            layer.mlp = mlp
        trace, hidden = Trace.empty(len(prompts), backbone.device).extend(backbone.body, mask, input_ids=ids)
        _, last, _ = take_latent_steps(backbone, trace, hidden[:, -1], args.latent_steps, realigner)
        last.sum().backward()

    start = time.perf_counter()
    steps(compiled)
    warmup = time.perf_counter() - start
    times = interleaved({"compiled": lambda: steps(compiled), "eager": lambda: steps(eager)}, args.reps, warmup=0)
    ratio = compare(times, "compiled", "eager")
    print(f"compile warm-up {warmup:.0f} s; compiled/eager {ratio['wall']['median_of_ratios']:.3f} "
          f"(range {ratio['wall']['min_ratio']:.3f}-{ratio['wall']['max_ratio']:.3f})")
    write_json(args.out, "compile", {"machine": machine(args.threads, args.device), "batch": args.batch,
                                     "latent_steps": args.latent_steps, "warmup_s": warmup, "seconds": times,
                                     "ratio": ratio})


if __name__ == "__main__":
    main()

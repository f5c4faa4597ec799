"""Checks of the correctness core on a GPU, with tiny random models (no weights needed), plus a memory probe.

    python scripts/gpu_check.py --device cuda --out OUT      # on a CUDA machine
    python scripts/gpu_check.py --device cpu --quick         # a dry run here

CI has no GPU; this script is what a GPU session runs to see that what the CPU tests assert also holds under
CUDA kernels (SDPA/flash attention, TF32, bf16): cached decode equals ``generate``, batch 1 equals batch N,
gradients take the paths the gradient mode says, the grounded objectives run; then it measures a coupled
training step's peak memory and time as the latent steps grow. Results go to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import make_backbone  # noqa: E402

from diffmas.adapters import LoraSettings, attach_lora  # noqa: E402
from diffmas.config import load_config  # noqa: E402
from diffmas.decode import DecodeConfig  # noqa: E402
from diffmas.prompts import DUO, SINGLE, load_topology, render_agent  # noqa: E402
from diffmas.rollout import RolloutSpec, rollout  # noqa: E402
from diffmas.train.data import TrainExample  # noqa: E402
from diffmas.train.objectives import plan_norm, plan_step, step_loss  # noqa: E402

QUESTIONS = ["What is 2 + 2?", "A farmer has 17 cows, 3 dogs and 12 chickens; how many legs are there?", "Hi",
             "Sort these numbers: 5, 3, 9, 1."]
WORKED = ["3 + 4 = 7\n7 + 5 = 12\nAnswer: 12", "12 - 5 = 7\n7 + 1 = 8\nAnswer: 8", "1 + 1 = 2\nAnswer: 2",
          "2 + 2 = 4\n4 + 4 = 8\n8 - 1 = 7\nAnswer: 7"]


def _on(backbone, device, dtype):
    backbone.model.to(device=device, dtype=dtype)
    return backbone


def _lora(backbone, layout="shared", topology=DUO, seed=1):
    roles = attach_lora(backbone, LoraSettings(rank=4, dropout=0.0, layout=layout), [a.role for a in topology.agents])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.2).to(p))
    return roles


def check_decode(device) -> dict:
    out = {}
    for arch in ("llama", "qwen3", "gemma3"):
        bb = _on(make_backbone(arch), device, torch.float32)
        same = 0
        for q in QUESTIONS:
            ids = torch.tensor([render_agent(bb.tokenizer, SINGLE.final, q)], device=device)
            ref = bb.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
            ref = ref[0, ids.shape[1]:].tolist()
            if 256 in ref:
                ref = ref[: ref.index(256) + 1]
            ours = rollout(bb, RolloutSpec(SINGLE, "latent", 0), [q], decode_cfg=DecodeConfig(12)).tokens[0]
            same += ours == ref
        out[arch] = f"{same}/{len(QUESTIONS)} identical to generate"
    return out


def check_batch_invariance(device) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for topo in ("duo", "sequential"):
            for trained in (False, True):
                bb = make_backbone("llama")
                topology = load_topology(topo)
                roles = _lora(bb, topology=topology) if trained else None
                _on(bb, device, dtype).model.eval()
                spec = RolloutSpec(topology, "latent", latent_steps=4, adapters=roles)
                cfg = DecodeConfig(10)
                full = rollout(bb, spec, QUESTIONS, decode_cfg=cfg)
                alone = [rollout(bb, spec, [q], decode_cfg=cfg) for q in QUESTIONS]
                tokens = sum(a.tokens[0] == full.tokens[i] for i, a in enumerate(alone))
                nll = max(abs(a.nll_sum[0] - full.nll_sum[i]) for i, a in enumerate(alone))
                out[f"{str(dtype)[6:]} {topo} {'diffmas' if trained else 'latent_mas'}"] = \
                    f"tokens {tokens}/{len(QUESTIONS)} equal, max |NLL diff| {nll:.2e}"
    return out


def _grads(bb, spec, mode, checkpoint=False):
    bb.model.zero_grad(set_to_none=True)
    rollout(bb, spec, QUESTIONS[:2], targets=["Answer: 4", "Answer: 110"], grad_mode=mode,
            checkpoint=checkpoint).loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in bb.model.named_parameters() if "lora_" in n}


def check_gradients(device) -> dict:
    bb = make_backbone("llama")
    topology = load_topology("sequential")
    roles = _lora(bb, "per-agent", topology)
    _on(bb, device, torch.float32).model.train()
    spec = RolloutSpec(topology, "latent", latent_steps=2, adapters=roles)
    coupled, detached, ckpt = _grads(bb, spec, "coupled"), _grads(bb, spec, "detached"), _grads(bb, spec, "coupled", True)
    writers = [a.role for a in topology.writers]
    reach = lambda g: all(any(v.abs().sum() > 0 for n, v in g.items() if f".{r}." in n) for r in writers)  # noqa: E731
    none = lambda g: all(v.abs().sum() == 0 for n, v in g.items() if any(f".{r}." in n for r in writers))  # noqa: E731
    worst = max(float((ckpt[n] - coupled[n]).abs().max()) for n in coupled)
    return {"coupled reaches every writer": reach(coupled), "detached reaches none": none(detached),
            "checkpointing max |grad diff|": f"{worst:.2e}"}


def check_grounded(device) -> dict:
    out = {}
    examples = [TrainExample(q, w) for q, w in zip(QUESTIONS, WORKED)]
    for method in ("curriculum", "distill"):
        cfg = load_config(None, {"method": method, "data.target_style": "worked", "latent_steps": 4, "steps": 40,
                                 "curriculum.stages": 2, "curriculum.thoughts_per_step": 2,
                                 "curriculum.stage_steps": 10, "curriculum.mixin": 0.0})
        losses = {}
        for dev in ("cpu", device):
            bb = make_backbone("llama")
            roles = _lora(bb)
            _on(bb, dev, torch.float32).model.train()
            spec = RolloutSpec(DUO, "latent", latent_steps=4, adapters=roles)
            plan = plan_step(cfg, 15, examples)
            loss, _ = step_loss(bb, spec, cfg, plan, plan_norm(bb, spec, plan))
            loss.backward()
            losses[dev] = loss.item()
        out[method] = f"loss cpu {losses['cpu']:.6f} vs {device} {losses[device]:.6f}"
    return out


def probe_memory(device, quick: bool) -> list[dict]:
    """Peak memory and time of one coupled step (duo, batch 8) on a mid-size random Llama, as m grows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import make_tokenizer
    from diffmas.backbone import Backbone

    size = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4) if quick else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22)
    config = LlamaConfig(vocab_size=272, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=256, pad_token_id=257, **size)
    rows = []
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    bb = Backbone(lm, make_tokenizer(), "probe")
    roles = _lora(bb)
    bb.model.train()
    question = "Count the words in this long text. " * (8 if quick else 20)  # ~700 byte tokens per agent
    for m in ((0, 4) if quick else (0, 10, 40)):
        for ckpt in (False, True):
            spec = RolloutSpec(DUO, "latent", latent_steps=m, adapters=roles)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            try:
                rollout(bb, spec, [question] * 8, targets=["Answer: 42"] * 8, checkpoint=ckpt).loss.backward()
            except torch.OutOfMemoryError:
                bb.model.zero_grad(set_to_none=True)
                rows.append({"latent_steps": m, "checkpoint": ckpt, "out_of_memory": True})
                torch.cuda.empty_cache()
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
            bb.model.zero_grad(set_to_none=True)
            rows.append({"latent_steps": m, "checkpoint": ckpt, "seconds": round(seconds, 3),
                         "peak_GiB_above_weights": None if peak is None else round(peak, 3)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true", help="Small memory probe (a dry run).")
    args = parser.parse_args()
    device = args.device
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__}
    for name, fn in (("decode_vs_generate", check_decode), ("batch_invariance", check_batch_invariance),
                     ("gradients", check_gradients), ("grounded", check_grounded)):
        start = time.perf_counter()
        try:
            report[name] = fn(device)
        except Exception as exc:  # report every check, even when one breaks
            report[name] = f"FAILED: {type(exc).__name__}: {exc}"
        print(name, json.dumps(report[name]), f"({time.perf_counter() - start:.1f} s)", flush=True)
    report["memory"] = probe_memory(device, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

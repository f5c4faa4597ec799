"""Time the LatentMAS reference code (github.com/Gen-Verse/LatentMAS) on the questions P6 gives it.

Not run on its own: ``bench_throughput.py --reference DIR`` starts it in a subprocess (the same Python, or
``--reference-python`` for an environment the reference needs), so that both systems are timed in one run on the
same machine. It imports nothing from diffmas, only the reference checkout in ``--reference-dir``.

What is changed in the reference, and why (nothing else is):
- ``vllm`` is replaced by an empty stand-in module: ``methods/latent_mas.py`` imports ``SamplingParams`` at module
  level even on its Hugging Face path, and vLLM does not install on a CPU machine;
- the model name it is told contains "qwen": its prompt builders assert a Qwen model, but only by name (the
  messages are plain chat turns, rendered by the model's own chat template); the weights come from --model-dir;
- a model folder saved by transformers 5 names its tokenizer class ``TokenizersBackend``, which 4.x does not know;
  the runner then reads the same files through a folder of links whose tokenizer_config names the 4.x equivalent,
  ``PreTrainedTokenizerFast`` (both load tokenizer.json as it is);
- its tokenizer pads on the left, as transformers asks for batched generation with a decoder-only model: with the
  default right padding, a row shorter than the batch's longest prompt is continued after pad tokens and mostly
  stops at once (seen: 1 decoded token), so a batch would be cheaper for answering nothing;
- its judger decodes greedily (``do_sample=False``; the reference samples with temperature 0.6), as diffmas's
  latent_mas does in P6, so that both decode the same kind of answers; EOS is honoured on both sides.
The run uses the reference's own prompts (sequential topology: planner, critic, refiner, judger), its realignment
switch off (as in its README's main latent_mas command; latent_mas here realigns, one hidden x hidden matmul per
latent step, 30 per problem, too small to show in the timing), m latent steps per writer and its batch loop
``run_batch``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path


def stub_vllm() -> None:
    vllm = types.ModuleType("vllm")

    class _Unavailable:  # LatentMASMethod builds a SamplingParams that only its vLLM path, never taken here, uses
        def __init__(self, *args, **kwargs):
            pass

    vllm.LLM = vllm.SamplingParams = _Unavailable
    sys.modules.setdefault("vllm", vllm)


def loadable_model_dir(model_dir: str, scratch: Path) -> str:
    """``model_dir``, or a folder of links to its files whose tokenizer class transformers 4.x can load."""
    config_file = Path(model_dir) / "tokenizer_config.json"
    if not config_file.is_file():
        return model_dir  # a hub id, or a folder the reference's environment loads as it is
    config = json.loads(config_file.read_text())
    if config.get("tokenizer_class") != "TokenizersBackend":
        return model_dir
    scratch.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        link = scratch / f.name
        if f.name != config_file.name and not link.exists():
            link.symlink_to(f.resolve())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (scratch / config_file.name).write_text(json.dumps(config))
    return str(scratch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", type=Path, required=True, help="a checkout of Gen-Verse/LatentMAS")
    p.add_argument("--model-dir", required=True, help="local folder (or hub id) of the model")
    p.add_argument("--questions", type=Path, required=True, help="JSON list of {question, gold}")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSON file for seconds and decoded tokens")
    args = p.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stub_vllm()
    sys.path.insert(0, str(args.reference_dir.resolve()))
    from methods.latent_mas import LatentMASMethod  # noqa: E402  (the reference's own modules)
    from models import ModelWrapper  # noqa: E402

    ref_args = argparse.Namespace(
        model_name=f"{args.model_dir} (qwen-style prompts)", method="latent_mas", prompt="sequential", task="gsm8k", think=False, latent_space_realign=False,
        device="cpu", device2="cpu", use_vllm=False, max_new_tokens=args.new_tokens,
        latent_only=False, sequential_info_only=False, text_mas_context_length=-1)
    model_dir = loadable_model_dir(args.model_dir, args.out.parent / "reference-model")
    wrapper = ModelWrapper(model_dir, torch.device("cpu"), use_vllm=False, args=ref_args)
    wrapper.tokenizer.padding_side = "left"
    lm = wrapper.model
    generate = lm.generate

    decoded: list[int] = []  # tokens each answer decoded, EOS included (as diffmas counts them)

    def greedy_generate(**kwargs):
        kwargs.update(do_sample=False, temperature=None, top_p=None)
        out = generate(**kwargs)
        for row in out.sequences[:, kwargs["input_ids"].shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in eos_ids]
            decoded.append(ends[0] + 1 if ends else len(row))
        return out

    eos = lm.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    lm.generate = greedy_generate
    method = LatentMASMethod(wrapper, latent_steps=args.latent_steps, judger_max_new_tokens=args.new_tokens,
                             generate_bs=args.batch, args=ref_args)
    items = [{"question": q["question"], "gold": q.get("gold", ""), "solution": ""}
             for q in json.loads(args.questions.read_text())]
    method.run_batch(items[:min(2, args.batch)])  # warm-up, as the diffmas side gets one

    decoded.clear()
    start = time.perf_counter()
    answers: list[str] = []
    for i in range(0, len(items), args.batch):
        answers += [r["raw_prediction"] for r in method.run_batch(items[i:i + args.batch])]
    seconds = time.perf_counter() - start
    args.out.write_text(json.dumps({
        "batch": args.batch, "problems": len(items), "seconds": seconds,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "decoded_tokens": decoded, "answers": answers}, indent=1))


if __name__ == "__main__":
    main()

"""python benchmarks/random_model.py --like smollm2-135m-instruct --out /tmp/random-135m   (a model folder with random weights)

For machines the real weights cannot reach (a lent GPU machine takes at most 64 MiB from here): the model's
config and tokenizer, seeded random weights, saved as an ordinary folder that every benchmark takes as ``--model``.
``--shape qwen3-8b`` keeps the tokenizer but gives the model Qwen3-8B's layer shapes (36 layers, 4096 wide, 32
query / 8 key-value heads of 128; the vocabulary stays the tokenizer's) for memory and speed at the scale the
configs target. Random weights are right for memory and time, and for checking that two computations agree;
they say nothing about accuracy.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from _common import parser
from diffmas.assets import resolve_model
from diffmas.backbone import resolve_dtype

SHAPES = {
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def model_config(source: Path, shape: str | None = None):
    """(config, tokenizer) of ``source``, the layers reshaped to ``shape`` (its vocabulary and special ids kept)."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    if shape:
        special = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = Qwen3Config(vocab_size=len(tokenizer), **SHAPES[shape], **special)
    return config, tokenizer


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--like", required=True, help="model (alias or folder) whose config and tokenizer to use")
    p.add_argument("--shape", choices=sorted(SHAPES), help="replace the layer shapes by a larger model's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    source = Path(resolve_model(args.like))
    config, tokenizer = model_config(source, args.shape)
    dtype = resolve_dtype(args.dtype)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    with device:  # initialise where it is fast (an 8B model on a GPU), then save
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    for name in TOKENIZER_FILES:  # what save_pretrained does not rewrite (the generation config's EOS ids)
        if (source / name).is_file() and not (args.out / name).is_file():
            shutil.copy(source / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {config.model_type}, {params / 1e6:.0f}M parameters, {args.dtype}, seed {args.seed}",
          file=sys.stderr)


if __name__ == "__main__":
    main()

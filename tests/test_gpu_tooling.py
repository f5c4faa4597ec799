"""The tool GPU sessions depend on (device time is scarce, so a broken tool wastes a whole session): random-weight
model folders for machines the real weights cannot reach."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import random_model  # noqa: E402

from diffmas.backbone import load_backbone  # noqa: E402


def _make(like: Path, out: Path, seed: int, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["random_model.py", "--like", str(like), "--out", str(out), "--seed", str(seed)])
    random_model.main()


def test_a_random_copy_keeps_config_and_tokenizer_and_draws_new_seeded_weights(tiny_model_dir, tmp_path, monkeypatch):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):  # the fixture's model is seed 0
        _make(tiny_model_dir, tmp_path / name, seed, monkeypatch)
    source, a, b, c = (load_backbone(str(p), device="cpu") for p in
                       (tiny_model_dir, tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert a.lm.config.to_diff_dict() == source.lm.config.to_diff_dict()
    text = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>"
    assert a.tokenizer(text)["input_ids"] == source.tokenizer(text)["input_ids"] and a.eos_ids == source.eos_ids
    params = [dict(bb.lm.named_parameters()) for bb in (source, a, b, c)]
    assert params[1].keys() == params[0].keys()
    for name in params[0]:
        if params[0][name].dim() == 2:  # matrices are drawn (norm weights start at one everywhere)
            assert not torch.equal(params[1][name], params[0][name]), name  # new weights, not the source's
            assert torch.equal(params[1][name], params[2][name]), name  # the same seed draws the same
            assert not torch.equal(params[1][name], params[3][name]), name


@pytest.mark.parametrize("shape", sorted(random_model.SHAPES))
def test_a_larger_shape_keeps_the_tokenizers_vocabulary_and_special_ids(shape, tiny_model_dir):
    source, _ = random_model.model_config(tiny_model_dir)
    config, tokenizer = random_model.model_config(tiny_model_dir, shape)
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == source.eos_token_id
    with torch.device("meta"):  # the module tree, without allocating billions of parameters
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped heads, as at scale
    assert sum(p.numel() for p in model.parameters()) > 6e9

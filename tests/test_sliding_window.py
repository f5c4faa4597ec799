"""Sliding-window attention counts real positions, not cache columns (padding must not eat into the window).

Tiny Gemma3 (one sliding and one full layer: the mixed case) and Mistral (every layer slides) with a window of 8,
far shorter than the ragged prompts, so every prompt runs past the window and padding sits in the middle of
the trace. Float64: padding may change nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TEST_DEVICE, VOCAB, make_backbone, make_tokenizer
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

from diffmas.backbone import Backbone
from diffmas.decode import DecodeConfig
from diffmas.kv import Trace
from diffmas.positions import left_pad
from diffmas.prompts import SINGLE, Agent, Topology, load_topology, render_agent
from diffmas.rollout import RolloutSpec, rollout

WINDOW = 8
QUESTIONS = [
    "What is 2 + 2?",
    "A much longer question: a farmer has 17 cows, 3 dogs and 12 chickens; how many legs are on the farm?",
    "Hi",
    "Sort these numbers: 5, 3, 9, 1.",
]


def sliding_backbone(arch: str, attn: str) -> Backbone:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=256,
                  pad_token_id=257, initializer_range=0.3, sliding_window=WINDOW)
    torch.manual_seed(0)
    if arch == "gemma3":
        config = Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "full_attention"], **common)
        model = Gemma3ForCausalLM(config)
    else:
        model = MistralForCausalLM(MistralConfig(head_dim=16, **common))
    model.set_attn_implementation(attn)
    model = model.to(device=TEST_DEVICE, dtype=torch.float64).eval()
    model.generation_config.eos_token_id = 256
    model.generation_config.pad_token_id = 257
    return Backbone(model=model, tokenizer=make_tokenizer(), name=f"tiny-{arch}-swa")


def _solo_nll(bb: Backbone, prefix: list[int], generated: list[int]) -> tuple[list[int], float]:
    """Greedy tokens and NLL of ``generated`` after ``prefix``, from one unpadded sequence through the plain
    model (its own sliding mask, no cache)."""
    ids = torch.tensor([prefix + generated], device=bb.device)
    with torch.no_grad():
        hidden = bb.body(input_ids=ids).last_hidden_state[0, len(prefix) - 1: -1]
        logits = bb.logits(hidden)
    targets = torch.tensor(generated, device=bb.device)
    nll = (torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)).sum()
    return logits.argmax(-1).tolist(), float(nll)


TOL = {"sdpa": 1e-9, "eager": 1e-6}  # eager attention takes its softmax in float32
ARCH_ATTN = [("gemma3", "sdpa"), ("gemma3", "eager"), ("mistral", "sdpa"), ("mistral", "eager")]


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_sliding_window_batch_one_equals_batch_n(arch, attn):
    bb = sliding_backbone(arch, attn)
    cfg = DecodeConfig(max_new_tokens=8)
    for spec in (RolloutSpec(load_topology("sequential"), "latent", 3),
                 RolloutSpec(load_topology("hierarchical"), "text", writer_max_new_tokens=5)):
        full = rollout(bb, spec, QUESTIONS, decode_cfg=cfg)
        for i, q in enumerate(QUESTIONS):
            alone = rollout(bb, spec, [q], decode_cfg=cfg)
            assert alone.tokens[0] == full.tokens[i]
            assert alone.nll_sum[0] == pytest.approx(full.nll_sum[i], rel=TOL[attn], abs=TOL[attn])
        assert len({round(x, 6) for x in full.nll_sum}) > 1  # not vacuous (random Gemma often repeats a token)


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_sliding_window_equals_an_unpadded_solo_run(arch, attn):
    # latent_steps=0: the trace is plain text (the writers' prompts), so the final answer must equal what the
    # plain model computes on the concatenated prompts, with no padding anywhere.
    bb = sliding_backbone(arch, attn)
    tok = bb.tokenizer
    topo = Topology("two", (Agent("writer", "You write.", "Think about it."),
                            Agent("critic", "You check.", "Check it."), Agent("reader", "You read.", "Answer.")))
    cfg = DecodeConfig(max_new_tokens=10)
    for spec, agents in ((RolloutSpec(topo, "latent", 0), topo.agents), (RolloutSpec(SINGLE, "latent", 0), SINGLE.agents)):
        result = rollout(bb, spec, QUESTIONS, decode_cfg=cfg)
        for i, q in enumerate(QUESTIONS):
            prefix = [t for a in agents for t in render_agent(tok, a, q)]
            assert len(prefix) > 4 * WINDOW
            greedy, nll = _solo_nll(bb, prefix, result.tokens[i])
            assert greedy == result.tokens[i]
            assert result.nll_sum[i] == pytest.approx(nll, rel=TOL[attn], abs=TOL[attn])


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_a_segment_after_padding_sees_a_full_window(arch, attn):
    # Padding between two segments sits inside the window of the second segment's first tokens: with the
    # window counted in columns they would see fewer real tokens than the same text fed unpadded.
    bb = sliding_backbone(arch, attn)
    tok = bb.tokenizer
    first = [render_agent(tok, SINGLE.final, q) for q in QUESTIONS]
    second = [render_agent(tok, SINGLE.final, q[::-1] + "xyz" * i) for i, q in enumerate(QUESTIONS)]
    with torch.no_grad():
        trace = Trace.empty(len(QUESTIONS), bb.device)
        for seqs in (first, second):
            ids, mask = left_pad(seqs, bb.pad_id, bb.device)
            trace, hidden = trace.extend(bb.body, mask, input_ids=ids)
        for i, (a, b) in enumerate(zip(first, second)):
            solo = bb.body(input_ids=torch.tensor([a + b], device=bb.device)).last_hidden_state[0, -len(b):]
            # eager attention takes its softmax in float32 whatever the model's dtype
            assert torch.allclose(hidden[i, -len(b):], solo, rtol=0, atol=1e-5 if attn == "eager" else 1e-10)


def test_eager_attention_with_padding_stays_finite():
    # A fully masked padding row is NaN under eager attention, and its NaN keys poisoned the real queries of the
    # next layer: every padded row of a batch answered NaN.
    bb = make_backbone("llama", dtype=torch.float64)
    bb.lm.set_attn_implementation("eager")
    spec = RolloutSpec(load_topology("sequential"), "latent", 2)
    cfg = DecodeConfig(max_new_tokens=6)
    full = rollout(bb, spec, QUESTIONS, decode_cfg=cfg)
    assert all(math.isfinite(x) for x in full.nll_sum)
    for i, q in enumerate(QUESTIONS):
        alone = rollout(bb, spec, [q], decode_cfg=cfg)
        assert alone.tokens[0] == full.tokens[i]
        assert alone.nll_sum[0] == pytest.approx(full.nll_sum[i], rel=1e-6)

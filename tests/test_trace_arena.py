"""Inference traces grow in place in preallocated storage (one live copy of the trace) with the same numbers as
traces that copy their past at every extension."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import MoreEos, make_backbone

import diffmas.rollout as rollout_module
from diffmas.decode import DecodeConfig
from diffmas.kv import Trace
from diffmas.positions import left_pad
from diffmas.prompts import HIERARCHICAL, SEQUENTIAL, SINGLE, render_agent
from diffmas.rollout import RolloutSpec, rollout

QUESTIONS = ["What is 2 + 2?", "A farmer has 17 cows and 12 chickens; how many legs?", "Hi", "Sort 5, 3, 9, 1."]


def _segment(bb, texts: list[str]) -> dict:
    ids, mask = left_pad([render_agent(bb.tokenizer, SINGLE.final, t) for t in texts], bb.pad_id, bb.device)
    return {"seg_mask": mask, "input_ids": ids}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("capacity", [8, 512])  # 8: every layer's storage has to grow on the way
def test_the_tip_grows_in_place_and_every_earlier_trace_stays_valid(capacity):
    bb = make_backbone("llama", dtype=torch.float64)
    a, b, c = (_segment(bb, [f"{w} one", f"{w} and a longer second row"]) for w in ("first", "then", "other"))
    with torch.no_grad():
        plain_a, _ = Trace.empty(2, bb.device).extend(bb.body, **a)
        plain_ab, hidden_ab = plain_a.extend(bb.body, **b)
        _, hidden_ac = plain_a.extend(bb.body, **c)

        grown_a, _ = Trace.empty(2, bb.device, capacity=capacity).extend(bb.body, **a)
        keys_a = [k.clone() for k in grown_a.keys]
        grown_ab, ours_ab = grown_a.extend(bb.body, **b)
        one, tokens = torch.ones(2, 1, dtype=torch.long, device=bb.device), torch.tensor([[65], [66]], device=bb.device)
        steps, _ = grown_ab.extend(bb.body, one, input_ids=tokens)
        branch, ours_ac = grown_a.extend(bb.body, **c)  # grown_a is no longer the tip: this one copies
        plain_steps, _ = plain_ab.extend(bb.body, one, input_ids=tokens)
    if capacity > steps.length:  # nothing had to grow: the step wrote next to the past it read, copying nothing
        assert all(_storage(x) == _storage(y) for x, y in zip(grown_ab.keys + grown_ab.values, steps.keys + steps.values))
    assert all(_storage(x) != _storage(y) for x, y in zip(branch.keys, steps.keys))
    torch.testing.assert_close(ours_ab, hidden_ab, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_ac, hidden_ac, rtol=1e-12, atol=1e-12)
    for ours, ref in zip(grown_a.keys, keys_a):  # the prefix a later extension wrote after is unchanged
        assert torch.equal(ours, ref)
    for ours, ref in zip(steps.keys + steps.values, plain_steps.keys + plain_steps.values):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_under_grad_an_arena_trace_copies_instead_of_writing_in_place():
    bb = make_backbone("llama", dtype=torch.float64)
    a = _segment(bb, ["first", "second"])
    trace = Trace.empty(2, bb.device, capacity=256)
    with torch.enable_grad():
        grown, _ = trace.extend(bb.body, **a)
    assert grown.arena is None and trace.arena.keys == []  # autograd never sees the storage
    assert grown.keys[0].requires_grad


def _ragged(arch: str) -> MoreEos:
    """The tiny model with two of its commonest tokens declared EOS, so that rows finish at ragged times."""
    base = make_backbone(arch, dtype=torch.float64)
    spec = RolloutSpec(SEQUENTIAL, "latent", latent_steps=2)
    free = rollout(base, spec, QUESTIONS, decode_cfg=DecodeConfig(max_new_tokens=12))
    bb = MoreEos(model=base.model, tokenizer=base.tokenizer, name=base.name)
    common = Counter(t for row in free.tokens for t in row[1:] if t not in {r[0] for r in free.tokens})
    bb.extra_eos = tuple(t for t, _ in common.most_common(2))
    return bb


@pytest.mark.parametrize("arch,topology,mode", [("llama", SEQUENTIAL, "latent"), ("llama", HIERARCHICAL, "latent"),
                                                ("llama", SEQUENTIAL, "text"), ("gemma3", SEQUENTIAL, "latent")])
def test_rollouts_with_preallocated_traces_answer_exactly_as_copying_ones(arch, topology, mode, monkeypatch):
    bb = _ragged(arch)
    spec = RolloutSpec(topology, mode, latent_steps=3, writer_max_new_tokens=6)
    cfg = DecodeConfig(max_new_tokens=12)
    ours = rollout(bb, spec, QUESTIONS, decode_cfg=cfg, keep_trace=True)
    monkeypatch.setattr(rollout_module, "_inference_columns", lambda *args: None)
    ref = rollout(bb, spec, QUESTIONS, decode_cfg=cfg, keep_trace=True)
    lengths = [len(t) for t in ours.tokens]
    if arch == "llama":  # rows left the batch (the tiny Gemma repeats one token: no ragged ends there)
        assert len(set(lengths)) >= 2 and min(lengths) < cfg.max_new_tokens, lengths
    assert ours.tokens == ref.tokens and ours.texts == ref.texts
    assert ours.nll_sum == pytest.approx(ref.nll_sum, rel=1e-9, abs=1e-9)
    if mode == "latent":  # the writers' trace really lived in the arena
        assert ours.trace.arena is not None and ref.trace.arena is None
    for x, y in zip(ours.trace.keys + ours.trace.values, ref.trace.keys + ref.trace.values):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_an_evaluation_rollout_with_gold_targets_never_copies_its_trace(monkeypatch):
    """Writers, latent steps, the gold-target pass, the final agent and its decode all write into the one
    preallocated trace: the copying cache path (kv.cache.as_cache) is never taken, and answers and gold NLLs are
    those of separate passes."""
    import diffmas.kv.trace as kv_trace
    from diffmas.forced import gold_nll

    bb = _ragged("llama")
    spec = RolloutSpec(SEQUENTIAL, "latent", latent_steps=3)
    cfg, gold = DecodeConfig(max_new_tokens=12), ["Answer: 4", "Answer: 100", "Answer: hello there", "Answer: 1"]
    plain = rollout(bb, spec, QUESTIONS, decode_cfg=cfg, keep_trace=True)
    separate = gold_nll(bb, spec, plain.trace, QUESTIONS, gold)
    copies = []
    original = kv_trace.as_cache
    monkeypatch.setattr(kv_trace, "as_cache", lambda *args: copies.append(1) or original(*args))
    ours = rollout(bb, spec, QUESTIONS, decode_cfg=cfg, gold_targets=gold)
    assert copies == []
    assert ours.tokens == plain.tokens and ours.texts == plain.texts
    assert [n for _, n in ours.gold] == [n for _, n in separate]
    assert [x for x, _ in ours.gold] == pytest.approx([x for x, _ in separate], rel=1e-9)

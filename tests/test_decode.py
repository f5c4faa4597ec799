"""Decoding with batch compaction: rows that hit EOS leave the batch, and nothing a row computes changes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import MoreEos, make_backbone

from diffmas.backbone import Backbone
from diffmas.decode import DecodeConfig, decode
from diffmas.kv import Trace
from diffmas.positions import left_pad
from diffmas.prompts import SINGLE, render_agent

QUESTIONS = [
    "What is 2 + 2?",
    "A much longer question: a farmer has 17 cows, 3 dogs and 12 chickens; how many legs are on the farm in total?",
    "Hi",
    "Sort these numbers: 5, 3, 9, 1.",
    "Name a colour.",
    "Count to three, please.",
]
MAX_NEW = 16


def _prefill(bb: Backbone, questions: list[str]) -> tuple[Trace, torch.Tensor]:
    seqs = [render_agent(bb.tokenizer, SINGLE.final, q) for q in questions]
    ids, mask = left_pad(seqs, bb.pad_id, bb.device)
    trace, hidden = Trace.empty(len(seqs), bb.device).extend(bb.body, mask, input_ids=ids)
    return trace, hidden[:, -1]


@pytest.fixture(scope="module")
def ragged() -> MoreEos:
    base = make_backbone("llama", dtype=torch.float64)
    with torch.no_grad():
        free = decode(base, *_prefill(base, QUESTIONS), DecodeConfig(max_new_tokens=MAX_NEW))
    # The two tokens the model emits most (after its first one) become EOS: rows then stop at different steps.
    common = Counter(t for row in free.tokens for t in row[1:]).most_common(2)
    bb = MoreEos(model=base.model, tokenizer=base.tokenizer, name=base.name)
    bb.extra_eos = tuple(t for t, _ in common)
    return bb


@pytest.mark.parametrize("keep_in_trace", [False, True])
def test_rows_that_finish_leave_the_batch_and_answers_do_not_change(ragged, keep_in_trace):
    rows_forwarded: list[int] = []
    hook = ragged.body.register_forward_pre_hook(
        lambda _m, _a, kw: rows_forwarded.append(kw["input_ids"].shape[0]) if kw.get("input_ids") is not None
        and kw["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    cfg = DecodeConfig(max_new_tokens=MAX_NEW)
    try:
        with torch.no_grad():
            trace, last = _prefill(ragged, QUESTIONS)
            rows_forwarded.clear()
            full = decode(ragged, trace, last, cfg, keep_in_trace=keep_in_trace)
            forwarded = sum(rows_forwarded)
            alone = [decode(ragged, *_prefill(ragged, [q]), cfg, keep_in_trace=keep_in_trace) for q in QUESTIONS]
    finally:
        hook.remove()
    lengths = [len(t) for t in full.tokens]
    assert len(set(lengths)) >= 3 and min(lengths) < MAX_NEW, lengths  # ragged EOS times: the test is not vacuous
    # A batch costs what its live rows cost: each row is stepped once per token it feeds back, no more.
    assert forwarded == sum(lengths) - (0 if keep_in_trace else len(QUESTIONS))
    for i, one in enumerate(alone):
        assert one.tokens[0] == full.tokens[i] and one.texts[0] == full.texts[i]
        assert one.nll_sum[0] == pytest.approx(full.nll_sum[i], rel=1e-9, abs=1e-9)
    if not keep_in_trace:
        assert full.trace is None  # no trace is handed back without the reply in it
        return
    # The reassembled trace holds each row's whole reply (EOS included), and the same K/V as the row alone.
    assert full.trace.real_lengths.tolist() == [int(trace.real_lengths[i]) + n for i, n in enumerate(lengths)]
    assert full.trace.next_positions.tolist() == [int(trace.next_positions[i]) + n for i, n in enumerate(lengths)]
    for i, one in enumerate(alone):
        real = full.trace.mask[i].bool()
        for ours, ref in zip(full.trace.keys + full.trace.values, one.trace.keys + one.trace.values):
            torch.testing.assert_close(ours[i][:, real], ref[0][:, one.trace.mask[0].bool()], rtol=1e-9, atol=1e-9)


def test_a_later_segment_reads_the_reassembled_trace_like_a_lockstep_one(ragged):
    # Decode with the reply kept, then prefill one more segment on the result: the rows that stopped early
    # (right-padded with masked zeros) give the same hidden states as when each row runs alone.
    cfg = DecodeConfig(max_new_tokens=MAX_NEW)
    follow = [render_agent(ragged.tokenizer, SINGLE.final, "And now?")] * len(QUESTIONS)
    ids, mask = left_pad(follow, ragged.pad_id, ragged.device)
    with torch.no_grad():
        full = decode(ragged, *_prefill(ragged, QUESTIONS), cfg, keep_in_trace=True)
        _, hidden = full.trace.extend(ragged.body, mask, input_ids=ids)
        for i, q in enumerate(QUESTIONS):
            one = decode(ragged, *_prefill(ragged, [q]), cfg, keep_in_trace=True)
            _, ref = one.trace.extend(ragged.body, mask[:1], input_ids=ids[:1])
            torch.testing.assert_close(hidden[i, -1], ref[0, -1], rtol=1e-9, atol=1e-9)


def test_sampling_does_not_depend_on_which_rows_finished(ragged):
    # Rows draw from one random stream over the whole batch: a row's samples are the same whether or not
    # other rows have already left the batch (here: against a backbone whose only EOS never comes).
    cfg = DecodeConfig(max_new_tokens=MAX_NEW, temperature=0.5, top_p=0.95, seed=7)
    never = MoreEos(model=ragged.model, tokenizer=ragged.tokenizer, name=ragged.name)
    never.extra_eos = ()
    with torch.no_grad():
        trace, last = _prefill(ragged, QUESTIONS)
        early = decode(ragged, trace, last, cfg)
        free = decode(never, trace, last, cfg)
    assert len({len(t) for t in early.tokens}) >= 2  # some rows left the batch while others went on
    for ours, ref in zip(early.tokens, free.tokens):
        assert ours == ref[: len(ours)]


@pytest.mark.parametrize("keep_in_trace", [False, True])
def test_on_step_sees_each_rows_tokens_as_they_are_chosen_and_changes_nothing(ragged, keep_in_trace):
    cfg = DecodeConfig(max_new_tokens=MAX_NEW)
    seen: list[list[int]] = [[] for _ in QUESTIONS]
    live: list[list[int]] = []

    def on_step(rows: list[int], tokens: list[int]) -> None:
        live.append(list(rows))
        for row, token in zip(rows, tokens, strict=True):
            seen[row].append(token)

    with torch.no_grad():
        trace, last = _prefill(ragged, QUESTIONS)
        plain = decode(ragged, trace, last, cfg, keep_in_trace=keep_in_trace)
        watched = decode(ragged, trace, last, cfg, keep_in_trace=keep_in_trace, on_step=on_step)
    assert len({len(t) for t in plain.tokens}) >= 3  # rows leave the batch at different steps
    assert seen == watched.tokens == plain.tokens
    assert watched.texts == plain.texts and watched.nll_sum == plain.nll_sum
    # Each step reports the rows still decoding, in their original numbering, and none that has finished.
    assert live == [[row for row, t in enumerate(plain.tokens) if len(t) > step]
                    for step in range(max(map(len, plain.tokens)))]
    if keep_in_trace:
        for ours, ref in zip(watched.trace.keys + watched.trace.values, plain.trace.keys + plain.trace.values):
            assert torch.equal(ours, ref)

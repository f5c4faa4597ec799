"""Token-by-token decoding on top of a prefilled trace: greedy or temperature/top-p, EOS and stop strings.

Rows that finish leave the batch (the trace is narrowed to the live rows), so a batch costs what its live rows
cost; batch invariance makes this invisible in the answers. With ``keep_in_trace`` the finished rows' traces are
put back together at the end, right-padded with masked positions, as if they had been stepped with padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmas.backbone import Backbone
from diffmas.kv import Trace, TraceBuilder


@dataclass(frozen=True)
class DecodeConfig:
    """How to turn logits into tokens."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    """Strings that end a reply; the text is cut before the first one."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("decode.max_new_tokens: must be >= 1")
        if self.temperature < 0:
            raise ValueError("decode.temperature: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("decode.top_p: must be in (0, 1]")


@dataclass
class Decoded:
    """Per-row generated tokens and text, plus the NLL of the chosen tokens (decoding stability)."""

    tokens: list[list[int]]
    texts: list[str]
    nll_sum: list[float]
    trace: Trace | None
    """With ``keep_in_trace``: the trace with the replies in it."""


def _choose(logits: Tensor, cfg: DecodeConfig, generator: torch.Generator | None) -> Tensor:
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` cut before the first stop string it holds, and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def decode(
    backbone: Backbone,
    trace: Trace | TraceBuilder,
    last_hidden: Tensor,
    cfg: DecodeConfig,
    keep_in_trace: bool = False,
    on_step: Callable[[list[int], list[int]], None] | None = None,
) -> Decoded:
    """Decode from ``last_hidden`` [B, D] (the hidden state at the trace's last real position).

    With ``keep_in_trace`` the last chosen token is also run through the model, so the returned trace holds
    the whole reply (text writers hand it to the next agent); otherwise that final forward is skipped and no
    trace is returned. A :class:`TraceBuilder` is taken over and continued (the caller gives the trace up, so
    the memory of rows that finish can be freed). ``on_step(rows, tokens)`` is called after every step with the
    original indices of the rows that took one and the tokens they took (streaming reads the reply as it grows).
    """
    builder = trace if isinstance(trace, TraceBuilder) else TraceBuilder(trace)
    del trace  # the builder holds the only reference decoding needs
    batch = len(last_hidden)
    device = last_hidden.device
    eos = torch.tensor(sorted(backbone.eos_ids) or [-1], device=device)
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    nll = torch.zeros(batch, dtype=torch.float64, device=device)
    rows = list(range(batch))  # original index of each row still in the builder, in builder order
    rows_t = torch.arange(batch, device=device)
    finished_parts: list[tuple[Tensor, Trace]] = []  # with keep_in_trace: (original rows, their final trace)
    logits = backbone.logits(last_hidden)
    for step in range(cfg.max_new_tokens):
        if generator is not None and len(rows) < batch:
            # Sample over the full batch (finished rows get dummy logits) so every row draws from the random
            # stream exactly as in a batch whose rows all stay: sampled answers do not depend on who finished.
            full = logits.new_zeros(batch, logits.shape[-1]).index_copy(0, rows_t, logits)
            chosen = _choose(full, cfg, generator)[rows_t]
        else:
            chosen = _choose(logits, cfg, generator)
        token_nll = torch.logsumexp(logits, -1) - logits.gather(-1, chosen[:, None]).squeeze(-1)
        nll.index_add_(0, rows_t, token_nll.double())
        done = torch.isin(chosen, eos).tolist()  # one device sync per step, for the tokens too
        step_tokens = chosen.tolist()
        for i, (row, token) in enumerate(zip(rows, step_tokens)):
            tokens[row].append(token)
            if cfg.stop and not done[i] and cut_at_stop(backbone.tokenizer.decode(tokens[row]), cfg.stop)[1]:
                done[i] = True
        if on_step is not None:
            on_step(rows, step_tokens)
        last_step = step == cfg.max_new_tokens - 1 or all(done)
        if keep_in_trace:  # every chosen token is real in the trace, EOS included
            hidden = builder.append(backbone.body, torch.ones_like(chosen)[:, None], input_ids=chosen[:, None])
        if last_step:
            break
        if any(done):  # finished rows leave the batch
            keep = torch.tensor([i for i, d in enumerate(done) if not d], device=device)
            if keep_in_trace:
                gone = torch.tensor([i for i, d in enumerate(done) if d], device=device)
                finished_parts.append((rows_t[gone], builder.freeze().select(gone)))
                hidden = hidden[keep]
            builder.select(keep)
            rows = [rows[i] for i in keep.tolist()]
            rows_t, chosen = rows_t[keep], chosen[keep]
        if not keep_in_trace:
            hidden = builder.append(backbone.body, torch.ones_like(chosen)[:, None], input_ids=chosen[:, None])
        logits = backbone.logits(hidden[:, -1])
    texts = [cut_at_stop(backbone.tokenizer.decode(t, skip_special_tokens=True), cfg.stop)[0] for t in tokens]
    out = None
    if keep_in_trace:
        out = Trace.assemble([(rows_t, builder.freeze()), *finished_parts], batch) if finished_parts \
            else builder.freeze()
    return Decoded(tokens, texts, nll.tolist(), out)

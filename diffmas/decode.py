"""Token-by-token decoding on top of a prefilled trace: greedy or temperature/top-p, EOS and stop strings.

Rows that finish keep being stepped with padding (masked out of the trace), so a batch decodes in lockstep
without any row's real tokens seeing another row's padding.
"""

from __future__ import annotations

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
    trace: Trace


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


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def decode(
    backbone: Backbone,
    trace: Trace,
    last_hidden: Tensor,
    cfg: DecodeConfig,
    keep_in_trace: bool = False,
) -> Decoded:
    """Decode from ``last_hidden`` [B, D] (the hidden state at the trace's last real position).

    With ``keep_in_trace`` the last chosen token is also run through the model, so the returned trace holds
    the whole reply (text writers hand it to the next agent); otherwise that final forward is skipped.
    """
    batch = trace.batch_size
    device = last_hidden.device
    eos = torch.tensor(sorted(backbone.eos_ids) or [-1], device=device)
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    nll = torch.zeros(batch, dtype=torch.float64, device=device)
    logits = backbone.logits(last_hidden)
    builder = TraceBuilder(trace)
    for step in range(cfg.max_new_tokens):
        chosen = _choose(logits, cfg, generator)
        live = ~finished
        chosen = torch.where(live, chosen, torch.full_like(chosen, backbone.pad_id))
        token_nll = torch.logsumexp(logits, -1) - logits.gather(-1, chosen[:, None]).squeeze(-1)
        nll += torch.where(live, token_nll, torch.zeros_like(token_nll)).double()
        for row in live.nonzero().flatten().tolist():
            tokens[row].append(int(chosen[row]))
        done_now = live & torch.isin(chosen, eos)
        if cfg.stop:
            for row in (live & ~done_now).nonzero().flatten().tolist():
                if _cut_at_stop(backbone.tokenizer.decode(tokens[row]), cfg.stop)[1]:
                    done_now[row] = True
        finished = finished | done_now
        last_step = step == cfg.max_new_tokens - 1 or bool(finished.all())
        if last_step and not keep_in_trace:
            break
        # A token is real in the trace iff its row was still live when it was chosen (EOS included).
        hidden = builder.extend(backbone.body, live.long()[:, None], input_ids=chosen[:, None])
        if last_step:
            break
        logits = backbone.logits(hidden[:, -1])
    texts = [_cut_at_stop(backbone.tokenizer.decode(t, skip_special_tokens=True), cfg.stop)[0] for t in tokens]
    return Decoded(tokens, texts, nll.tolist(), builder.freeze())

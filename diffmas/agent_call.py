"""One agent's turn as a checkpointable function of the trace: prefill its segment, take its latent steps, then
teacher-force a continuation with a cross-entropy on its labelled tokens. :func:`diffmas.rollout.rollout` calls it
for every agent, in training and for the gold-target pass of evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from diffmas.adapters import activate
from diffmas.backbone import Backbone
from diffmas.errors import DiffMASError
from diffmas.kv import Trace, TraceTooLong
from diffmas.positions import left_pad
from diffmas.latent import take_latent_steps
from diffmas.prompts import ANSWER_KEY, render_target

__all__ = ["agent_fn", "answer_predictor_index", "as_agent", "final_inputs", "labelled", "maybe_checkpoint"]


def maybe_checkpoint(enabled: bool, fn, trace: Trace, *tensors: Tensor | None) -> tuple[Tensor, ...]:
    # Trace tensors go in as explicit inputs so the recomputation in backward sees the same values.
    if enabled:
        return torch_checkpoint(fn, *tensors, *trace.flatten(), use_reentrant=False)
    return fn(*tensors, *trace.flatten())


def as_agent(role: str, fn, *args, **kwargs):
    """Call ``fn``; a trace-length error names the agent whose segment would not fit."""
    try:
        return fn(*args, **kwargs)
    except TraceTooLong as exc:
        raise TraceTooLong(f"agent '{role}': {exc}") from None


def _forced_ce(backbone: Backbone, predictors: Tensor, labels: Tensor, per_row: bool = False) -> Tensor:
    """Summed cross-entropy of ``labels`` (-100 = no loss) predicted from ``predictors`` [B, S, D]; with
    ``per_row`` one row per example [B, 2] (float64): the summed cross-entropy and how many labels are not the
    argmax (0: greedy decoding would have produced them), instead of one sum over the batch."""
    # Logits only where a target token is predicted: the LM head is a large share of a small model's cost.
    keep = labels != -100
    logits = backbone.logits(predictors[keep])
    if not per_row:
        return F.cross_entropy(logits, labels[keep], reduction="sum")
    ce = F.cross_entropy(logits, labels[keep], reduction="none")
    missed = logits.argmax(-1) != labels[keep]
    rows = torch.nonzero(keep)[:, 0]
    out = torch.zeros(labels.shape[0], 2, dtype=torch.float64, device=labels.device)
    return out.index_add_(0, rows, torch.stack([ce.double(), missed.double()], -1))


def _at_columns(layers: tuple[Tensor, ...], columns: Tensor) -> tuple[Tensor, ...]:
    rows = torch.arange(columns.shape[0], device=columns.device)
    return tuple(h[rows, columns] for h in layers)


def agent_fn(backbone: Backbone, adapter: str | None, steps: int, latent_map, *, lens_top_k: int = 0,
             lens_out: list | None = None, capture: bool = False, per_row: bool = False,
             fed: Tensor | None = None, fed_out: list | None = None):
    """A checkpointable agent call: prefill the segment, take ``steps`` latent steps, then teacher-force a
    continuation (if given) with a summed cross-entropy on its labelled tokens.

    Inputs: ``ids, mask`` (the prompt, or prompt + forced text when there are no latent steps, with
    ``labels`` on the forced part), ``forced_ids, forced_mask, forced_labels`` (a forced text that follows
    latent steps, its own left-padded segment), ``capture_col`` (per row, the column whose every-layer hidden
    states are returned: in the forced segment when there is one, else in the first), then the trace.
    Returns the summed loss, the last hidden state, the captured states (every layer's, with ``capture``),
    then the trace's tensors.
    With ``lens_top_k`` the logit lens of every step is appended to ``lens_out`` (strings cannot be outputs
    of a checkpointed function, so they leave through this list). With ``per_row`` the loss is per row [B, 2]
    (float64: summed NLL, labels that are not the argmax) instead of a scalar (evaluation's scoring). ``fed`` and
    ``fed_out``: the latent steps' input embeddings, given or collected (:func:`diffmas.latent.take_latent_steps`).
    """

    def run(ids: Tensor, mask: Tensor, labels: Tensor | None, forced_ids: Tensor | None,
            forced_mask: Tensor | None, forced_labels: Tensor | None, capture_col: Tensor | None,
            *trace_tensors: Tensor) -> tuple[Tensor, ...]:
        activate(backbone, adapter)  # inside, so a recomputation in backward uses the same adapter
        capture_here = capture and forced_ids is None
        trace, hidden = Trace.unflatten(trace_tensors).extend(backbone.body, mask, input_ids=ids,
                                                              all_layers=capture_here)
        captured: tuple[Tensor, ...] = _at_columns(hidden, capture_col) if capture_here else ()
        hidden = hidden[-1] if capture_here else hidden
        loss = _forced_ce(backbone, hidden[:, :-1], labels[:, 1:], per_row) if labels is not None else \
            hidden.new_zeros((ids.shape[0], 2) if per_row else (), dtype=torch.float64 if per_row else None)
        trace, last, lens = take_latent_steps(backbone, trace, hidden[:, -1], steps, latent_map, lens_top_k,
                                             fed, fed_out)
        if lens_out is not None:
            lens_out.append(lens)
        if forced_ids is not None:
            trace, layers = trace.extend(backbone.body, forced_mask, input_ids=forced_ids, all_layers=capture)
            forced_hidden = layers[-1] if capture else layers
            # Under left padding a row's first forced token follows padding: its predictor is the last latent
            # state, not the padding column before it.
            prev = torch.cat([last[:, None], forced_hidden[:, :-1]], 1)
            prev_real = torch.cat([torch.ones_like(forced_mask[:, :1]), forced_mask[:, :-1]], 1).bool()
            predictors = torch.where(prev_real[..., None], prev, last[:, None])
            loss = loss + _forced_ce(backbone, predictors, forced_labels, per_row)
            captured = _at_columns(layers, capture_col) if capture else ()
            last = forced_hidden[:, -1]
        return (loss, last, *captured, *trace.flatten())

    return run


def labelled(seqs: list[list[int]], forced: list[list[int]], pad_id: int, device,
             allow_empty: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad ``seq + forced`` rows; labels hold the forced tokens and -100 elsewhere."""
    ids, mask = left_pad([s + f for s, f in zip(seqs, forced)], pad_id, device, allow_empty)
    labels = torch.full_like(ids, -100)
    for row, tokens in enumerate(forced):
        if tokens:
            labels[row, ids.shape[1] - len(tokens):] = torch.tensor(tokens, device=device)
    return ids, mask, labels


def answer_predictor_index(tokenizer, forced_text: str) -> int:
    """Index, within the tokens of ``render_target(forced_text)``, of the token that predicts the answer's
    value: the last token of the final "Answer:" (where CODI-style distillation compares hidden states)."""
    cut = forced_text.rfind(ANSWER_KEY)
    if cut < 0:
        raise DiffMASError(f"no '{ANSWER_KEY}' in the target {forced_text[:60]!r}")
    prefix = tokenizer(forced_text[: cut + len(ANSWER_KEY)], add_special_tokens=False).input_ids
    full = render_target(tokenizer, forced_text)
    if full[: len(prefix)] != prefix:
        raise DiffMASError(f"the tokenizer merges '{ANSWER_KEY}' with what follows in {forced_text[:60]!r}")
    return len(prefix) - 1


def final_inputs(backbone: Backbone, prompt_seqs: list[list[int]], forced: list[list[int]], final_steps: int
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The final agent's teacher-forced inputs for :func:`agent_fn`: ``ids, mask, labels`` (prompt + target in
    one segment when it takes no latent steps) and ``forced_ids, forced_mask, forced_labels`` (the target as its
    own segment after its latent steps)."""
    device = backbone.device
    if final_steps == 0:
        ids, mask, labels = labelled(prompt_seqs, forced, backbone.pad_id, device)
        return ids, mask, labels, None, None, None
    ids, mask = left_pad(prompt_seqs, backbone.pad_id, device)
    f_ids, f_mask, f_labels = labelled([[] for _ in forced], forced, backbone.pad_id, device, allow_empty=True)
    return ids, mask, None, f_ids, f_mask, f_labels

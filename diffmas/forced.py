"""The final agent teacher-forced: which texts training forces (and how many tokens carry loss), and scoring given
targets after a writers' trace without grad (evaluation's gold-target perplexity, lm-eval's log-likelihoods).
:func:`diffmas.rollout.rollout` runs the same agent call with grad for training.
"""

from __future__ import annotations

import torch

from diffmas.agent_call import agent_fn, as_agent, final_inputs, maybe_checkpoint
from diffmas.backbone import Backbone
from diffmas.errors import DiffMASError
from diffmas.kv import Trace
from diffmas.latent import get_realigner
from diffmas.prompts import render_agent, render_target, view_text
from diffmas.rollout_spec import Prompt, RolloutSpec

__all__ = ["count_forced_tokens", "final_latent_steps", "forced_texts", "gold_nll", "score_forced"]


def final_latent_steps(spec: RolloutSpec) -> int:
    """Latent steps the final agent takes before it answers (a topology entry's own budget wins)."""
    final = spec.topology.final
    if final.latent_steps is not None and spec.writer_mode == "latent":  # per-agent budgets (topology YAML)
        return final.latent_steps
    return spec.final_latent_steps


def forced_texts(spec: RolloutSpec, targets: list[str], thinker_texts: list[str] | None
                 ) -> tuple[list[str] | None, list[str]]:
    """What training teacher-forces: (the last writer's continuation or None, the final agent's target).

    The thinker is the last writer; with no writers (``single_latent``) the final agent thinks, and its
    continuation is written before its answer in its own segment.
    """
    if thinker_texts is None:
        return None, list(targets)
    if spec.topology.writers:
        return list(thinker_texts), list(targets)
    return None, [f"{t}\n{a}" if t else a for t, a in zip(thinker_texts, targets)]


def count_forced_tokens(backbone: Backbone, spec: RolloutSpec, targets: list[str],
                        thinker_texts: list[str] | None = None) -> int:
    """Tokens that carry loss in a training rollout (known before it runs, for a global token mean)."""
    writer, final = forced_texts(spec, targets, thinker_texts)
    tok = backbone.tokenizer
    return sum(len(render_target(tok, t)) for t in final) + \
        sum(len(render_target(tok, t)) for t in (writer or []) if t)


def score_forced(backbone: Backbone, spec: RolloutSpec, trace: Trace, prompt_seqs: list[list[int]],
                 forced: list[list[int]]) -> list[tuple[float, int]]:
    """Per row, (summed NLL of ``forced``, how many of its tokens are not the argmax) when the final agent (its
    adapter and latent steps) reads the writers' ``trace`` (``rollout(..., keep_trace=True).trace``), then its
    segment ``prompt_seqs``, and is teacher-forced on ``forced`` (token ids), without grad: the computation training
    runs on its targets. Gold-target scoring and lm-eval's log-likelihoods both come through here."""
    if len(prompt_seqs) != len(forced) or len(forced) != trace.batch_size:
        raise DiffMASError(f"{len(forced)} targets and a trace of {trace.batch_size} rows for "
                           f"{len(prompt_seqs)} prompts")
    final = spec.topology.final
    steps = final_latent_steps(spec)
    latent_map = (spec.latent_map or get_realigner(backbone, spec.realign)) if steps else None
    with torch.no_grad():
        inputs = final_inputs(backbone, prompt_seqs, forced, steps)
        fn = agent_fn(backbone, (spec.adapters or {}).get(final.role), steps, latent_map, per_row=True)
        out = as_agent(final.role, maybe_checkpoint, False, fn, trace, *inputs, None)
    return [(float(nll), int(missed)) for nll, missed in out[0].tolist()]


def gold_nll(backbone: Backbone, spec: RolloutSpec, trace: Trace, prompts: list[Prompt], targets: list[str]
             ) -> list[tuple[float, int]]:
    """Per row, (summed NLL, token count) of ``render_target(target)`` when the final agent (its adapter, prompt
    rendering and latent steps) is teacher-forced on it after the writers' ``trace`` (:func:`score_forced`): the
    quantity training's loss averages, so the writers need not run twice. ``exp(sum NLL / sum tokens)`` is the
    gold-target perplexity."""
    if len(prompts) != len(targets):
        raise DiffMASError(f"{len(targets)} targets for {len(prompts)} prompts")
    tok, final = backbone.tokenizer, spec.topology.final
    forced = [render_target(tok, t) for t in targets]
    prompt_seqs = [render_agent(tok, final, view_text(final, p), spec.think) for p in prompts]
    return [(nll, len(f)) for (nll, _), f in zip(score_forced(backbone, spec, trace, prompt_seqs, forced), forced)]

"""The one rollout: every system, in inference and in training, runs through :func:`rollout`.

Stage I: each writer agent renders its prompt, prefills it on the shared trace (or on an empty branch that
continues the trace's positions, for independent workers), then either takes m latent steps (nothing decoded)
or decodes a text reply into the trace. Stage II: the final agent renders its prompt on the accumulated trace
and either decodes the answer or, in training, is teacher-forced on a target so that a cross-entropy loss on
the target tokens reaches every adapter that took part: the whole trajectory is one computation graph.

Gradient modes (training only): ``coupled`` keeps Stage I in the graph, so the loss reaches the writers'
adapters through the trace; ``detached`` runs Stage I without grad, so only the reading side learns.
Each agent's turn is one call of :func:`diffmas.agent_call.agent_fn`; with ``checkpoint=True`` every such call is
recomputed in backward (torch.utils.checkpoint over the trace tensors; transformers' own gradient checkpointing
would silently disable the cache).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from diffmas.adapters import activate
from diffmas.agent_call import agent_fn, answer_predictor_index, as_agent, final_inputs, labelled, maybe_checkpoint
from diffmas.backbone import Backbone
from diffmas.decode import DecodeConfig, decode
from diffmas.errors import DiffMASError
from diffmas.forced import final_latent_steps, forced_texts, gold_nll
from diffmas.kv import Trace, TraceBuilder
from diffmas.positions import left_pad
from diffmas.latent import get_realigner, take_latent_steps
from diffmas.prompts import Agent, render_agent, render_target, view_text
from diffmas.rollout_spec import GRAD_MODES, AgentRecord, Prompt, RolloutResult, RolloutSpec


def _render(backbone: Backbone, agent: Agent, prompts: list[Prompt], think: bool = False
            ) -> tuple[list[list[int]], Tensor, Tensor]:
    seqs = [render_agent(backbone.tokenizer, agent, view_text(agent, p), think) for p in prompts]
    ids, mask = left_pad(seqs, backbone.pad_id, backbone.device)
    return seqs, ids, mask


def _shared_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens every row's prompt shares (the chat template, the role's instructions), leaving
    every row at least one token of its own (whose hidden state the latent steps start from)."""
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest - 1 and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _prefill_shared_prefix(backbone: Backbone, adapter: str | None, seqs: list[list[int]], base: Trace,
                           checkpoint: bool) -> tuple[Trace, list[list[int]]]:
    """The first writer's rows' shared prompt prefix prefilled once and given to every row (``base``, an empty
    trace, takes it: an inference trace copies it into its preallocated columns), and the rows' own remainders.
    Under causal attention the prefix's keys and values do not depend on what follows, and a row's remainder gets
    the same positions and attends to the same real keys as in one left-padded segment, so this computes what
    prefilling the whole prompts would (fp rounding aside) with fewer rows; in training, autograd sums the rows'
    gradients into the one prefill."""
    n = _shared_prefix(seqs)
    if n == 0 or len(seqs) == 1:
        return base, seqs

    def prefill(ids: Tensor, *trace_tensors) -> tuple:
        activate(backbone, adapter)  # inside, so a recomputation in backward uses the same adapter
        trace, _ = Trace.unflatten(trace_tensors).extend(backbone.body, torch.ones_like(ids), input_ids=ids)
        return tuple(trace.flatten())

    ids = torch.tensor([seqs[0][:n]], device=backbone.device)
    # Inference writes the prefix into preallocated columns, as the trace it joins does (no cache to copy).
    empty = Trace.empty(1, backbone.device, capacity=n if base.arena is not None else None)
    one = Trace.unflatten(maybe_checkpoint(checkpoint, prefill, empty, ids))
    rows = len(seqs)
    every = Trace(tuple(k.expand(rows, -1, -1, -1) for k in one.keys),  # views: no copy per row
                  tuple(v.expand(rows, -1, -1, -1) for v in one.values),
                  one.mask.repeat(rows, 1), one.positions.repeat(rows, 1), one.next_positions.repeat(rows))
    return base.concat(every), [s[n:] for s in seqs]


def _outputs_only(trace: Trace, lo: int, hi: int, reveal: float, generator: torch.Generator | None) -> Trace:
    """``trace`` with a writer's prompt columns ``lo..hi-1`` dropped (scope ``latents``), or with ``reveal``, each
    of them hidden with probability 1 - reveal (the bottleneck curriculum; positions never change)."""
    if not reveal:
        return trace.drop(lo, hi)
    hidden = torch.zeros_like(trace.mask, dtype=torch.bool)
    hidden[:, lo:hi] = (torch.rand(trace.batch_size, hi - lo, generator=generator) >= reveal).to(hidden.device)
    return trace.hide(hidden)


def _fed_detached(latent_map):
    """``latent_map`` applied to the state cut from the graph (grad mode ``kv_only``); a trainable map (link,
    pause) keeps its own parameters' gradient."""
    return lambda hidden: latent_map(hidden.detach())


def writer_decode_config(cfg: DecodeConfig, max_new_tokens: int, number: int) -> DecodeConfig:
    """How text writer ``number`` decodes: the evaluation's temperature and top-p, its own token budget, no stop
    strings (they end answers), and a seed stream of its own (derived from ``cfg.seed``, distinct per writer and
    from the final agent's)."""
    digest = hashlib.sha256(f"{cfg.seed}/writer/{number}".encode()).digest()
    return replace(cfg, max_new_tokens=max_new_tokens, stop=(), seed=int.from_bytes(digest[:8], "little") >> 1)


def _cap_replies(tokenizer, reply, reply_from: int, caps: list[int]) -> tuple[Trace, list[str], list[int]]:
    """Cut row r of a text reply decoded into the trace after column ``reply_from`` to its first ``caps[r]``
    tokens: the rest is masked out of the trace (token j of a row sits in column ``reply_from + j``), which is
    what decoding that row with a budget of ``caps[r]`` would have left, since no kept token attends to a later
    one."""
    trace = reply.trace
    cut = torch.zeros_like(trace.mask, dtype=torch.bool)
    texts = list(reply.texts)
    for row, (tokens, cap) in enumerate(zip(reply.tokens, caps)):
        if len(tokens) > cap:
            cut[row, reply_from + cap: reply_from + len(tokens)] = True
            texts[row] = tokenizer.decode(tokens[:cap], skip_special_tokens=True)
    generated = [min(len(t), c) for t, c in zip(reply.tokens, caps)]
    trace = trace.hide(cut)
    # As if never decoded: the next agent continues right after the kept tokens.
    return replace(trace, next_positions=trace.next_positions - cut.sum(1)), texts, generated


def _inference_columns(spec: RolloutSpec, rendered: list, final_prompts: list[list[int]], final_steps: int,
                       cfg: DecodeConfig, gold_width: int = 0) -> int:
    """An upper bound on the trace's columns in an inference rollout, preallocated so that it grows in place
    (the gold targets' pass, if any, uses the final agent's columns before it)."""
    reply = max(spec.topology.final.max_new_tokens or cfg.max_new_tokens, gold_width)
    columns = max(len(s) for s in final_prompts) + final_steps + reply
    for agent, (_, ids, _) in zip(spec.topology.writers, rendered):
        if spec.writer_mode == "latent":
            columns += ids.shape[1] + (spec.latent_steps if agent.latent_steps is None else agent.latent_steps)
        else:
            columns += ids.shape[1] + (agent.max_new_tokens or spec.writer_max_new_tokens)
    return columns


def rollout(
    backbone: Backbone,
    spec: RolloutSpec,
    prompts: list[Prompt],
    *,
    decode_cfg: DecodeConfig | None = None,
    targets: list[str] | None = None,
    thinker_texts: list[str] | None = None,
    thinker_latent_steps: int | None = None,
    capture: bool = False,
    writer_prompts: list[Prompt] | None = None,
    thought_prompts: list[Prompt] | None = None,
    grad_mode: str = "coupled",
    checkpoint: bool = False,
    keep_trace: bool = False,
    gold_targets: list[str] | None = None,
    reveal: float = 0.0,
    reveal_seed: int = 0,
    on_final_step: Callable[[list[int], list[int]], None] | None = None,
) -> RolloutResult:
    """Run ``spec`` on a batch of task prompts.

    Inference (``targets`` None): returns the final agent's decoded answers. Training: teacher-forces the final
    agent on ``targets`` and returns ``loss`` (mean over every teacher-forced token) with the graph attached
    per ``grad_mode``. Training options (grounded latent training, see diffmas.train.objectives):
    ``thinker_texts`` are teacher-forced, with loss, after the thinker's latent steps (the thinker is the last
    writer, or the final agent when there are no writers); ``thinker_latent_steps`` overrides its number of
    latent steps; ``capture`` returns the final agent's every-layer hidden states at the position that
    predicts the answer's value. ``writer_prompts`` makes the writers work on other questions than the final
    agent (the shuffled-trace control). ``thought_prompts`` (inference, latent writers): each writer prefills its
    own question but is fed, at its latent steps, the input embeddings it computed on these questions (the
    shuffled-thought control: does the reader take the answer from the thoughts' content, or from what the latent
    positions read of the writer's own prompt?); a first pass of the writers on ``thought_prompts`` computes
    them, so a row's result does not depend on its batch. ``gold_targets`` (inference): also score these targets
    teacher-forced after the writers' trace (:func:`diffmas.forced.gold_nll`), in the columns the final agent then
    reuses. ``reveal`` (scope ``latents``, training's bottleneck curriculum): each writer-prompt column stays visible
    downstream with this probability (drawn per row and column from ``reveal_seed``) instead of being dropped.
    ``on_final_step`` (inference): called after each step of the final agent's decoding, as
    :func:`diffmas.decode.decode`'s ``on_step`` (streaming).
    """
    if not prompts:
        raise DiffMASError("no questions to run")
    training = targets is not None
    if training and grad_mode not in GRAD_MODES:
        raise DiffMASError(f"grad_mode must be one of {GRAD_MODES}, got '{grad_mode}'")
    if training and spec.writer_mode == "text" and spec.topology.writers:
        raise DiffMASError("text writers decode discrete tokens and cannot be trained end to end; use latent writers")
    if (thinker_texts is not None or capture) and not training:
        raise DiffMASError("thinker_texts and capture are training options: pass targets too")
    if gold_targets is not None and training:
        raise DiffMASError("gold_targets is an evaluation option: training already scores its targets")
    if thought_prompts is not None and (training or spec.writer_mode != "latent"):
        raise DiffMASError("thought_prompts is an evaluation option of latent writers (the shuffled-thought control)")
    scope = spec.scope
    if reveal and scope != "latents":
        raise DiffMASError(f"reveal applies to the trace scope 'latents', not '{scope}'")
    if scope == "latents" and thinker_texts is not None and spec.topology.writers:
        raise DiffMASError("the trace scope 'latents' keeps only latent outputs: a writer that also writes "
                           "teacher-forced text (curriculum, distillation) is not supported with it")
    decode_cfg = decode_cfg or DecodeConfig()
    adapters = spec.adapters or {}
    batch, device, tok = len(prompts), backbone.device, backbone.tokenizer
    for name, rows in (("targets", targets), ("thinker_texts", thinker_texts), ("writer_prompts", writer_prompts),
                       ("thought_prompts", thought_prompts), ("gold_targets", gold_targets)):
        if rows is not None and len(rows) != batch:
            raise DiffMASError(f"{len(rows)} {name} for {batch} prompts")
    writers = spec.topology.writers
    final = spec.topology.final
    final_steps = final_latent_steps(spec)
    writer_text, final_text = forced_texts(spec, targets, thinker_texts) if training else (None, None)
    if thinker_latent_steps is not None and not writers:
        final_steps = thinker_latent_steps
    uses_latent = spec.writer_mode == "latent" and (spec.latent_steps or final_steps or thinker_latent_steps
                                                    or any(a.latent_steps for a in writers))
    latent_map = (spec.latent_map or get_realigner(backbone, spec.realign)) if uses_latent else None
    if training and grad_mode == "kv_only" and latent_map is not None:
        latent_map = _fed_detached(latent_map)
    rendered = [_render(backbone, agent, writer_prompts or prompts, spec.think) for agent in writers]
    prompt_seqs = [render_agent(tok, final, view_text(final, p), spec.think) for p in prompts]
    gold_width = max((len(render_target(tok, t)) for t in gold_targets), default=0) if gold_targets else 0
    stage_one_grad = training and grad_mode != "detached"
    generator = torch.Generator().manual_seed(reveal_seed) if reveal else None
    loss_sum = torch.zeros((), device=device)
    n_forced = 0

    def write(rendered: list, fed: list | None = None, fed_out: list | None = None
              ) -> tuple[Trace, list[AgentRecord]]:
        """Stage I on the writers' ``rendered`` prompts: the trace they leave and their records. ``fed`` /
        ``fed_out``: per writer, the input embeddings its latent steps are given / collect."""
        nonlocal loss_sum, n_forced
        capacity = None if training else _inference_columns(spec, rendered, prompt_seqs, final_steps, decode_cfg,
                                                            gold_width)
        trace = Trace.empty(batch, device, capacity=capacity)
        records: list[AgentRecord] = []
        with torch.set_grad_enabled(stage_one_grad):
            for number, agent in enumerate(writers):
                start = time.perf_counter()
                seqs, ids, mask = rendered[number]
                branch = trace if agent.reads_trace else Trace.empty(batch, device, start=trace.next_positions)
                lens = texts = None
                generated = [0] * batch
                steps = spec.latent_steps if agent.latent_steps is None else agent.latent_steps
                budget = agent.max_new_tokens or spec.writer_max_new_tokens
                thinker = number == len(writers) - 1
                if spec.writer_mode == "latent" and thinker and thinker_latent_steps is not None:
                    steps = thinker_latent_steps
                forced = [render_target(tok, t) if t else [] for t in writer_text] if thinker and writer_text else None
                if spec.writer_mode == "latent" and scope == "drop" and steps == 0 and not (forced and any(forced)):
                    # LatentMAS: a writer with no latent thoughts contributes nothing (so it is not run at all).
                    records.append(AgentRecord(agent.role, [0] * batch, 0, generated, 0.0, sees=agent.sees))
                    continue
                own = seqs  # what this writer's segment prefills: the whole prompts, or what follows a shared prefix
                if not trace.length:  # nothing written yet: every row's prompt starts at position 0
                    branch, own = as_agent(agent.role, _prefill_shared_prefix, backbone, adapters.get(agent.role),
                                           seqs, branch, checkpoint and stage_one_grad)
                    ids, mask = left_pad(own, backbone.pad_id, device)
                prompt_width = branch.length + ids.shape[1]
                if spec.writer_mode == "latent":
                    labels = f_ids = f_mask = f_labels = None
                    if forced and any(forced) and steps == 0:  # one prefill: prompt + text, loss on the text
                        ids, mask, labels = labelled(own, forced, backbone.pad_id, device)
                    elif forced and any(forced):
                        f_ids, f_mask, f_labels = labelled([[] for _ in forced], forced, backbone.pad_id, device,
                                                           allow_empty=True)
                    n_forced += sum(len(f) for f in forced or [])
                    lens_out: list | None = [] if spec.lens_top_k else None
                    fn = agent_fn(backbone, adapters.get(agent.role), steps, latent_map,
                                  lens_top_k=spec.lens_top_k, lens_out=lens_out,
                                  fed=None if fed is None else fed[number],
                                  fed_out=None if fed_out is None else fed_out[number])
                    out = as_agent(agent.role, maybe_checkpoint, checkpoint and stage_one_grad, fn, branch, ids, mask,
                                   labels, f_ids, f_mask, f_labels, None)
                    branch = Trace.unflatten(out[2:])
                    loss_sum = loss_sum + out[0]
                    lens = lens_out[-1] if lens_out else None
                else:
                    activate(backbone, adapters.get(agent.role))
                    branch, hidden = as_agent(agent.role, branch.extend, backbone.body, mask, input_ids=ids)
                    caps = None
                    if spec.text_context_limit is not None:  # per row: what is left under the limit
                        used = branch.real_lengths + (0 if agent.reads_trace else trace.real_lengths)
                        caps = (spec.text_context_limit - used).clamp(min=0, max=budget).tolist()
                    reply_from = branch.length
                    cap = budget if caps is None else max(1, *caps)
                    reply = as_agent(agent.role, decode, backbone, branch, hidden[:, -1],
                                     writer_decode_config(decode_cfg, cap, number), keep_in_trace=True)
                    branch, texts, generated = reply.trace, reply.texts, [len(t) for t in reply.tokens]
                    if caps is not None:
                        branch, texts, generated = _cap_replies(tok, reply, reply_from, caps)
                if scope == "latents":  # downstream agents see the writer's output, not its prompt
                    lo = trace.length if agent.reads_trace else 0
                    branch = _outputs_only(branch, lo, lo + prompt_width, reveal, generator)
                trace = branch if agent.reads_trace else trace.concat(branch)
                records.append(AgentRecord(agent.role, [len(s) for s in seqs],
                                           steps if spec.writer_mode == "latent" else 0, generated,
                                           (time.perf_counter() - start) / batch, texts, lens,
                                           budget if spec.writer_mode == "text" else None, agent.sees))
        return trace, records

    fed = None
    if thought_prompts is not None:  # the writers on the thoughts' questions, for their latent steps' inputs
        collected: list[list[Tensor]] = [[] for _ in writers]
        _, first = write([_render(backbone, agent, thought_prompts, spec.think) for agent in writers],
                         fed_out=collected)
        fed = [torch.stack(steps, 1) if steps else None for steps in collected]
    trace, records = write(rendered, fed)
    if thought_prompts is not None:  # a writer's time includes its pass on the thoughts' question
        records = [replace(r, seconds=r.seconds + f.seconds) for r, f in zip(records, first)]

    if training and grad_mode == "detached":
        trace = trace.detach()
    trace_tokens = trace.real_lengths.tolist()
    start = time.perf_counter()

    if training:
        forced = [render_target(tok, t) for t in final_text]
        n_forced += sum(len(f) for f in forced)
        capture_col = None
        if capture:
            where = [answer_predictor_index(tok, t) for t in final_text]
            capture_col = torch.tensor(where, device=device)
        ids, mask, labels, f_ids, f_mask, f_labels = final_inputs(backbone, prompt_seqs, forced, final_steps)
        if capture_col is not None:  # column of the predictor inside the padded segment that holds the target
            width = (ids if f_ids is None else f_ids).shape[1]
            capture_col = width - torch.tensor([len(f) for f in forced], device=device) + capture_col
        fn = agent_fn(backbone, adapters.get(final.role), final_steps, latent_map, capture=capture)
        out = as_agent(final.role, maybe_checkpoint, checkpoint, fn, trace, ids, mask, labels, f_ids, f_mask,
                       f_labels, capture_col)
        n_captured = backbone.lm.config.num_hidden_layers + 1 if capture else 0
        loss_sum = loss_sum + out[0]
        records.append(AgentRecord(final.role, [len(s) for s in prompt_seqs], final_steps, [0] * batch,
                                   (time.perf_counter() - start) / batch, sees=final.sees))
        return RolloutResult([""] * batch, [[] for _ in range(batch)], records, trace_tokens, [0.0] * batch,
                             loss=loss_sum / n_forced, target_tokens=n_forced,
                             trace=trace if keep_trace else None, captured=tuple(out[2: 2 + n_captured]))

    gold = None
    if gold_targets is not None:
        gold = gold_nll(backbone, spec, trace, prompts, gold_targets)
        trace.reclaim()  # nothing holds the gold pass's columns: the final agent writes over them (one copy)
    with torch.no_grad():
        activate(backbone, adapters.get(final.role))
        ids, mask = left_pad(prompt_seqs, backbone.pad_id, device)
        final_trace, hidden = as_agent(final.role, trace.extend, backbone.body, mask, input_ids=ids)
        final_trace, last, _ = as_agent(final.role, take_latent_steps, backbone, final_trace, hidden[:, -1],
                                        final_steps, latent_map)
        if final.max_new_tokens is not None:
            decode_cfg = replace(decode_cfg, max_new_tokens=final.max_new_tokens)
        # The decode takes the trace over: with no other reference left, the rows it drops are freed.
        builder, final_trace = TraceBuilder(final_trace), None
        if not keep_trace:
            trace = None
        reply = as_agent(final.role, decode, backbone, builder, last, decode_cfg, on_step=on_final_step)
    records.append(AgentRecord(final.role, [len(s) for s in prompt_seqs], final_steps,
                               [len(t) for t in reply.tokens], (time.perf_counter() - start) / batch,
                               max_new_tokens=decode_cfg.max_new_tokens, sees=final.sees))
    return RolloutResult(reply.texts, reply.tokens, records, trace_tokens, reply.nll_sum,
                         trace=trace if keep_trace else None, gold=gold)

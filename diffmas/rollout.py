"""The one rollout: every system, in inference and in training, runs through :func:`rollout`.

Stage I: each writer agent renders its prompt, prefills it on the shared trace (or on an empty branch that
continues the trace's positions, for independent workers), then either takes m latent steps (nothing decoded)
or decodes a text reply into the trace. Stage II: the final agent renders its prompt on the accumulated trace
and either decodes the answer or, in training, is teacher-forced on a target so that a cross-entropy loss on
the target tokens reaches every adapter that took part: the whole trajectory is one computation graph.

Gradient modes (training only): ``coupled`` keeps Stage I in the graph, so the loss reaches the writers'
adapters through the trace; ``detached`` runs Stage I without grad, so only the reading side learns.
With ``checkpoint=True`` every agent call is recomputed in backward (torch.utils.checkpoint over the trace
tensors; transformers' own gradient checkpointing would silently disable the cache).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from diffmas.adapters import activate
from diffmas.backbone import Backbone
from diffmas.decode import DecodeConfig, decode
from diffmas.errors import DiffMASError
from diffmas.kv import Trace, left_pad
from diffmas.latent import Realigner, get_realigner, latent_steps
from diffmas.prompts import Agent, Topology, render_agent, render_target

WRITER_MODES = ("latent", "text")
GRAD_MODES = ("coupled", "detached")


@dataclass(frozen=True)
class RolloutSpec:
    """What a system does with a topology."""

    topology: Topology
    writer_mode: str = "latent"
    """``latent``: writers take latent steps; ``text``: writers decode text into the trace."""
    latent_steps: int = 10
    writer_max_new_tokens: int = 128
    """Token budget of each text writer."""
    realign: bool = True
    adapters: dict[str, str] | None = None
    """Role -> adapter name; None leaves the model's adapters (if any) as they are."""
    lens_top_k: int = 0
    """> 0: record a logit lens (top-k tokens) for every latent step."""

    def __post_init__(self) -> None:
        if self.writer_mode not in WRITER_MODES:
            raise DiffMASError(f"writer_mode must be one of {WRITER_MODES}, got '{self.writer_mode}'")
        if self.latent_steps < 0:
            raise DiffMASError("latent_steps must be >= 0")


@dataclass
class AgentRecord:
    """What one agent did, per question of the batch."""

    role: str
    prompt_tokens: list[int]
    latent_steps: int
    generated_tokens: list[int]
    seconds: float
    """Wall time of this agent's batch call divided by the batch size."""
    texts: list[str] | None = None
    lens: list[list[list[str]]] | None = None


@dataclass
class RolloutResult:
    texts: list[str]
    tokens: list[list[int]]
    agents: list[AgentRecord]
    trace_tokens: list[int]
    """Real upstream positions the final agent attended to (its own prompt excluded)."""
    nll_sum: list[float] = field(default_factory=list)
    loss: Tensor | None = None
    target_tokens: int = 0
    trace: Trace | None = None
    """The writers' trace the final agent read (for inspection; not part of per-question records)."""

    def per_question(self) -> list[dict]:
        """JSON-ready records: answer, per-agent stats, trace_tokens, and the final reply's NLL."""
        out = []
        for i, text in enumerate(self.texts):
            agents = []
            for rec in self.agents:
                item = {k: v for k, v in asdict(rec).items() if k not in ("texts", "lens")}
                item.update(prompt_tokens=rec.prompt_tokens[i], generated_tokens=rec.generated_tokens[i])
                if rec.texts is not None:
                    item["text"] = rec.texts[i]
                if rec.lens is not None:
                    item["latents"] = rec.lens[i]
                agents.append(item)
            out.append({"answer": text, "agents": agents, "trace_tokens": self.trace_tokens[i],
                        "generated_tokens": len(self.tokens[i]), "nll_sum": self.nll_sum[i]})
        return out


def _maybe_checkpoint(enabled: bool, fn, trace: Trace, *tensors: Tensor) -> tuple[Tensor, ...]:
    # Trace tensors go in as explicit inputs so the recomputation in backward sees the same values.
    if enabled:
        return torch_checkpoint(fn, *tensors, *trace.flatten(), use_reentrant=False)
    return fn(*tensors, *trace.flatten())


def _latent_writer(backbone: Backbone, adapter: str | None, steps: int, realigner: Realigner | None,
                   lens_top_k: int = 0, lens_out: list | None = None):
    """A checkpointable function: prefill the agent's segment, take latent steps, return trace + last hidden.

    With ``lens_top_k`` the logit lens of every step is appended to ``lens_out`` (strings cannot be outputs
    of a checkpointed function, so they leave through this list).
    """

    def run(ids: Tensor, mask: Tensor, *trace_tensors: Tensor) -> tuple[Tensor, ...]:
        activate(backbone, adapter)  # inside, so a recomputation in backward uses the same adapter
        trace, hidden = Trace.unflatten(trace_tensors).extend(backbone.body, mask, input_ids=ids)
        trace, last, lens = latent_steps(backbone, trace, hidden[:, -1], steps, realigner, lens_top_k)
        if lens_out is not None:
            lens_out.append(lens)
        return (*trace.flatten(), last)

    return run


def _teacher_forced_loss(backbone: Backbone, adapter: str | None):
    """A checkpointable function: summed cross-entropy of the final agent on its target tokens."""

    def run(ids: Tensor, mask: Tensor, labels: Tensor, *trace_tensors: Tensor) -> tuple[Tensor]:
        activate(backbone, adapter)
        _, hidden = Trace.unflatten(trace_tensors).extend(backbone.body, mask, input_ids=ids)
        # Logits only where a target token is predicted: the LM head is a large share of a small model's cost.
        targets = labels[:, 1:]
        keep = targets != -100
        logits = backbone.logits(hidden[:, :-1][keep])
        return (F.cross_entropy(logits, targets[keep], reduction="sum"),)

    return run


def _render(backbone: Backbone, agent: Agent, prompts: list[str]) -> tuple[list[list[int]], Tensor, Tensor]:
    seqs = [render_agent(backbone.tokenizer, agent, p) for p in prompts]
    ids, mask = left_pad(seqs, backbone.pad_id, backbone.device)
    return seqs, ids, mask


def rollout(
    backbone: Backbone,
    spec: RolloutSpec,
    prompts: list[str],
    *,
    decode_cfg: DecodeConfig | None = None,
    targets: list[str] | None = None,
    grad_mode: str = "coupled",
    checkpoint: bool = False,
) -> RolloutResult:
    """Run ``spec`` on a batch of task prompts.

    Inference (``targets`` None): returns the final agent's decoded answers. Training: teacher-forces the final
    agent on ``targets`` and returns ``loss`` (mean over target tokens) with the graph attached per ``grad_mode``.
    """
    if not prompts:
        raise DiffMASError("no questions to run")
    training = targets is not None
    if training and grad_mode not in GRAD_MODES:
        raise DiffMASError(f"grad_mode must be one of {GRAD_MODES}, got '{grad_mode}'")
    if training and spec.writer_mode == "text" and spec.topology.writers:
        raise DiffMASError("text writers decode discrete tokens and cannot be trained end to end; use latent writers")
    decode_cfg = decode_cfg or DecodeConfig()
    adapters = spec.adapters or {}
    batch, device = len(prompts), backbone.device
    realigner = get_realigner(backbone, spec.realign) if spec.writer_mode == "latent" and spec.latent_steps else None
    trace = Trace.empty(batch, device)
    records: list[AgentRecord] = []
    stage_one_grad = training and grad_mode == "coupled"

    with torch.set_grad_enabled(stage_one_grad):
        for agent in spec.topology.writers:
            start = time.perf_counter()
            seqs, ids, mask = _render(backbone, agent, prompts)
            branch = trace if agent.reads_trace else Trace.empty(batch, device, start=trace.next_positions)
            lens = texts = None
            generated = [0] * batch
            if spec.writer_mode == "latent":
                lens_out: list | None = [] if spec.lens_top_k else None
                fn = _latent_writer(backbone, adapters.get(agent.role), spec.latent_steps, realigner,
                                    spec.lens_top_k, lens_out)
                out = _maybe_checkpoint(checkpoint and stage_one_grad, fn, branch, ids, mask)
                branch = Trace.unflatten(out[:-1])
                lens = lens_out[-1] if lens_out else None
            else:
                activate(backbone, adapters.get(agent.role))
                branch, hidden = branch.extend(backbone.body, mask, input_ids=ids)
                reply = decode(backbone, branch, hidden[:, -1],
                               DecodeConfig(max_new_tokens=spec.writer_max_new_tokens), keep_in_trace=True)
                branch, texts, generated = reply.trace, reply.texts, [len(t) for t in reply.tokens]
            trace = branch if agent.reads_trace else trace.concat(branch)
            records.append(AgentRecord(agent.role, [len(s) for s in seqs],
                                       spec.latent_steps if spec.writer_mode == "latent" else 0, generated,
                                       (time.perf_counter() - start) / batch, texts, lens))

    if training and grad_mode == "detached":
        trace = trace.detach()
    trace_tokens = trace.real_lengths.tolist()
    final = spec.topology.final
    start = time.perf_counter()

    if training:
        if len(targets) != batch:
            raise DiffMASError(f"{len(targets)} targets for {batch} prompts")
        prompt_seqs = [render_agent(backbone.tokenizer, final, p) for p in prompts]
        target_seqs = [render_target(backbone.tokenizer, t) for t in targets]
        ids, mask = left_pad([p + t for p, t in zip(prompt_seqs, target_seqs)], backbone.pad_id, device)
        labels = torch.full_like(ids, -100)
        for row, tgt in enumerate(target_seqs):
            labels[row, ids.shape[1] - len(tgt):] = torch.tensor(tgt, device=device)
        fn = _teacher_forced_loss(backbone, adapters.get(final.role))
        (loss_sum,) = _maybe_checkpoint(checkpoint, fn, trace, ids, mask, labels)
        n_target = sum(len(t) for t in target_seqs)
        records.append(AgentRecord(final.role, [len(s) for s in prompt_seqs], 0, [0] * batch,
                                   (time.perf_counter() - start) / batch))
        return RolloutResult([""] * batch, [[] for _ in range(batch)], records, trace_tokens, [0.0] * batch,
                             loss=loss_sum / n_target, target_tokens=n_target, trace=trace)

    with torch.no_grad():
        activate(backbone, adapters.get(final.role))
        seqs, ids, mask = _render(backbone, final, prompts)
        final_trace, hidden = trace.extend(backbone.body, mask, input_ids=ids)
        reply = decode(backbone, final_trace, hidden[:, -1], decode_cfg)
    records.append(AgentRecord(final.role, [len(s) for s in seqs], 0, [len(t) for t in reply.tokens],
                               (time.perf_counter() - start) / batch))
    return RolloutResult(reply.texts, reply.tokens, records, trace_tokens, reply.nll_sum, trace=trace)

"""What the server runs: each served system with the settings a request may choose, and one batch of requests
through the rollout.

A batch holds requests for the same system, topology, latent steps and sampling settings (a :class:`BatchKey`);
their answer budgets may differ. The batch decodes up to the largest budget and each answer is cut to its own:
greedy decoding of a row does not depend on the rest of the batch (the rollout is batch-invariant) nor on the
budget, and a row that ends (end of turn, stop string) within its budget ends at the same token either way, so
every answer equals the one the request would get alone, as ``System.run`` on that one question gives it.

A streamed item's answer leaves while the final agent decodes it (:class:`TextStream`): after each step, the text
of the row's tokens so far that no later token can change is sent (cut at a stop string; an incomplete character
or a trailing start of a stop string is held back), and the finished answer sends what remains of its text.
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from diffmas.decode import DecodeConfig, cut_at_stop
from diffmas.errors import DiffMASError
from diffmas.prompts import TOPOLOGIES, Topology
from diffmas.rollout import rollout
from diffmas.serve.protocol import APIError, Completion, GenerationRequest
from diffmas.systems import System, effective_settings

__all__ = ["BatchKey", "Item", "ServedModel", "TextStream", "run_batch", "served_topologies"]


@dataclass(frozen=True)
class BatchKey:
    """What the requests of one batch share."""

    model: str
    topology: str
    latent_steps: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    solo: int | None = None
    """Set (to a number of its own) for a seeded sampled request: it runs alone, because a sampled row's random
    stream depends on the batch, and alone its seed reproduces ``diffmas run --seed``."""


class TextStream:
    """Where a streamed answer goes while it is decoded: ``send`` gets each new piece of its text, in the worker
    thread. The pieces join to the answer's text exactly."""

    def __init__(self, send: Callable[[str], None]) -> None:
        self.send = send
        self.sent = ""
        self._last = ""  # the safe text after the step before

    def step(self, tokenizer, tokens: list[int], stop: tuple[str, ...]) -> None:
        """``tokens``: the row's reply so far (within its budget)."""
        safe = _settled(tokenizer.decode(tokens, skip_special_tokens=True), stop)
        # Only text that two decodes in a row agree on: a tokenizer may still change a prefix's last characters
        # when the next token comes (clean-up of spaces before punctuation).
        stable = os.path.commonprefix([safe, self._last])
        self._last = safe
        if len(stable) > len(self.sent) and stable.startswith(self.sent):
            self.send(stable[len(self.sent):])
            self.sent = stable

    def finish(self, text: str) -> bool:
        """Send what remains of the answer ``text``; False when what was sent is not its start (a tokenizer whose
        decoding rewrote text already sent, or a sampled row rerun alone after its batch failed)."""
        if not text.startswith(self.sent):
            return False
        if len(text) > len(self.sent):
            self.send(text[len(self.sent):])
            self.sent = text
        return True


def _settled(text: str, stop: tuple[str, ...]) -> str:
    """What of ``text`` (a reply so far) the next tokens cannot change: cut at a stop string, less a trailing
    incomplete character and a trailing part that may begin a stop string."""
    text, stopped = cut_at_stop(text, stop)
    if stopped:
        return text
    text = text.rstrip("\ufffd")  # first: the text before it may begin a stop string that the character continues
    held = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - held]


@dataclass(frozen=True)
class Item:
    """One question of a batch."""

    question: str
    max_tokens: int
    stream: TextStream | None = None
    """Set for a streamed request: its answer is sent as it is decoded."""


def served_topologies(systems: Mapping[str, System]) -> dict[str, Topology]:
    """The topologies a request may name: the built-in multi-agent ones and every served system's own."""
    allowed = {name: t for name, t in TOPOLOGIES.items() if len(t.agents) > 1}
    for system in systems.values():
        if system.kind.multi_agent:
            allowed.setdefault(system.spec.topology.name, system.spec.topology)
    return allowed


class ServedModel:
    """One model id of the server: a system, and the variants of it that requests may ask for.

    A training-free multi-agent system runs with any served topology and any latent steps up to the limit; a
    trained system, and a single agent, only with the settings they were built with (an adapter was trained for
    one topology and number of latent steps).
    """

    def __init__(self, model_id: str, system: System, topologies: Mapping[str, Topology]) -> None:
        self.id, self.system, self.topologies = model_id, system, dict(topologies)
        self._variants: dict[tuple[str, int | None], System] = {self.own_settings: system}
        # Questions are measured on the event loop while the worker thread tokenizes: a fast tokenizer used from two
        # threads at once can fail ("Already borrowed"), so the measuring gets a copy of its own.
        self._counter = copy.deepcopy(system.backbone.tokenizer)

    @property
    def own_settings(self) -> tuple[str, int | None]:
        """(topology name, latent steps) the system was built with; text writers take no latent steps (None)."""
        spec, kind = self.system.spec, self.system.kind
        steps = None if kind.writer_mode == "text" else spec.latent_steps if kind.multi_agent else \
            spec.final_latent_steps
        return spec.topology.name, steps

    def settings(self, topology: str | None, latent_steps: int | None) -> tuple[str, int | None]:
        """The (topology, latent steps) a request runs with; an :class:`APIError` (400) where this system cannot."""
        own_topology, own_steps = self.own_settings
        wanted = (own_topology if topology is None else topology, own_steps if latent_steps is None else latent_steps)
        if wanted == (own_topology, own_steps):
            return wanted
        kind = self.system.kind
        param = "topology" if wanted[0] != own_topology else "latent_steps"
        if kind.trained:
            raise APIError(400, f"model '{self.id}' was trained with topology '{own_topology}' and latent_steps "
                           f"{own_steps}; this request asks for topology '{wanted[0]}' and latent_steps {wanted[1]} "
                           "(a trained adapter runs only with the settings it was trained with)", param=param)
        if not kind.multi_agent:
            raise APIError(400, f"model '{self.id}' is a single agent ({kind.name}): it takes no topology and no "
                           "latent steps", param=param)
        if latent_steps is not None and own_steps is None:
            raise APIError(400, f"model '{self.id}' ({kind.name}) passes text between agents: latent_steps does not "
                           "apply", param="latent_steps")
        if wanted[0] not in self.topologies:
            raise APIError(400, f"unknown topology '{wanted[0]}': this server serves "
                           f"{', '.join(sorted(self.topologies))}", param="topology")
        return wanted

    def variant(self, topology: str, latent_steps: int | None) -> System:
        """The system with these settings (checked by :meth:`settings`), built once and kept."""
        key = (topology, latent_steps)
        if key not in self._variants:
            spec = replace(self.system.spec, topology=self.topologies[topology],
                           latent_steps=self.system.spec.latent_steps if latent_steps is None else latent_steps)
            self._variants[key] = System(self.system.kind, self.system.backbone, spec)
        return self._variants[key]

    def check_question(self, question: str, limit: int) -> None:
        """A 400 when ``question`` has more than ``limit`` tokens (every agent's prompt holds it)."""
        n = len(self._counter(question, add_special_tokens=False).input_ids)
        if n > limit:
            raise APIError(400, f"the question is {n} tokens; this server's limit is {limit} (--max-question-tokens)",
                           code="limit_exceeded")

    def batch_key(self, request: GenerationRequest, solo: int | None) -> BatchKey:
        """The batch this request joins (``solo``: a number of its own, used for seeded sampling)."""
        topology, steps = self.settings(request.topology, request.latent_steps)
        greedy = request.temperature == 0
        return BatchKey(self.id, topology, steps, request.temperature, 1.0 if greedy else request.top_p,
                        None if greedy else request.seed, request.stop,
                        solo if not greedy and request.seed is not None else None)

    def describe(self, max_tokens: int) -> dict:
        """The ``diffmas`` field of this model's /v1/models entry."""
        kind = self.system.kind
        free = kind.multi_agent and not kind.trained
        return {"system": kind.name, "trained": kind.trained, "settings": effective_settings(self.system, max_tokens),
                "topologies": sorted(self.topologies) if free else [self.own_settings[0]],
                "latent_steps_per_request": free and kind.writer_mode == "latent"}


def _completion(system: System, record: dict, tokens: list[int], budget: int, stop: tuple[str, ...]) -> Completion:
    """One row of a batch as the request alone would have had it (see the module docstring)."""
    tokenizer = system.backbone.tokenizer
    tokens = tokens[:budget]
    text, stopped = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
    ended = stopped or bool(tokens and tokens[-1] in system.backbone.eos_ids)
    agents = [dict(a) for a in record["agents"]]
    agents[-1]["generated_tokens"] = len(tokens)
    written = sum(a["generated_tokens"] for a in agents[:-1])  # text writers' replies, the "reasoning"
    prompt = sum(a["prompt_tokens"] for a in agents)
    usage = {
        "prompt_tokens": prompt, "completion_tokens": written + len(tokens),
        "total_tokens": prompt + written + len(tokens), "completion_tokens_details": {"reasoning_tokens": written},
        "diffmas": {"latent_steps": sum(a["latent_steps"] for a in agents), "trace_positions": record["trace_tokens"],
                    "agents": [{k: a[k] for k in ("role", "prompt_tokens", "latent_steps", "generated_tokens")}
                               for a in agents]},
    }
    return Completion(text, tuple(tokens), "stop" if ended else "length", usage)


def run_batch(system: System, key: BatchKey, items: list[Item]) -> list[Completion | APIError]:
    """Answer ``items`` in one rollout of ``system``; an item the rollout refuses (a trace longer than the model's
    positions, ...) gets a 400 of its own: the batch is then rerun one item at a time, so the others still answer."""
    final_budget = system.spec.topology.final.max_new_tokens  # a topology may fix the final agent's budget
    budgets = [final_budget or item.max_tokens for item in items]
    # Greedy decoding ignores the seed; an unseeded sampled batch draws a fresh one.
    seed = key.seed if key.seed is not None else 0 if key.temperature == 0 else secrets.randbelow(2 ** 62)
    cfg = DecodeConfig(max(budgets), key.temperature, key.top_p, seed, key.stop)
    tokenizer = system.backbone.tokenizer
    replies: list[list[int]] = [[] for _ in items]

    def on_step(rows: list[int], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            stream = items[row].stream
            if stream is not None and len(replies[row]) < budgets[row]:  # the batch decodes past a row's budget
                replies[row].append(token)
                stream.step(tokenizer, replies[row], key.stop)

    streamed = any(item.stream is not None for item in items)
    try:
        result = rollout(system.backbone, system.spec, [item.question for item in items], decode_cfg=cfg,
                         on_final_step=on_step if streamed else None)
    except DiffMASError as exc:
        if len(items) > 1:
            return [out for item in items for out in run_batch(system, key, [item])]
        return [APIError(400, str(exc))]
    outcomes: list[Completion | APIError] = []
    for record, tokens, budget, item in zip(result.per_question(), result.tokens, budgets, items):
        done = _completion(system, record, tokens, budget, key.stop)
        if item.stream is not None and not item.stream.finish(done.text):
            done = APIError(500, "the text already streamed is not the start of the answer (a tokenizer that "
                            "rewrites earlier text, or a sampled answer rerun alone)", type="server_error")
        outcomes.append(done)
    return outcomes

"""The systems DiffMAS compares, all over the one rollout.

=========== ============================================================== ===============
system      what it is                                                     adapter
=========== ============================================================== ===============
single      one agent answers the question                                 no
text_mas    the topology's agents write text replies into a shared trace   no
latent_mas  the agents write latent thoughts into the KV trace (no train)  no
diffmas     latent_mas with a LoRA channel trained end to end              required
single_sft  one agent, LoRA-SFT on the same data and steps (fair baseline) required
single_     one agent thinks in latent steps, then answers (latent         required
latent      thinking without communication: a control for diffmas)
text_sft    text_mas whose agents carry a single_sft adapter (a trained    single_sft's
            text channel: the writer's message is its SFT'd answer)
=========== ============================================================== ===============
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffmas.adapters import SHARED, load_adapters, read_adapter_meta
from diffmas.backbone import Backbone
from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.kv import Trace
from diffmas.latent import load_latent_map
from diffmas.prompts import SINGLE, Topology, load_topology, question_text
from diffmas.rollout import Prompt, RolloutResult, RolloutSpec, rollout


@dataclass(frozen=True)
class SystemKind:
    name: str
    multi_agent: bool
    writer_mode: str
    trained: bool
    description: str
    adapter_from: str | None = None
    """The system whose adapter a trained system loads (None: its own)."""


SYSTEMS: dict[str, SystemKind] = {
    k.name: k
    for k in (
        SystemKind("single", False, "latent", False, "one agent"),
        SystemKind("text_mas", True, "text", False, "agents pass text through the shared trace"),
        SystemKind("latent_mas", True, "latent", False, "training-free latent KV trace"),
        SystemKind("diffmas", True, "latent", True, "latent KV trace with a trained LoRA channel"),
        SystemKind("single_sft", False, "latent", True, "one agent with LoRA-SFT (fair trained baseline)"),
        SystemKind("single_latent", False, "latent", True, "one agent thinks in latent steps, then answers"),
        SystemKind("text_sft", True, "text", True, "text_mas whose agents carry a single_sft adapter",
                   adapter_from="single_sft"),
    )
}


def get_kind(name: str) -> SystemKind:
    if name not in SYSTEMS:
        raise DiffMASError(f"unknown system '{name}': choose one of {', '.join(SYSTEMS)}")
    return SYSTEMS[name]


@dataclass
class System:
    """A backbone plus the rollout settings of one system."""

    kind: SystemKind
    backbone: Backbone
    spec: RolloutSpec

    def writers_trace(self, questions: list[Prompt]) -> Trace:
        """Stage I of the rollout: the trace the writers leave for the final agent, one row per question."""
        if not self.spec.topology.writers:
            return Trace.empty(len(questions), self.backbone.device)
        # One decoded token is the cheapest way through the rollout's inference path; only its trace is kept.
        return rollout(self.backbone, self.spec, questions, decode_cfg=DecodeConfig(max_new_tokens=1),
                       keep_trace=True).trace

    def run(self, prompts: list[Prompt], decode_cfg: DecodeConfig, batch_size: int = 8,
            on_batch: Callable[[int], None] | None = None, writer_prompts: list[Prompt] | None = None,
            targets: list[str] | None = None, thought_prompts: list[Prompt] | None = None) -> list[dict]:
        """Answer every prompt; returns one JSON-ready record per prompt, in input order.

        Prompts are grouped by length to cut padding; batch invariance makes the grouping invisible in results.
        ``writer_prompts`` (one per prompt) makes the writers work on other questions (shuffled-trace control);
        ``thought_prompts`` feeds the writers' latent steps the inputs computed on other questions, each writer
        prefilling its own (shuffled-thought control, :func:`diffmas.rollout.rollout`).
        ``targets`` (gold references, one per prompt, in the task's target format) add ``gold_nll_sum`` and
        ``gold_tokens`` to each record: the final agent teacher-forced on its target after the same writers'
        trace (see :func:`diffmas.forced.gold_nll`, run inside the rollout).
        """
        for name, rows in (("writer prompts", writer_prompts), ("thought prompts", thought_prompts)):
            if rows is not None and len(rows) != len(prompts):
                raise DiffMASError(f"{len(rows)} {name} for {len(prompts)} prompts")
        if targets is not None and len(targets) != len(prompts):
            raise DiffMASError(f"{len(targets)} targets for {len(prompts)} prompts")
        if batch_size < 1:
            raise DiffMASError("batch size must be >= 1")
        order = sorted(range(len(prompts)), key=lambda i: len(question_text(prompts[i])))
        records: list[dict | None] = [None] * len(prompts)
        for lo in range(0, len(order), batch_size):
            idx = order[lo: lo + batch_size]
            others = [writer_prompts[i] for i in idx] if writer_prompts is not None else None
            thoughts = [thought_prompts[i] for i in idx] if thought_prompts is not None else None
            batch = [prompts[i] for i in idx]
            result: RolloutResult = rollout(self.backbone, self.spec, batch, decode_cfg=decode_cfg,
                                            writer_prompts=others, thought_prompts=thoughts,
                                            gold_targets=None if targets is None else [targets[i] for i in idx])
            gold = result.gold
            for n, (i, rec) in enumerate(zip(idx, result.per_question())):
                if gold is not None:
                    rec["gold_nll_sum"], rec["gold_tokens"] = gold[n]
                records[i] = rec
            if on_batch:
                on_batch(len(idx))
        return records  # type: ignore[return-value]


def _adapter_roles(meta_roles: dict[str, str], topology: Topology, folder: str) -> dict[str, str]:
    if set(meta_roles.values()) == {SHARED}:
        return {a.role: SHARED for a in topology.agents}
    missing = [a.role for a in topology.agents if a.role not in meta_roles]
    if missing:
        raise DiffMASError(f"adapters in {folder} have no adapter for role(s) {missing} of topology '{topology.name}'")
    return {a.role: meta_roles[a.role] for a in topology.agents}


def build_system(
    name: str,
    backbone: Backbone | None,
    *,
    topology: str | Topology | None = None,
    latent_steps: int | None = None,
    adapter: str | None = None,
    realign: bool = True,
    writer_max_new_tokens: int = 128,
    lens_top_k: int = 0,
    think: bool = False,
    trace: str | None = None,
    text_context_limit: int | None = None,
    default_topology: str | None = None,
) -> System:
    """Set up system ``name`` on ``backbone``. Trained systems load ``adapter`` and default their topology, trace
    scope and latent steps to the ones they were trained with, and use the ``realign`` and ``think`` they were
    trained with. ``think``: prompts with ``enable_thinking`` on; ``trace``: the trace scope (see
    :class:`RolloutSpec`); ``default_topology``: a multi-agent system's topology when neither ``topology`` nor the
    adapter names one (a task's own, e.g. ``relay``), else ``sequential``.
    With ``backbone`` None only the settings are resolved (no adapter is loaded): see :func:`effective_settings`."""
    kind = get_kind(name)
    meta: dict = {}
    if kind.trained:
        source = kind.adapter_from or name
        if adapter is None:
            raise DiffMASError(f"system '{name}' needs --adapter DIR (the output of `diffmas train --system {source}`)")
        meta = read_adapter_meta(adapter)
        if meta.get("system", source) != source:
            raise DiffMASError(f"adapter in {adapter} was trained for system '{meta['system']}', not '{source}'")
        if kind.adapter_from:  # a borrowed adapter: its topology, steps and trace were another system's
            meta = {"think": meta["think"]} if "think" in meta else {}
    elif adapter is not None:
        raise DiffMASError(f"system '{name}' is training-free and takes no adapter")
    if kind.multi_agent:
        topo = topology if isinstance(topology, Topology) else \
            load_topology(topology or meta.get("topology") or default_topology or "sequential")
    else:
        topo = SINGLE
    steps = latent_steps if latent_steps is not None else int(meta.get("latent_steps", 10))
    roles = latent_map = None
    if kind.trained:
        realign = bool(meta.get("realign", realign))
        think = bool(meta.get("think", think))
        if backbone is not None:
            roles = _adapter_roles(load_adapters(backbone, adapter), topo, adapter)
            if meta.get("latent_map", "ridge") != "ridge":
                latent_map = load_latent_map(backbone, meta["latent_map"], adapter, realign)
    spec = RolloutSpec(topo, kind.writer_mode, steps if kind.multi_agent else 0, writer_max_new_tokens, realign,
                       roles, lens_top_k, final_latent_steps=steps if name == "single_latent" else 0,
                       latent_map=latent_map, think=think, trace=trace or meta.get("trace"),
                       text_context_limit=text_context_limit if kind.writer_mode == "text" else None)
    return System(kind, backbone, spec)


def _view(agent) -> dict:
    # Recorded where it is not the default, so settings written before views existed still compare equal.
    return {} if agent.sees == "question" else {"sees": agent.sees}


def effective_settings(system: System, max_new_tokens: int) -> dict:
    """What ``system`` really runs with, JSON-ready: topology, latent steps m, realignment, and every agent's
    budget after per-agent overrides (text writers: reply tokens; latent writers: latent steps; the final agent:
    latent steps and answer tokens, ``max_new_tokens`` unless its topology entry sets one).

    ``thinking_budget`` sums them: the positions the system may generate beyond its prompts (a text writer's
    reply budget, a latent step each, the answer budget), the budget a "full thinking budget" single agent gets.
    """
    spec, text = system.spec, system.spec.writer_mode == "text"
    agents = []
    for agent in spec.topology.writers:
        steps = 0 if text else (spec.latent_steps if agent.latent_steps is None else agent.latent_steps)
        budget = (agent.max_new_tokens or spec.writer_max_new_tokens) if text else 0
        agents.append({"role": agent.role, "latent_steps": steps, "max_new_tokens": budget, **_view(agent)})
    final = spec.topology.final
    final_steps = final.latent_steps if final.latent_steps is not None and not text else spec.final_latent_steps
    agents.append({"role": final.role, "latent_steps": final_steps,
                   "max_new_tokens": final.max_new_tokens or max_new_tokens, **_view(final)})
    return {
        "system": system.kind.name, "topology": spec.topology.name, "writer_mode": spec.writer_mode,
        # m: the writers' default latent steps (text writers take none)
        "latent_steps": None if text else spec.latent_steps if system.kind.multi_agent else spec.final_latent_steps,
        "realign": spec.realign, "writer_max_new_tokens": spec.writer_max_new_tokens if text else None,
        "text_context_limit": spec.text_context_limit, "think": spec.think, "trace": spec.scope,
        "agents": agents, "max_new_tokens": agents[-1]["max_new_tokens"],
        "thinking_budget": sum(a["latent_steps"] + a["max_new_tokens"] for a in agents),
    }

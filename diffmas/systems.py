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
=========== ============================================================== ===============
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffmas.adapters import SHARED, load_adapters, read_adapter_meta
from diffmas.backbone import Backbone
from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.latent import load_latent_map
from diffmas.prompts import SINGLE, Topology, load_topology
from diffmas.rollout import RolloutResult, RolloutSpec, rollout


@dataclass(frozen=True)
class SystemKind:
    name: str
    multi_agent: bool
    writer_mode: str
    trained: bool
    description: str


SYSTEMS: dict[str, SystemKind] = {
    k.name: k
    for k in (
        SystemKind("single", False, "latent", False, "one agent"),
        SystemKind("text_mas", True, "text", False, "agents pass text through the shared trace"),
        SystemKind("latent_mas", True, "latent", False, "training-free latent KV trace"),
        SystemKind("diffmas", True, "latent", True, "latent KV trace with a trained LoRA channel"),
        SystemKind("single_sft", False, "latent", True, "one agent with LoRA-SFT (fair trained baseline)"),
        SystemKind("single_latent", False, "latent", True, "one agent thinks in latent steps, then answers"),
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

    def run(self, prompts: list[str], decode_cfg: DecodeConfig, batch_size: int = 8,
            on_batch: Callable[[int], None] | None = None, writer_prompts: list[str] | None = None) -> list[dict]:
        """Answer every prompt; returns one JSON-ready record per prompt, in input order.

        Prompts are grouped by length to cut padding; batch invariance makes the grouping invisible in results.
        ``writer_prompts`` (one per prompt) makes the writers work on other questions (shuffled-trace control).
        """
        if writer_prompts is not None and len(writer_prompts) != len(prompts):
            raise DiffMASError(f"{len(writer_prompts)} writer prompts for {len(prompts)} prompts")
        if batch_size < 1:
            raise DiffMASError("batch size must be >= 1")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        records: list[dict | None] = [None] * len(prompts)
        for lo in range(0, len(order), batch_size):
            idx = order[lo: lo + batch_size]
            others = [writer_prompts[i] for i in idx] if writer_prompts is not None else None
            result: RolloutResult = rollout(self.backbone, self.spec, [prompts[i] for i in idx], decode_cfg=decode_cfg,
                                            writer_prompts=others)
            for i, rec in zip(idx, result.per_question()):
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
    backbone: Backbone,
    *,
    topology: str | Topology | None = None,
    latent_steps: int | None = None,
    adapter: str | None = None,
    realign: bool = True,
    writer_max_new_tokens: int = 128,
    lens_top_k: int = 0,
) -> System:
    """Set up system ``name`` on ``backbone``. Trained systems load ``adapter`` and default their topology and
    latent steps to the ones they were trained with."""
    kind = get_kind(name)
    meta: dict = {}
    if kind.trained:
        if adapter is None:
            raise DiffMASError(f"system '{name}' needs --adapter DIR (the output of `diffmas train --system {name}`)")
        meta = read_adapter_meta(adapter)
        if meta.get("system", name) != name:
            raise DiffMASError(f"adapter in {adapter} was trained for system '{meta['system']}', not '{name}'")
    elif adapter is not None:
        raise DiffMASError(f"system '{name}' is training-free and takes no adapter")
    if kind.multi_agent:
        topo = topology if isinstance(topology, Topology) else load_topology(topology or meta.get("topology", "sequential"))
    else:
        topo = SINGLE
    steps = latent_steps if latent_steps is not None else int(meta.get("latent_steps", 10))
    roles = latent_map = None
    if kind.trained:
        realign = bool(meta.get("realign", realign))
        roles = _adapter_roles(load_adapters(backbone, adapter), topo, adapter)
        if meta.get("latent_map", "ridge") != "ridge":
            latent_map = load_latent_map(backbone, meta["latent_map"], adapter, realign)
    spec = RolloutSpec(topo, kind.writer_mode, steps if kind.multi_agent else 0, writer_max_new_tokens, realign,
                       roles, lens_top_k, final_latent_steps=steps if name == "single_latent" else 0,
                       latent_map=latent_map)
    return System(kind, backbone, spec)

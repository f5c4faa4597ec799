"""What a rollout (:func:`diffmas.rollout.rollout`) is asked to do, and what it gives back: the spec of a system's
use of its topology, each agent's record and the result, with the modes that spec chooses between."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from diffmas.errors import DiffMASError
from diffmas.kv import Trace
from diffmas.prompts import Topology, check_trace_scope


WRITER_MODES = ("latent", "text")
GRAD_MODES = ("coupled", "detached", "kv_only")
"""How the final agent's loss reaches the writers: ``coupled``, through the trace (the keys and values every writer
position leaves) and through the states each latent step feeds back as the next input; ``kv_only``, through the
trace only (the fed-back states are cut from the graph: no gradient asks them to be anything, e.g. a token);
``detached``, not at all (only the final agent learns)."""
Prompt = str | Mapping[str, str]
"""A question, or a mapping of view names to texts (see :mod:`diffmas.prompts`)."""


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
    final_latent_steps: int = 0
    """Latent steps the final agent takes after its prompt, before it answers (``single_latent``)."""
    latent_map: Any = None
    """A trained hidden -> embedding map (learned link, pause embedding); None: the fixed ridge realigner."""
    think: bool = False
    """Render prompts with ``enable_thinking`` on (chat templates that have the switch, e.g. Qwen3)."""
    trace: str | None = None
    """The trace scope (:data:`diffmas.prompts.TRACE_SCOPES`); None: the topology's, else ``keep``. ``keep``: a
    latent writer that takes 0 latent steps still adds its prompt to the trace (this project); ``drop``: it adds
    nothing, so with latent_steps = 0 the final agent sees no upstream writer (LatentMAS); ``latents``: downstream
    agents see only the writers' outputs (latent steps, text replies), not their prompts."""
    text_context_limit: int | None = None
    """Text writers only: the most real tokens the shared trace may hold after a writer's turn (the upstream
    trace, the writer's prompt and its reply). A writer's reply is cut, per question, to what is left under the
    limit (down to no reply at all when the trace and its prompt already reach it); prompts are never cut and the
    final agent's prompt and answer are not counted. None: no limit."""

    def __post_init__(self) -> None:
        if self.trace is not None:
            check_trace_scope(self.trace)
        if self.writer_mode not in WRITER_MODES:
            raise DiffMASError(f"writer_mode must be one of {WRITER_MODES}, got '{self.writer_mode}'")
        if self.latent_steps < 0 or self.final_latent_steps < 0:
            raise DiffMASError("latent_steps must be >= 0")
        if self.text_context_limit is not None and self.text_context_limit < 1:
            raise DiffMASError("text_context_limit must be >= 1")

    @property
    def scope(self) -> str:
        """The trace scope in force: this spec's, else the topology's, else ``keep``."""
        return self.trace or self.topology.trace or "keep"


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
    max_new_tokens: int | None = None
    """The token budget this agent decoded under (text writers, and the final agent at inference)."""
    sees: str = "question"
    """What the agent saw of the example (its view, :attr:`diffmas.prompts.Agent.sees`)."""


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
    """The writers' trace the final agent read, with ``keep_trace`` (for inspection; not in per-question records)."""
    captured: tuple[Tensor, ...] = ()
    """Training with ``capture``: the final agent's hidden states [B, D] per layer at the answer-predicting position."""
    gold: list[tuple[float, int]] | None = None
    """With ``gold_targets``: per row, the gold target's summed NLL and token count (see :func:`diffmas.forced.gold_nll`)."""

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

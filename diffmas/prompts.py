"""Agents, topologies, and rendering each agent's segment with the tokenizer's chat template.

An agent's segment is one chat turn: its role as the system message, its instruction and what it sees of the
task's example as the user message, and the assistant header, so the agent "speaks" next (in latent steps, in
text, or as the final answer). The final agent of a topology is the one whose output is the system's answer.

What an agent sees is its **view** (``Agent.sees``): ``question`` (the task's whole prompt, the default),
``none`` (only the task's answer-format line: the agent knows the problem only through the trace), or
``part:<name>`` (a named part of the example, for tasks that split a problem between agents). A prompt handed to
a rollout is either a plain question (it has the views ``question`` and ``none``, the latter empty) or a mapping
from view names to texts (:meth:`diffmas.tasks.Task.views`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import yaml

from diffmas.errors import DiffMASError

if TYPE_CHECKING:  # annotations only: the config layer reads this module without loading transformers
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Agent:
    """One role in a topology."""

    role: str
    system: str
    instruction: str
    reads_trace: bool = True
    """False: the agent sees only its own segment (parallel workers); its segment is still added to the trace."""
    latent_steps: int | None = None
    """This agent's latent steps (latent systems), instead of the system's default m; for the final agent, latent
    steps it takes after its prompt, before it answers. None: the default."""
    max_new_tokens: int | None = None
    """This agent's token budget, instead of the default: a text writer's reply, or the final agent's answer."""
    sees: str = "question"
    """What the agent sees of the example: ``question``, ``none`` or ``part:<name>`` (see the module docstring)."""

    def __post_init__(self) -> None:
        for name, low in (("latent_steps", 0), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise DiffMASError(f"agent '{self.role}': {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.sees, str) or not (self.sees in ("question", "none") or
                                                  (self.sees.startswith("part:") and len(self.sees) > 5)):
            raise DiffMASError(f"agent '{self.role}': sees must be 'question', 'none' or 'part:<name>', "
                               f"got {self.sees!r}")


TRACE_SCOPES = ("keep", "drop", "latents")
"""What downstream agents attend to of a writer's segment: ``keep`` its prompt and output (a latent writer with 0
latent steps still adds its prompt); ``drop`` the same, except that a latent writer with 0 latent steps adds nothing
(LatentMAS); ``latents`` only its output (latent steps, or a text writer's reply): its prompt columns are dropped
after its turn, and later agents' positions still continue after them."""


def check_trace_scope(scope: str) -> str:
    """``scope`` if it is one of :data:`TRACE_SCOPES` (the one place it is validated), else a clear error."""
    if scope not in TRACE_SCOPES:
        raise DiffMASError(f"trace must be one of {', '.join(TRACE_SCOPES)}, got {scope!r}")
    return scope


@dataclass(frozen=True)
class Topology:
    """Ordered agents; every agent but the last writes to the trace, the last one answers."""

    name: str
    agents: tuple[Agent, ...]
    trace: str | None = None
    """The topology's trace scope (:data:`TRACE_SCOPES`); None: ``keep``. A run's own setting wins."""

    def __post_init__(self) -> None:
        if not self.agents:
            raise DiffMASError(f"topology '{self.name}' has no agents")
        roles = [a.role for a in self.agents]
        if len(set(roles)) != len(roles):
            raise DiffMASError(f"topology '{self.name}' repeats a role name: {roles}")
        if all(a.sees == "none" for a in self.agents):
            raise DiffMASError(f"topology '{self.name}': no agent sees the question or a part of it "
                               "(every agent has sees: none), so nothing of the problem reaches the system")
        if self.trace is not None:
            check_trace_scope(self.trace)

    @property
    def writers(self) -> tuple[Agent, ...]:
        return self.agents[:-1]

    @property
    def final(self) -> Agent:
        return self.agents[-1]

    def to_dict(self) -> dict:
        # Settings left to their defaults are omitted, so topologies without them read as before.
        defaults = {"latent_steps": None, "max_new_tokens": None, "sees": "question"}
        agents = [{k: v for k, v in asdict(a).items() if k not in defaults or v != defaults[k]} for a in self.agents]
        return {"name": self.name, "agents": agents, **({"trace": self.trace} if self.trace else {})}


ANSWER_KEY = "Answer:"
"""What introduces the final answer in targets and in the answer-format instruction."""

_TEAM = "You are the {role} in a team of agents that solve a problem together."
_FINAL_INSTRUCTION = (
    "The team's work on this problem is in the context above. Use it, check it, and solve the problem."
)

SOLVER = Agent("solver", "You are a careful problem solver.", "Solve the problem.")

SEQUENTIAL = Topology(
    "sequential",
    (
        Agent("planner", _TEAM.format(role="Planner"),
              "Write a short step-by-step plan for solving the problem below. Do not state the final answer."),
        Agent("critic", _TEAM.format(role="Critic"),
              "Check the plan above for mistakes or missing steps and say how to fix them."),
        Agent("refiner", _TEAM.format(role="Refiner"),
              "Combine the plan and the critique above into a corrected, complete plan."),
        Agent("judger", _TEAM.format(role="Judger"), _FINAL_INSTRUCTION),
    ),
)

HIERARCHICAL = Topology(
    "hierarchical",
    (
        Agent("math", _TEAM.format(role="Math expert"),
              "Solve the problem below with careful mathematical reasoning.", reads_trace=False),
        Agent("science", _TEAM.format(role="Science expert"),
              "Solve the problem below, using scientific knowledge where it helps.", reads_trace=False),
        Agent("code", _TEAM.format(role="Programming expert"),
              "Solve the problem below, reasoning as a programmer would.", reads_trace=False),
        Agent("summarizer", _TEAM.format(role="Summarizer"),
              "Three experts have worked on this problem independently (context above). "
              "Weigh their work and solve the problem."),
    ),
)

# Two agents (same as configs/topologies/duo.yaml): small enough to train on a CPU in minutes.
DUO = Topology(
    "duo",
    (
        Agent("reasoner", "You are the Reasoner in a team of two agents.",
              "Think through the problem below step by step. Do not state the final answer."),
        Agent("solver", "You are the Solver in a team of two agents.",
              "The Reasoner's work is in the context above. Use it to solve the problem."),
    ),
)

SINGLE = Topology("single", (SOLVER,))

# The final agent sees none of the problem: it can answer only from what the reasoner passes on (relay tasks).
RELAY = Topology(
    "relay",
    (
        Agent("reasoner", "You are the Reasoner in a team of two agents.",
              "Think through the problem below step by step. Do not state the final answer."),
        Agent("solver", "You are the Solver in a team of two agents.",
              "The problem is known only to the Reasoner; its work is in the context above. Use it to solve the "
              "problem.", sees="none"),
    ),
)

# Two writers each see one part of the problem (independently), the final agent none of it (split tasks).
SPLIT = Topology(
    "split",
    (
        Agent("first", "You are the first Reader in a team of three agents.",
              "You hold the first part of a problem; a teammate holds the rest. Think about your part.",
              reads_trace=False, sees="part:a"),
        Agent("second", "You are the second Reader in a team of three agents.",
              "You hold the second part of a problem; a teammate holds the start. Think about your part.",
              reads_trace=False, sees="part:b"),
        Agent("solver", "You are the Solver in a team of three agents.",
              "The problem is known only to the two Readers, each holding one part; their work is in the context "
              "above. Use it to solve the problem.", sees="none"),
    ),
)

TOPOLOGIES = {t.name: t for t in (SEQUENTIAL, HIERARCHICAL, DUO, SINGLE, RELAY, SPLIT)}


def topology_from_dict(data: dict, default_name: str = "custom") -> Topology:
    """Inverse of :meth:`Topology.to_dict`."""
    try:
        agents = tuple(Agent(**a) for a in data["agents"])
    except (KeyError, TypeError) as exc:
        raise DiffMASError(f"invalid topology: {exc}") from exc
    return Topology(str(data.get("name", default_name)), agents, data.get("trace"))


def load_topology(spec: str | dict) -> Topology:
    """A built-in topology by name, a dict, or a YAML file ``{name, trace, agents: [{role, system, instruction,
    reads_trace, latent_steps, max_new_tokens, sees}]}`` (all but role, system and instruction optional; the
    budgets override the system's defaults for that agent)."""
    if isinstance(spec, dict):
        return topology_from_dict(spec)
    if spec in TOPOLOGIES:
        return TOPOLOGIES[spec]
    path = Path(spec)
    if not path.is_file():
        raise DiffMASError(f"unknown topology '{spec}': use one of {sorted(TOPOLOGIES)} or a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DiffMASError(f"invalid topology file {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise DiffMASError(f"invalid topology file {path}: expected a mapping with 'agents'")
    return topology_from_dict(data, path.stem)


def view_text(agent: Agent, prompt: str | Mapping[str, str]) -> str:
    """What ``agent`` sees of ``prompt`` (a plain question, or a mapping of view names to texts)."""
    if isinstance(prompt, str):
        if agent.sees in ("question", "none"):
            return prompt if agent.sees == "question" else ""
        raise DiffMASError(f"agent '{agent.role}' sees '{agent.sees}', but a plain question has no parts: "
                           "use a task whose examples have parts")
    if agent.sees not in prompt:
        raise DiffMASError(f"agent '{agent.role}' sees '{agent.sees}', but this task's examples offer only "
                           f"{', '.join(sorted(prompt))}")
    return prompt[agent.sees]


def question_text(prompt: str | Mapping[str, str]) -> str:
    """The whole question of a prompt (a plain question, or a mapping of views)."""
    return prompt if isinstance(prompt, str) else prompt["question"]


def render_agent(tokenizer: PreTrainedTokenizerBase, agent: Agent, question: str, think: bool = False) -> list[int]:
    """Token ids of an agent's segment up to (and including) its assistant header (``question``: what the agent
    sees of the example, see :func:`view_text`; may be empty).

    ``think`` is passed as ``enable_thinking`` to chat templates that use that variable (Qwen3 and the like;
    others ignore it). The default is off: a template left to itself opens a thinking block, and untrained
    systems then think past their token budget.
    """
    user = f"{agent.instruction}\n\n{question}" if question else agent.instruction
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": agent.system}, {"role": "user", "content": user}]
        options = {"enable_thinking": think} if "enable_thinking" in str(tokenizer.chat_template) else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **options)
    else:  # base models: a plain layout with a clear place to answer
        text = f"{agent.system}\n\n{user}\n\nResponse:"
    return tokenizer(text, add_special_tokens=False).input_ids


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """Text that closes an assistant turn (the EOS token for chat models)."""
    return tokenizer.eos_token or ""


def render_target(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a training target followed by the end of the turn, so the model learns to stop."""
    return tokenizer(target + end_of_turn(tokenizer), add_special_tokens=False).input_ids

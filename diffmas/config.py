"""Typed configs with a YAML round trip; invalid values are reported with the dotted name of the field.

The resolved config is saved beside every checkpoint and result, so a number can always be traced back to
the exact settings that produced it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffmas.assets import DEFAULT_MODEL
from diffmas.errors import DiffMASError
from diffmas.prompts import TRACE_SCOPES

LATENT_MAPS = ("ridge", "link", "pause", "gated")
"""How latent steps are fed (:mod:`diffmas.latent`): the fixed ridge realignment, a learned link, the pause control
(one learned input, no thought), or pause plus the realigned thought behind a learned gate that starts at 0."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters and layout."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layout: str = "shared"
    """``shared``: one adapter for all agents; ``per-agent``: one adapter per role."""

    def __post_init__(self) -> None:
        if self.layout not in ("shared", "per-agent"):
            raise DiffMASError(f"config field 'layout' must be 'shared' or 'per-agent', got '{self.layout}'")
        if self.rank < 1:
            raise DiffMASError("config field 'rank' must be >= 1")


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    """Embedded alias, local folder, or hub id."""
    device: str = "auto"
    dtype: str = "float32"


@dataclass
class DataConfig:
    task: str = "rg:chain_sum"
    """Task whose prompt format and answers are used; ``rg:<generator>`` generates examples offline."""
    source: str | None = None
    """Optional local jsonl with {question, target} rows (or a hub id where a hub is reachable)."""
    target_style: str = "answer"
    """``answer``: "Answer: <gold>" only; ``worked``: a short worked solution, then the answer."""
    heldout_examples: int = 32
    """Examples held out for the held-out loss (disjoint from training)."""
    seed: int | None = None
    """Seed of the training and held-out draws (which examples, in which order); None: the run's ``seed``, which
    also seeds the adapters' initialisation, dropout and the bottleneck curriculum's masks. Set it to tell the
    data's share in a seed's outcome from the rest's."""


METHODS = ("answer", "curriculum", "distill")
SYSTEMS = ("diffmas", "single_sft", "single_latent")


@dataclass
class CurriculumConfig:
    """Coconut-style stages on the thinker (the last writer; the final agent for ``single_latent``)."""

    stages: int = 3
    """S: at stage s < S the first s worked steps become s x thoughts_per_step latent steps and the rest are
    written (teacher-forced, with loss); at stage S every step is latent and nothing is written."""
    thoughts_per_step: int = 2
    """c: latent steps that replace one written step (``latent_steps`` must be stages x c)."""
    stage_steps: int = 30
    """Training steps of each stage 0..S-1; stage S runs until the last step."""
    mixin: float = 0.3
    """Probability that a batch uses an earlier stage (drawn uniformly), so earlier stages are not forgotten."""
    reset_optimizer: bool = True
    """Clear AdamW's moments when a new stage starts (Coconut)."""


@dataclass
class DistillConfig:
    """CODI-style distillation from a worked-solution pass (teacher) into the latent pass (student)."""

    weight: float = 1.0
    """lambda: loss = answer CE + alpha x teacher CE + lambda x the hidden-state distance."""
    teacher_weight: float = 1.0
    """alpha: weight of the teacher pass's own CE on the worked text and answer (CODI's reference loss). At 0 the
    teacher is untrained and the passes can agree by ignoring the trace (the study's first arm collapsed so)."""
    layers: tuple[int, ...] = ()
    """Hidden-state layers compared (1..L; L is the final-normed output); empty = every layer."""


@dataclass
class LinkConfig:
    """The learned link (``latent_map: link``)."""

    pretrain_steps: int = 0
    """Steps of pre-training on the task's worked text (hidden[t] -> embedding[t+1], cosine + 0.1 MSE)."""
    pretrain_lr: float = 1e-3


@dataclass
class ChannelConfig:
    """Training that makes a bottlenecked channel carry the problem (trace scope ``latents``; relay tasks)."""

    anneal: float = 0.0
    """Bottleneck curriculum: over the first ``anneal`` share of the steps each writer-prompt column stays visible
    downstream with a probability falling linearly from 1 to 0 (the reader first learns to read the trace, the
    writers' latent steps then take over what the prompt gave); afterwards only the outputs are. 0: off."""
    autoencode_steps: int = 0
    """Autoencoding pre-training (as ICAE): the first N steps teacher-force the final agent, which sees the problem
    only through the trace, on what the writers saw (their views, word for word); then the task loss takes over."""


@dataclass
class StopConfig:
    """A budget set by the held-out loss of the validation split (never the evaluation items)."""

    enabled: bool = False
    """Stop once the held-out loss has improved by less than ``tolerance`` (relative) over the last ``window``
    share of the steps, and at least ``min_steps`` were taken (``steps`` is then the most it may take)."""
    min_steps: int = 300
    window: float = 0.2
    tolerance: float = 0.01


@dataclass
class TrainConfig:
    """One training run of a trainable system."""

    system: str = "diffmas"
    """``diffmas`` (multi-agent latent trace), ``single_sft`` (the fair single-agent baseline) or
    ``single_latent`` (one agent thinks in latent steps, then answers: latent thinking without communication)."""
    method: str = "answer"
    """``answer``: answer-only targets (or worked, per data.target_style); ``curriculum`` / ``distill``:
    latent steps grounded in worked solutions (needs data.target_style: worked)."""
    latent_map: str = "ridge"
    """How a latent step's hidden state becomes the next input: ``ridge`` (fixed realignment), ``link`` (a
    learned map, saved beside the adapters) or ``pause`` (one learned embedding: the pause control)."""
    realign: bool = True
    """Ridge realignment before the norm rescaling (False: rescaling only, as LatentMAS by default)."""
    think: bool = False
    """Render prompts with ``enable_thinking`` on (chat templates that have the switch, e.g. Qwen3); saved with
    the adapters, so evaluation renders prompts the same way."""
    topology: str | None = None
    """A built-in topology or a YAML file; None: the task's own (relay and split tasks name one), else
    ``sequential``."""
    trace: str | None = None
    """Trace scope (``keep``, ``drop``, ``latents``: downstream agents see only the writers' latent steps); None:
    the topology's, else ``keep``."""
    latent_steps: int = 10
    grad_mode: str = "coupled"
    """``coupled``: the loss reaches the writers through the trace; ``kv_only``: through the keys and values only,
    not the states fed back as latent inputs; ``detached``: only the reader learns (diffmas.rollout_spec.GRAD_MODES)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    steps: int = 100
    batch_size: int = 8
    """Examples per process per micro-batch."""
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 0
    """Held-out loss every N steps (0: only at the start and the end)."""
    activation_checkpointing: bool = False
    mixed_precision: str = "no"
    """``no``, ``bf16`` (autocast) or ``auto`` (bf16 where the device computes it natively: a GPU, or a CPU with
    avx512_bf16 / amx_bf16; elsewhere bf16 is emulated and many times slower)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    stop: StopConfig = field(default_factory=StopConfig)

    @property
    def thinks(self) -> bool:
        """Whether this system takes latent steps at all."""
        return self.system != "single_sft" and self.latent_steps > 0

    def __post_init__(self) -> None:
        cur = self.curriculum
        grounded = self.method != "answer"
        checks = [
            (self.system in SYSTEMS, "system", f"must be one of {SYSTEMS}"),
            (self.method in METHODS, "method", f"must be one of {METHODS}"),
            (self.latent_map in LATENT_MAPS, "latent_map", f"must be one of {LATENT_MAPS}"),
            (not grounded or self.data.target_style == "worked", "method",
             f"'{self.method}' grounds latent steps in worked solutions: set data.target_style: worked"),
            (not grounded or self.system != "single_sft", "method",
             f"'{self.method}' trains latent steps, which single_sft has none of (use single_latent)"),
            (self.latent_map == "ridge" or self.thinks, "latent_map",
             f"'{self.latent_map}' needs latent steps (latent_steps > 0, system diffmas or single_latent)"),
            (self.method != "curriculum" or self.latent_steps == cur.stages * cur.thoughts_per_step, "latent_steps",
             f"must equal curriculum.stages x curriculum.thoughts_per_step "
             f"({cur.stages} x {cur.thoughts_per_step} = {cur.stages * cur.thoughts_per_step}) for method curriculum"),
            (cur.stages >= 1 and cur.thoughts_per_step >= 1 and cur.stage_steps >= 1, "curriculum",
             "stages, thoughts_per_step and stage_steps must be >= 1"),
            (self.method != "curriculum" or self.steps > cur.stages * cur.stage_steps, "steps",
             f"must exceed curriculum.stages x curriculum.stage_steps ({cur.stages * cur.stage_steps}) so that the "
             "last (all-latent) stage is trained"),
            (0 <= cur.mixin < 1, "curriculum.mixin", "must be in [0, 1)"),
            (self.distill.weight >= 0, "distill.weight", "must be >= 0"),
            (self.distill.teacher_weight >= 0, "distill.teacher_weight", "must be >= 0"),
            (self.link.pretrain_steps >= 0, "link.pretrain_steps", "must be >= 0"),
            (self.grad_mode in ("coupled", "detached", "kv_only"), "grad_mode",
             "must be 'coupled', 'detached' or 'kv_only'"),
            (self.latent_steps >= 0, "latent_steps", "must be >= 0"),
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1"),
            (self.mixed_precision in ("no", "bf16", "auto"), "mixed_precision", "must be 'no', 'bf16' or 'auto'"),
            (self.data.target_style in ("answer", "worked"), "data.target_style", "must be 'answer' or 'worked'"),
            (self.trace in (None, *TRACE_SCOPES), "trace", f"must be one of {', '.join(TRACE_SCOPES)}"),
            (0 <= self.channel.anneal < 1, "channel.anneal", "must be in [0, 1)"),
            (self.channel.autoencode_steps >= 0, "channel.autoencode_steps", "must be >= 0"),
            (not (self.channel.anneal or self.channel.autoencode_steps) or self.system == "diffmas", "channel",
             "trains a channel between agents: system must be diffmas"),
            (self.channel.autoencode_steps < self.steps, "channel.autoencode_steps", "must be below steps"),
            (not self.stop.enabled or self.eval_every > 0, "stop.enabled",
             "needs the held-out loss during training: set eval_every > 0"),
            (self.stop.min_steps >= 1 and 0 < self.stop.window < 1 and self.stop.tolerance >= 0, "stop",
             "needs min_steps >= 1, window in (0, 1) and tolerance >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise DiffMASError(f"config field '{name}' {why}")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{where}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        return _check_type(value, hint, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DiffMASError(f"config field '{where}' must be a list, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        # YAML 1.1 reads an unquoted no/yes/off/on as a boolean: say so, since `mixed_precision: no` looks right.
        quote = " (YAML reads unquoted no/yes/off/on as booleans: quote the word)" if hint is str and \
            isinstance(value, bool) else ""
        raise DiffMASError(f"config field '{where}' must be {hint.__name__}, got {value!r}{quote}")
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown fields and wrong types by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DiffMASError(f"config section '{prefix or cls.__name__}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DiffMASError(f"unknown config field(s) {[f'{prefix}{u}' for u in unknown]}")
    kwargs = {k: _check_type(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except DiffMASError as exc:
        if prefix and "config field '" in str(exc):
            raise DiffMASError(str(exc).replace("config field '", f"config field '{prefix}", 1)) from None
        raise


def to_dict(obj: Any) -> dict:
    """Plain-data view of a config (tuples become lists, so YAML stays readable)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(obj))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) with dotted-key overrides applied on top."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DiffMASError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DiffMASError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(TrainConfig, data)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

"""Training objectives over the one rollout: what each step teacher-forces, and how its loss is composed.

- ``answer``: the final agent is teacher-forced on the example's target (answer-only or worked).
- ``curriculum`` (Coconut, arXiv 2412.06769): at stage s the thinker (the last writer, or the final agent of
  ``single_latent``) takes s x c latent steps, then writes the remaining worked steps as teacher-forced text
  with loss; the final agent is trained on the answer line. Stages advance every ``stage_steps`` steps; with
  probability ``mixin`` a batch replays an earlier stage. At the last stage every step is latent and nothing
  is written, which is exactly the inference rollout.
- ``channel`` options (relay tasks, trace scope ``latents``), composable with the grad modes: the bottleneck
  curriculum (``channel.anneal``: each writer-prompt column stays visible downstream with a probability falling
  from 1 to 0, then only the latent steps are), and autoencoding pre-training (``channel.autoencode_steps``, as
  ICAE: the final agent, seeing the problem only through the trace, first learns to reproduce what the writers
  saw, word for word; its prompt then asks for that instead of the answer).
- ``distill`` (CODI, arXiv 2502.21074): a teacher pass whose thinker writes the whole worked solution as text,
  and the student pass with latent thinkers; loss = student answer CE + alpha x the teacher's own CE (worked
  text and answer) + lambda x smooth-L1 between the final agent's hidden states at the position that predicts
  the answer, each layer divided by the teacher's standard deviation there. The distance carries no gradient
  into the teacher's states; the teacher is trained by its own CE only. Without that CE (alpha = 0) nothing
  anchors the teacher, and the shared weights can make the two passes agree by ignoring the trace: measured,
  the study's first distillation arm collapsed to 0.016 accuracy that way.

The step loss is normalised globally: each CE summed over the teacher-forced tokens of the global batch and
divided by their number, plus lambda x the distillation term summed over rows divided by the global batch
size, so one process and N processes follow the same curve.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmas.backbone import Backbone
from diffmas.config import TrainConfig
from diffmas.errors import DiffMASError
from diffmas.forced import count_forced_tokens
from diffmas.prompts import Topology, view_text
from diffmas.rollout import RolloutSpec, rollout
from diffmas.train.data import TrainExample


def base_stage(step: int, cfg: TrainConfig) -> int:
    """The curriculum stage scheduled at (0-based) ``step``, before mix-in."""
    return min(step // cfg.curriculum.stage_steps, cfg.curriculum.stages)


def curriculum_stage(step: int, cfg: TrainConfig) -> int:
    """The stage a batch uses: the scheduled one, or with probability ``mixin`` an earlier one.

    Drawn from a generator seeded by (seed, step), so a resumed run replays the same stages.
    """
    stage = base_stage(step, cfg)
    rng = random.Random(cfg.seed * 1_000_003 + step)
    if stage > 0 and rng.random() < cfg.curriculum.mixin:
        return rng.randrange(stage)
    return stage


def starts_new_stage(step: int, cfg: TrainConfig) -> bool:
    """Whether ``step`` is the first step of a scheduled curriculum stage (after stage 0)."""
    return cfg.method == "curriculum" and step > 0 and base_stage(step, cfg) != base_stage(step - 1, cfg)


@dataclass(frozen=True)
class StepPlan:
    """What one step teacher-forces, for a list of examples."""

    prompts: list
    """Per row, what the agents may see (views, see :class:`diffmas.train.data.TrainExample`) or a question."""
    targets: list[str]
    """The final agent's targets."""
    thinker_texts: list[str] | None = None
    """Per row, what the thinker writes after its latent steps (teacher-forced, with loss)."""
    thinker_latent_steps: int | None = None
    stage: int | None = None
    teacher_texts: list[str] | None = None
    """Distillation: the worked steps the teacher pass's thinker writes as text."""
    reveal: float = 0.0
    """Bottleneck curriculum: the probability that a writer-prompt column stays visible downstream."""
    reveal_seed: int = 0

    def rows(self, index: slice | list[int]) -> StepPlan:
        """The same plan for a subset of rows (a process's share of a micro-batch)."""
        pick = (lambda xs: xs[index]) if isinstance(index, slice) else (lambda xs: [xs[i] for i in index])
        opt = lambda xs: None if xs is None else pick(xs)  # noqa: E731
        return StepPlan(pick(self.prompts), pick(self.targets), opt(self.thinker_texts), self.thinker_latent_steps,
                        self.stage, opt(self.teacher_texts), self.reveal, self.reveal_seed)


AUTOENCODE_INSTRUCTION = "Repeat, word for word, what the team was given."
"""What the final agent is asked in autoencoding steps, in place of the answer-format line it sees otherwise."""


def reveal_at(step: int, cfg: TrainConfig) -> float:
    """The bottleneck curriculum's visibility of writer-prompt columns at (0-based) ``step``: 1 falling linearly
    to 0 over the first ``channel.anneal`` share of the steps, 0 afterwards (and when it is off)."""
    span = cfg.channel.anneal * cfg.steps
    return max(0.0, 1.0 - step / span) if span else 0.0


def autoencode_plan(topology: Topology, examples: list[TrainExample], reveal: float, seed: int) -> StepPlan:
    """An autoencoding step: the final agent (which must see none of the problem) is asked to repeat what the
    writers saw, and teacher-forced on it."""
    if topology.final.sees != "none" or not topology.writers:
        raise DiffMASError(f"autoencoding trains the final agent to repeat what the writers saw: topology "
                           f"'{topology.name}' needs writers and a final agent with sees: none")
    prompts = [{**ex.prompt, "none": AUTOENCODE_INSTRUCTION} for ex in examples]
    targets = ["\n\n".join(view_text(w, ex.prompt) for w in topology.writers) for ex in examples]
    return StepPlan(prompts, targets, reveal=reveal, reveal_seed=seed)


def plan_step(cfg: TrainConfig, step: int, examples: list[TrainExample], topology: Topology) -> StepPlan:
    """The teacher-forcing plan of ``step`` for ``examples`` under ``cfg.method`` and ``cfg.channel``."""
    prompts = [ex.prompt for ex in examples]
    reveal, seed = reveal_at(step, cfg), cfg.seed * 1_000_003 + step
    if step < cfg.channel.autoencode_steps:
        return autoencode_plan(topology, examples, reveal, seed)
    if cfg.method == "answer":
        return StepPlan(prompts, [ex.target for ex in examples], reveal=reveal, reveal_seed=seed)
    answers = [ex.answer for ex in examples]
    if cfg.method == "distill":
        return StepPlan(prompts, answers, teacher_texts=["\n".join(ex.steps) for ex in examples])
    stage = curriculum_stage(step, cfg)
    last = cfg.curriculum.stages
    texts = ["\n".join(ex.steps[stage:]) if stage < last else "" for ex in examples]
    return StepPlan(prompts, answers, texts, stage * cfg.curriculum.thoughts_per_step, stage)


def heldout_targets(cfg: TrainConfig, examples: list[TrainExample]) -> list[str]:
    """Held-out targets in the inference configuration: grounded methods answer at once."""
    return [ex.target if cfg.method == "answer" else ex.answer for ex in examples]


@dataclass(frozen=True)
class StepNorm:
    """The global batch's normalisers, known before the forward."""

    tokens: int
    """Tokens that carry the (student) cross-entropy."""
    rows: int
    teacher_tokens: int = 0
    """Distillation: tokens that carry the teacher pass's cross-entropy (worked text and answer)."""


def plan_norm(backbone: Backbone, spec: RolloutSpec, plan: StepPlan) -> StepNorm:
    """The normalisers of the global batch ``plan``."""
    teacher = 0 if plan.teacher_texts is None else \
        count_forced_tokens(backbone, spec, plan.targets, plan.teacher_texts)
    return StepNorm(count_forced_tokens(backbone, spec, plan.targets, plan.thinker_texts), len(plan.prompts), teacher)


def distill_distance(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], layers: tuple[int, ...]) -> Tensor:
    """Per row [B]: mean over ``layers`` of smooth-L1(student, teacher) / std(teacher), over the hidden size.

    Zero when the states agree; the teacher side carries no gradient. Per-row statistics keep it
    independent of what else is in the batch.
    """
    use = layers or tuple(range(1, len(teacher)))
    bad = [i for i in use if not 0 <= i < len(teacher)]
    if bad:
        raise DiffMASError(f"distill.layers {bad} out of range: this model has layers 1..{len(teacher) - 1}")
    terms = []
    for i in use:
        s, t = student[i].float(), teacher[i].detach().float()
        scale = t.std(dim=-1).clamp(min=1e-6)
        terms.append(F.smooth_l1_loss(s, t, reduction="none").mean(-1) / scale)
    return torch.stack(terms).mean(0)


def step_loss(backbone: Backbone, spec: RolloutSpec, cfg: TrainConfig, plan: StepPlan, norm: StepNorm,
              checkpoint: bool = False) -> tuple[Tensor, Tensor]:
    """(this share's contribution to the global step loss, its sums [CE, distillation distance, teacher CE]).

    ``norm`` holds the global batch's normalisers.
    """
    result = rollout(backbone, spec, plan.prompts, targets=plan.targets, thinker_texts=plan.thinker_texts,
                     thinker_latent_steps=plan.thinker_latent_steps, capture=plan.teacher_texts is not None,
                     grad_mode=cfg.grad_mode, checkpoint=checkpoint, reveal=plan.reveal, reveal_seed=plan.reveal_seed)
    ce_sum = result.loss * result.target_tokens
    loss = ce_sum / norm.tokens
    distill_sum = teacher_sum = torch.zeros((), device=ce_sum.device)
    if plan.teacher_texts is not None:
        train_teacher = cfg.distill.teacher_weight > 0
        with torch.set_grad_enabled(train_teacher and torch.is_grad_enabled()):
            teacher = rollout(backbone, spec, plan.prompts, targets=plan.targets, thinker_texts=plan.teacher_texts,
                              thinker_latent_steps=0, capture=True,
                              grad_mode=cfg.grad_mode if train_teacher else "detached", checkpoint=checkpoint)
        teacher_sum = teacher.loss * teacher.target_tokens
        if train_teacher:
            loss = loss + cfg.distill.teacher_weight * teacher_sum / norm.teacher_tokens
        distill_sum = distill_distance(result.captured, teacher.captured, cfg.distill.layers).sum()
        loss = loss + cfg.distill.weight * distill_sum / norm.rows
    return loss, torch.stack([ce_sum.detach(), distill_sum.detach(), teacher_sum.detach()])

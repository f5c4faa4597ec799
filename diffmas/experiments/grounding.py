"""The grounding study: does a trained latent channel earn its place once its thoughts are grounded?

    make study          # two one-thread workers side by side; resumable; hours on 2 CPU cores
    diffmas study --out runs/study --docs docs/study [--commit]

Arms (same data, steps and batch within a task; each evaluated greedily on the same held-out problems):
single_sft answer-only and worked (the fair baselines), diffmas answer-only (coupled), diffmas + curriculum,
diffmas + distillation, diffmas + learned link, the pause control, m = 0 with the trace kept, and the
single-agent latent arm (one agent thinks with the same curriculum). Phase 2 adds training seeds 1 and 2 of
both baselines, of the two best grounded arms of phase 1 and of diffmas answer-only; phase 3 repeats the
decisive arms on a second generator. The shuffled-trace control is evaluated for diffmas answer-only, curriculum
and distillation (in phase 1).

Each worker claims the next arm that is ready (an exclusive claim file; a dead worker's claim is taken over),
trains it (resuming an interrupted run), evaluates it (resuming from the sample log), then writes the arm's
results and training curve under ``docs`` and rebuilds results.json, README.md and the plots there. Weights
stay under ``out``; only results are written to ``docs`` (and committed with ``--commit``), so the study
carries on where it stopped on a fresh machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from diffmas.config import CurriculumConfig, DataConfig, DistillConfig, LinkConfig, ModelConfig, TrainConfig, to_dict
from diffmas.experiments.presets import machine_description, train_once
from diffmas.experiments.workers import code_version, work_through

TASKS = ("rg:chain_sum", "rg:leg_counting")
GROUNDED = ("curriculum", "distill", "link")
BASELINES = ("sft_answer", "sft_worked")
# Seeded in phase 2 as well: the plain answer-only channel is the demo's recipe, and its one-seed lead over
# sft_answer in phase 1 (+3 points) is the size of sft_answer's own seed-to-seed spread.
RECIPE = "diffmas_answer"


@dataclass(frozen=True)
class StudyConfig:
    """The study's budget (the same for every arm of a task).

    Chosen to fit about 4 hours of two one-thread workers on the 2-core CPU (measured: a diffmas step with
    m = 6 costs ~12 s at one thread, distillation ~17 s, single_sft ~4 s; a 500-problem evaluation ~6.5 min):
    120 steps x batch 8 is 1.5x the demo's budget, past the point where calibration's single_sft worked run
    gained most of its accuracy (0.51 at 80 steps, 0.61 at 149); the held-out loss is logged every 15 steps
    so the curves show whether it has flattened.
    """

    steps: int = 120
    batch_size: int = 8
    lr: float = 1e-3
    latent_steps: int = 6
    """m for every latent arm: the curriculum's last stage (3 stages x 2 thoughts per worked step)."""
    stage_steps: int = 25
    distill_weight: float = 20.0
    link_pretrain_steps: int = 100
    n_eval: int = 500
    max_new_tokens: int = 96
    eval_batch_size: int = 16
    heldout_every: int = 15
    model: str = "smollm2-135m-instruct"
    topology: str = "duo"


@dataclass(frozen=True)
class Arm:
    """One training run and its evaluation."""

    name: str
    """The arm (``curriculum``, ``sft_answer``, ...); the id adds task and training seed."""
    task: str
    seed: int
    phase: int = 1
    shuffled: bool = False
    """Also evaluate with shuffled traces (the control that asks whether the trace is question-specific)."""

    @property
    def system(self) -> str:
        return arm_changes(self.name)[0]

    @property
    def id(self) -> str:
        return f"{self.task.removeprefix('rg:')}--{self.name}--s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.name}/s{self.seed}"


def arm_changes(name: str) -> tuple[str, dict]:
    """(system, TrainConfig changes) of an arm by name."""
    worked = {"data.target_style": "worked"}
    curriculum = {**worked, "method": "curriculum"}
    return {
        "sft_answer": ("single_sft", {}),
        "sft_worked": ("single_sft", worked),
        "diffmas_answer": ("diffmas", {}),
        "m0_trace": ("diffmas", {"latent_steps": 0}),
        "curriculum": ("diffmas", curriculum),
        "distill": ("diffmas", {**worked, "method": "distill"}),
        "link": ("diffmas", {"latent_map": "link"}),
        "pause": ("diffmas", {**curriculum, "latent_map": "pause"}),
        "single_latent": ("single_latent", curriculum),
    }[name]


def train_config(arm: Arm, cfg: StudyConfig, device: str = "cpu") -> TrainConfig:
    system, changes = arm_changes(arm.name)
    data = DataConfig(task=arm.task, target_style=changes.get("data.target_style", "answer"), heldout_examples=32)
    return TrainConfig(
        system=system, topology=cfg.topology, latent_steps=changes.get("latent_steps", cfg.latent_steps),
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=arm.seed, checkpoint_every=15,
        eval_every=cfg.heldout_every, mixed_precision="auto",
        model=ModelConfig(name=cfg.model, device=device), data=data,
        method=changes.get("method", "answer"), latent_map=changes.get("latent_map", "ridge"),
        curriculum=CurriculumConfig(stages=3, thoughts_per_step=cfg.latent_steps // 3, stage_steps=cfg.stage_steps,
                                    mixin=0.3, reset_optimizer=True),
        distill=DistillConfig(weight=cfg.distill_weight), link=LinkConfig(pretrain_steps=cfg.link_pretrain_steps))


def plan_arms(docs: Path) -> list[Arm]:
    """Every arm in priority order; phase-2/3 arms appear once phase 1 has named the best grounded arms."""
    chain, legs = TASKS
    screen = ["sft_answer", "sft_worked", "curriculum", "distill", "diffmas_answer", "pause", "link",
              "single_latent", "m0_trace"]
    # The shuffled-trace control costs a second evaluation: run it where the question matters most.
    shuffled = {"diffmas_answer", "curriculum", "distill"}
    arms = [Arm(n, chain, 0, shuffled=n in shuffled) for n in screen]
    best = best_grounded(docs)
    if best:
        for seed in (1, 2):
            arms += [Arm(n, chain, seed, phase=2) for n in (*BASELINES, *best, RECIPE)]
        arms += [Arm(n, legs, 0, phase=3) for n in (*BASELINES, best[0], "pause")]
    return arms


def best_grounded(docs: Path) -> tuple[str, ...]:
    """The two grounded arms with the best seed-0 accuracy on the first task, once all three are done."""
    found = {}
    for name in GROUNDED:
        path = docs / "arms" / f"{TASKS[0].removeprefix('rg:')}--{name}--s0.json"
        if not path.is_file():
            return ()
        found[name] = json.loads(path.read_text())["accuracy"]
    return tuple(sorted(found, key=lambda n: -found[n])[:2])


def _evaluate(arm: Arm, adapter: Path, out: Path, cfg: StudyConfig, device: str, shuffled: bool) -> dict:
    from diffmas.eval.runner import run_eval

    return run_eval([f"{arm.label}={arm.system}:{adapter}"], [arm.task], out, model=cfg.model, limit=cfg.n_eval,
                    batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, device=device,
                    shuffle_trace=shuffled, show_progress=True)


def run_arm(arm: Arm, cfg: StudyConfig, out: Path, docs: Path, device: str = "cpu") -> dict:
    """Train and evaluate one arm; writes docs/arms/<id>.json and docs/curves/<id>.jsonl."""
    tcfg = train_config(arm, cfg, device)
    started = time.time()
    run = train_once(tcfg, out / "runs" / arm.id)
    train_s = time.time() - started
    result = _evaluate(arm, run, out / "eval" / arm.id, cfg, device, shuffled=False)["results"][0]
    record = {"arm": arm.name, "task": arm.task, "seed": arm.seed, "phase": arm.phase, "system": arm.system,
              "label": arm.label, "n": result["n"], "accuracy": result["accuracy"], "stderr": result["stderr"],
              "format_failures": result.get("format_failures"), "tokens_mean": result.get("tokens_mean"),
              "accuracy_flexible": result.get("accuracy_flexible"), "train_seconds": round(train_s),
              "config": to_dict(tcfg), "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
              "code": code_version()}
    if arm.shuffled:
        shuffled = _evaluate(arm, run, out / "eval" / f"{arm.id}--shuffled", cfg, device, shuffled=True)
        row = shuffled["results"][0]
        record["shuffled"] = {"accuracy": row["accuracy"], "stderr": row["stderr"], "n": row["n"]}
    (docs / "arms").mkdir(parents=True, exist_ok=True)
    (docs / "curves").mkdir(parents=True, exist_ok=True)
    (docs / "curves" / f"{arm.id}.jsonl").write_text((run / "metrics.jsonl").read_text())
    outcomes = [json.loads(line) for line in (out / "eval" / arm.id / "samples.jsonl").read_text().splitlines()]
    (docs / "samples").mkdir(parents=True, exist_ok=True)
    (docs / "samples" / f"{arm.id}.jsonl").write_text("".join(
        json.dumps({k: s[k] for k in ("id", "correct", "tokens", "extracted")}) + "\n" for s in outcomes))
    (docs / "arms" / f"{arm.id}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_study(out: Path, docs: Path, cfg: StudyConfig | None = None, device: str = "cpu", commit: bool = False,
              max_arms: int | None = None) -> None:
    """Work through the arms until none is left to claim (resumable; several workers may run at once)."""
    from diffmas.experiments.grounding_report import write_report

    cfg = cfg or StudyConfig()
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "study_config.json").write_text(json.dumps(cfg.__dict__, indent=2) + "\n")

    def run(arm: Arm) -> str:
        record = run_arm(arm, cfg, out, docs, device)
        return (f"study: {arm.id} finished: accuracy {record['accuracy']:.3f} ± {record['stderr']:.3f} "
                f"(n = {record['n']})")

    work_through(lambda: plan_arms(docs), run, lambda: write_report(docs), out, docs, commit, max_arms)

"""Command line: thin wrappers over library functions.

    diffmas run --system latent_mas --question "What is 17 + 25?"
    diffmas train --config configs/train/demo.yaml --out runs/demo/diffmas
    diffmas eval --systems single,latent_mas --task rg:chain_sum --limit 100 --out runs/eval
    diffmas pull            # convert the embedded default model once (offline)
    diffmas serve --systems single,latent_mas   # the OpenAI API on http://127.0.0.1:8000/v1

This module holds the app, the options several commands share and the commands that run, train and evaluate;
``channel`` (probe, lens, lens-curve), ``experiments`` (demo, compare, the studies) and ``serve`` add theirs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from diffmas.assets import DEFAULT_MODEL
from diffmas.errors import DiffMASError

# Plain click help (rich_markup_mode=None): rich's option table cuts long option names ("--curriculum-stag…")
# at 80 columns and in pipes, and at any width when a boolean flag has a long negative form.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Multi-agent LLMs that talk through a trained KV channel.")
console = Console(stderr=True)


# Engine settings shared by `run` and `eval` (one definition, so their flags cannot drift apart).
REALIGN_OPTION = typer.Option(True, "--realign/--no-realign", help="Realignment matrix before the norm rescaling "
                              "(--no-realign: rescaling only). Trained adapters use their saved setting.")
THINK_OPTION = typer.Option(False, "--think/--no-think", help="Render prompts with enable_thinking on, for chat "
                            "templates that have the switch (Qwen3). Off by default: untrained systems would "
                            "otherwise think past their token budget.")
TRACE_OPTION = typer.Option(None, help="Trace scope, keep | drop | latents: keep = every writer's prompt and "
                                       "output stay in the trace; drop = a writer with 0 latent steps adds nothing "
                                       "(LatentMAS); latents = later agents see only the writers' latent steps (or "
                                       "text replies), not their prompts. Default: the topology's, else keep "
                                       "(trained systems: what they were trained with).")


def user_errors(fn):
    """Print a DiffMASError as one line and exit with its code (2 unless it says otherwise), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffMASError as exc:
            print(f"{exc.label}: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def read_questions(question: Optional[str], question_file: Optional[Path]) -> list[str]:
    if (question is None) == (question_file is None):
        raise DiffMASError("give exactly one of --question TEXT or --question-file FILE")
    if question is not None:
        if not question.strip():
            raise DiffMASError("--question is empty")
        return [question]
    if not question_file.is_file():
        raise DiffMASError(f"question file {question_file} does not exist")
    lines = [line.strip() for line in question_file.read_text().splitlines() if line.strip()]
    if not lines:
        raise DiffMASError(f"question file {question_file} has no questions (one per line)")
    return lines


def _agent_table(record: dict) -> Table:
    table = Table(show_header=True, header_style="bold")
    for col in ("agent", "prompt tok", "latent steps", "generated tok", "seconds"):
        table.add_column(col, justify="right" if col != "agent" else "left")
    for agent in record["agents"]:
        table.add_row(agent["role"], str(agent["prompt_tokens"]), str(agent["latent_steps"]),
                      str(agent["generated_tokens"]), f"{agent['seconds']:.2f}")
    return table


@app.command()
@user_errors
def run(
    system: str = typer.Option("latent_mas", help="single | text_mas | latent_mas | diffmas | single_sft"),
    question: Optional[str] = typer.Option(None, help="One question."),
    question_file: Optional[Path] = typer.Option(None, help="A file with one question per line."),
    topology: Optional[str] = typer.Option(None, help="sequential | hierarchical | a YAML file (default: sequential, "
                                                      "or the adapter's)"),
    latent_steps: Optional[int] = typer.Option(None, help="Latent steps per writer agent (default 10, or the adapter's)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, local folder, or hub id."),
    adapter: Optional[str] = typer.Option(None, help="Trainer output dir (diffmas, single_sft)."),
    max_new_tokens: int = typer.Option(256, help="Tokens the final agent may generate."),
    writer_max_new_tokens: int = typer.Option(128, help="Token budget of each text_mas writer."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(8),
    realign: bool = REALIGN_OPTION,
    think: bool = THINK_OPTION,
    trace: Optional[str] = TRACE_OPTION,
    show_latents: bool = typer.Option(False, help="Logit lens: top-3 tokens of every latent step."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("float32"),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per question."),
) -> None:
    """Answer questions with one system."""
    from diffmas.backbone import load_backbone
    from diffmas.decode import DecodeConfig
    from diffmas.systems import build_system, get_kind

    get_kind(system)  # fail on a typo before loading a model
    questions = read_questions(question, question_file)
    try:
        decode_cfg = DecodeConfig(max_new_tokens, temperature, top_p, seed)
    except ValueError as exc:
        raise DiffMASError(str(exc)) from exc
    backbone = load_backbone(model, device, dtype)
    sys_ = build_system(system, backbone, topology=topology, latent_steps=latent_steps, adapter=adapter,
                        realign=realign, writer_max_new_tokens=writer_max_new_tokens,
                        lens_top_k=3 if show_latents else 0, think=think, trace=trace)
    records = sys_.run(questions, decode_cfg, batch_size)
    for q, rec in zip(questions, records):
        rec["question"] = q
    if as_json:
        print(json.dumps(records, indent=2, ensure_ascii=False))
        return
    out = Console()
    for rec in records:
        out.rule(f"[bold]{rec['question'][:100]}")
        out.print(rec["answer"].strip() or "[dim](empty answer)")
        out.print(_agent_table(rec))
        out.print(f"trace_tokens: {rec['trace_tokens']}")
        for agent in rec["agents"]:
            for step, top in enumerate(agent.get("latents", [])):
                out.print(f"  {agent['role']} latent {step + 1}: {' | '.join(repr(t) for t in top)}")


@app.command()
@user_errors
def train(
    out: Path = typer.Option(..., help="Output dir: adapters, checkpoints, metrics.jsonl, config.yaml."),
    config: Optional[Path] = typer.Option(None, help="YAML TrainConfig; flags below override it."),
    system: Optional[str] = typer.Option(None, help="diffmas | single_sft | single_latent"),
    method: Optional[str] = typer.Option(None, help="answer | curriculum | distill (grounded: needs "
                                                      "--target-style worked)"),
    latent_map: Optional[str] = typer.Option(None, help="ridge | link | pause | gated (pause: the control; gated: "
                                                          "pause plus the thought behind a learned gate from 0)"),
    curriculum_stages: Optional[int] = typer.Option(None, help="Curriculum stages S (latent_steps = S x c)."),
    thoughts_per_step: Optional[int] = typer.Option(None, help="Curriculum: latent steps c per replaced step."),
    stage_steps: Optional[int] = typer.Option(None, help="Curriculum: training steps per stage."),
    mixin: Optional[float] = typer.Option(None, help="Curriculum: probability of replaying an earlier stage."),
    distill_weight: Optional[float] = typer.Option(None, help="Distillation: lambda."),
    distill_teacher_weight: Optional[float] = typer.Option(None, help="Distillation: alpha, the weight of the "
                                                           "teacher pass's own CE (default 1; 0 leaves it untrained)."),
    link_pretrain_steps: Optional[int] = typer.Option(None, help="Learned link: text pre-training steps."),
    model: Optional[str] = typer.Option(None),
    task: Optional[str] = typer.Option(None, help="e.g. rg:chain_sum"),
    source: Optional[str] = typer.Option(None, help="Local jsonl of {question, target} rows."),
    target_style: Optional[str] = typer.Option(None, help="answer | worked"),
    steps: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    grad_accum: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    lora_rank: Optional[int] = typer.Option(None),
    latent_steps: Optional[int] = typer.Option(None),
    topology: Optional[str] = typer.Option(None),
    grad_mode: Optional[str] = typer.Option(None, help="coupled | kv_only (not through the fed-back latent "
                                            "inputs) | detached"),
    adapters: Optional[str] = typer.Option(None, help="shared | per-agent"),
    seed: Optional[int] = typer.Option(None, help="Seed of the adapters' initialisation, dropout, the curriculum's "
                                                 "masks and (unless --data-seed) the data."),
    data_seed: Optional[int] = typer.Option(None, help="Seed of the training and held-out draws (default: --seed)."),
    checkpoint_every: Optional[int] = typer.Option(None),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing"),
    mixed_precision: Optional[str] = typer.Option(
        None, help="no | bf16 | auto (bf16 where the device computes it natively: resolves per machine, so runs "
                   "on different machines may differ in precision; a resume in another one than its checkpoint's "
                   "is refused)"),
    think: Optional[bool] = typer.Option(None, "--think/--no-think",
                                         help="Prompts with enable_thinking on (Qwen3-like templates; default off)."),
    realign: Optional[bool] = typer.Option(None, "--realign/--no-realign",
                                           help="Ridge realignment before the norm rescaling (default on; "
                                                "--no-realign: rescaling only)."),
    trace: Optional[str] = typer.Option(None, help="Trace scope keep | drop | latents (latents: the final agent "
                                                   "sees only the writers' latent steps)."),
    anneal: Optional[float] = typer.Option(None, help="Bottleneck curriculum (--trace latents): share of the steps "
                                                      "over which writer prompts fade from view (0: off)."),
    autoencode_steps: Optional[int] = typer.Option(None, help="Autoencoding pre-training: first N steps, the final "
                                                   "agent repeats what the writers saw (it must see none)."),
    stop: Optional[bool] = typer.Option(None, "--stop-when-flat/--no-stop-when-flat",
                                        help="Stop once the held-out loss improves < 1% over the last 20% of the "
                                             "steps (at least 300; needs --eval-every)."),
    eval_every: Optional[int] = typer.Option(None, help="Held-out loss every N steps (0: start and end only)."),
    heldout_examples: Optional[int] = typer.Option(None, help="Held-out (validation) examples."),
    device: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in --out. Only the budget may "
                                            "change: the steps, the batch split, the stopping rule "
                                            "(turned off, a run that stopped on a plateau goes on)."),
) -> None:
    """Train DiffMAS (or the single_sft baseline) with LoRA; runs unchanged under `accelerate launch`."""
    from diffmas.backbone import precision_name
    from diffmas.config import load_config
    from diffmas.train.loop import train as run_training

    overrides = {
        "system": system, "model.name": model, "data.task": task, "data.source": source,
        "data.target_style": target_style, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
        "lr": lr, "lora.rank": lora_rank, "latent_steps": latent_steps, "topology": topology,
        "grad_mode": grad_mode, "lora.layout": adapters, "seed": seed, "checkpoint_every": checkpoint_every,
        "activation_checkpointing": activation_checkpointing, "mixed_precision": mixed_precision,
        "model.device": device, "method": method, "latent_map": latent_map,
        "curriculum.stages": curriculum_stages, "curriculum.thoughts_per_step": thoughts_per_step,
        "curriculum.stage_steps": stage_steps, "curriculum.mixin": mixin, "distill.weight": distill_weight,
        "distill.teacher_weight": distill_teacher_weight, "link.pretrain_steps": link_pretrain_steps,
        "think": think, "realign": realign, "trace": trace, "channel.anneal": anneal,
        "channel.autoencode_steps": autoencode_steps, "stop.enabled": stop, "eval_every": eval_every,
        "data.heldout_examples": heldout_examples, "data.seed": data_seed,
    }
    cfg = load_config(config, overrides)
    summary = run_training(cfg, out, resume=resume)
    if summary["is_main_process"]:
        console.print(f"adapters, checkpoints and metrics in {summary['out']}; held-out loss "
                      f"{summary['heldout_loss_start']:.4f} -> {summary['heldout_loss_end']:.4f}; trained in "
                      f"{precision_name(summary['mixed_precision'], cfg.model.dtype)} "
                      f"(mixed_precision: {cfg.mixed_precision})")


@app.command("export-checkpoint")
@user_errors
def export_checkpoint(
    run_dir: Path = typer.Argument(..., help="A training run's folder (the --out of `diffmas train`)."),
    out: Path = typer.Option(..., help="Folder for the adapters (a new one, not the run's)."),
    step: Optional[int] = typer.Option(None, help="The checkpoint's step (default: the run's last checkpoint)."),
) -> None:
    """Write a training checkpoint as an adapter folder, to evaluate or serve a run as it stood at that step."""
    from diffmas.train.export import export_checkpoint as export

    console.print(f"adapters of {run_dir} at step {step or 'last'}: {export(run_dir, out, step)}")


@app.command()
@user_errors
def pull(model: str = typer.Option(DEFAULT_MODEL, help="Embedded model alias to convert.")) -> None:
    """Convert an embedded model into the cache once (offline); later loads take about a second."""
    from diffmas.assets import resolve_model

    console.print(f"{model}: {resolve_model(model)}")


@app.command("eval")
@user_errors
def eval_(
    systems: Optional[str] = typer.Option(None, help="e.g. single,text_mas,latent_mas,diffmas:ADAPTER_DIR"),
    task: Optional[list[str]] = typer.Option(None, help="Task(s): repeat --task or give a comma list."),
    out: Optional[Path] = typer.Option(None, help="Output dir: samples.jsonl, results.json, plots. The same command "
                                                  "resumes an interrupted run. With --report: where plots go."),
    limit: Optional[int] = typer.Option(None, help="First N examples of each task."),
    seeds: int = typer.Option(1, help="Number of seeds (0..S-1); with greedy decoding extra seeds are redundant."),
    batch_size: int = typer.Option(8),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, local folder, or hub id."),
    max_new_tokens: int = typer.Option(256, help="Tokens the final agent may generate."),
    writer_max_new_tokens: int = typer.Option(128, help="Token budget of each text_mas writer."),
    latent_steps: Optional[int] = typer.Option(None, help="Latent steps per writer (default 10, or the adapter's)."),
    topology: Optional[str] = typer.Option(None, help="sequential | hierarchical | a YAML file."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 also reports pass@k over the seeds."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling (with temperature > 0), for the final agent and text "
                                          "writers alike."),
    realign: bool = REALIGN_OPTION,
    think: bool = THINK_OPTION,
    trace: Optional[str] = TRACE_OPTION,
    text_context_limit: Optional[int] = typer.Option(None, help="text_mas: the most real tokens the shared trace "
                                                     "may hold after a writer's turn; replies are cut to fit."),
    budget_from: Optional[str] = typer.Option(None, help="Full thinking budget baseline: single@budget (or every "
                                              "single-agent system) answers with the summed budget of this "
                                              "multi-agent system: a label here, or DIR / DIR:LABEL of an earlier "
                                              "eval."),
    source: Optional[str] = typer.Option(None, help="Local file or hub id for the (single) task's data."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("float32"),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    shuffle_trace: bool = typer.Option(False, "--shuffle-trace", help="Control: each question reads the writers' "
                                                                      "trace of another question of the set."),
    shuffle_part: Optional[str] = typer.Option(None, "--shuffle-part", metavar="PART",
                                               help="Control on a split task: only this part of each question "
                                                    "(e.g. part:b) comes from another question of the set; the "
                                                    "writers that see it work on that part, the others on their own."),
    shuffle_thought: bool = typer.Option(False, "--shuffle-thought", help="Control on latent writers: each "
                                         "writer prefills its own question but its latent steps are fed the "
                                         "inputs it computed on another question of the set."),
    report: bool = typer.Option(False, "--report", help="Only re-render table, plots and each dir's report.html."),
    dirs: Optional[list[Path]] = typer.Argument(None, metavar="DIR", help="With --report: result dirs to merge.",
                                              show_default=False),
) -> None:
    """Evaluate systems on tasks (per-sample log, resumable), or re-render a saved report with --report."""
    from diffmas.eval.html_report import write_html_report
    from diffmas.eval.report import plot, render_table
    from diffmas.eval.report import report as render_report

    if report:
        if not dirs or systems or task:
            raise DiffMASError("--report takes result dirs only: diffmas eval --report DIR [DIR ...]")
        _, table, plots = render_report(dirs, out)
        where = ", ".join(str(d / "results.json") for d in dirs)
        pages = [write_html_report(d) for d in dirs]  # one self-contained page per run
    else:
        from diffmas.eval.runner import run_eval

        if dirs:
            raise DiffMASError(f"unexpected argument(s) {' '.join(map(str, dirs))} (did you mean --report?)")
        if not systems or not task or out is None:
            raise DiffMASError("give --systems, --task and --out (or --report DIR ... to re-render saved results)")
        if seeds < 1:
            raise DiffMASError("--seeds must be >= 1")
        tasks = [t.strip() for ts in task for t in ts.split(",") if t.strip()]
        results = run_eval(
            [s for s in systems.split(",") if s.strip()], tasks, out, model=model, limit=limit,
            seeds=tuple(range(seeds)), batch_size=batch_size, max_new_tokens=max_new_tokens,
            writer_max_new_tokens=writer_max_new_tokens, topology=topology, latent_steps=latent_steps, device=device,
            dtype=dtype, source=source, temperature=temperature, top_p=top_p, show_progress=not no_progress,
            shuffle_trace=shuffle_trace, shuffle_part=shuffle_part, shuffle_thought=shuffle_thought,
            realign=realign, think=think, trace=trace,
            text_context_limit=text_context_limit, budget_from=budget_from)
        if int(os.environ.get("RANK", "0")) != 0:  # accelerate launch: the main process reports (same results)
            return
        table, plots = render_table(results), plot(results, out)
        where = f"{out / 'results.json'} (per-sample log {out / 'samples.jsonl'})"
        pages = [write_html_report(out, results)]
    # Piped output gets a wide console: the default 80 columns would wrap every number.
    (Console() if sys.stdout.isatty() else Console(width=160)).print(table)
    console.print(f"results: {where}; plots: {', '.join(map(str, plots))}; HTML: {', '.join(map(str, pages))}")


# The commands of these modules join ``app`` as they are imported (after everything above, which they use).
from diffmas.cli import channel, experiments, serve  # noqa: E402,F401


def main() -> None:  # pragma: no cover - console entry point
    from diffmas.memory import configure_allocator, preload_jemalloc

    try:
        preload_jemalloc()  # restarts this process once with jemalloc, when installed (diffmas.memory)
        configure_allocator()  # the allocator policy (DIFFMAS_MALLOC)
    except DiffMASError as exc:  # a bad DIFFMAS_MALLOC: one line, as every other error of the command line
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        app()
    except SystemExit as exc:
        if exc.code in (0, None):
            close_process_group()
        raise
    close_process_group()


def close_process_group() -> None:
    """Tear down the process group `accelerate launch` set up, once the command has finished cleanly.

    Left to the interpreter's exit, gloo's worker threads can still hold tensors while Python is being torn down,
    and the process aborts now and then (SIGABRT, "terminate called without an active exception"; see
    pytorch/pytorch#190489). Not after a failure: a peer may be waiting in a collective and teardown would hang.
    """
    if "torch" not in sys.modules:  # no torch, no process group (``diffmas --help``)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

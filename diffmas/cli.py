"""Command line: thin wrappers over library functions.

    diffmas run --system latent_mas --question "What is 17 + 25?"
    diffmas train --config configs/train/demo.yaml --out runs/demo/diffmas
    diffmas eval --systems single,latent_mas --task rg:chain_sum --limit 100 --out runs/eval
    diffmas pull            # convert the embedded default model once (offline)
    diffmas serve --systems single,latent_mas   # the OpenAI API on http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Column, Table

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
    latent_map: Optional[str] = typer.Option(None, help="ridge | link | pause (pause: the control)"),
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
    seed: Optional[int] = typer.Option(None),
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
        "data.heldout_examples": heldout_examples,
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
            shuffle_trace=shuffle_trace, shuffle_part=shuffle_part, realign=realign, think=think, trace=trace,
            text_context_limit=text_context_limit, budget_from=budget_from)
        if int(os.environ.get("RANK", "0")) != 0:  # accelerate launch: the main process reports (same results)
            return
        table, plots = render_table(results), plot(results, out)
        where = f"{out / 'results.json'} (per-sample log {out / 'samples.jsonl'})"
        pages = [write_html_report(out, results)]
    # Piped output gets a wide console: the default 80 columns would wrap every number.
    (Console() if sys.stdout.isatty() else Console(width=160)).print(table)
    console.print(f"results: {where}; plots: {', '.join(map(str, plots))}; HTML: {', '.join(map(str, pages))}")


# The options of the commands that read a trained channel (probe, lens).
CHANNEL_ADAPTER_OPTION = typer.Option(None, help="Trainer output dir (diffmas).")
CHANNEL_TASK_OPTION = typer.Option("relay:digits", help="A generated task (fresh items are drawn from it).")
CHANNEL_TOPOLOGY_OPTION = typer.Option(None, help="Default: the task's (relay) or the adapter's.")
CHANNEL_STEPS_OPTION = typer.Option(None, help="Default: the adapter's (diffmas) or 10.")


@app.command()
@user_errors
def probe(
    system: str = typer.Option("diffmas", help="A multi-agent system: diffmas | latent_mas."),
    adapter: Optional[str] = CHANNEL_ADAPTER_OPTION,
    task: str = CHANNEL_TASK_OPTION,
    topology: Optional[str] = CHANNEL_TOPOLOGY_OPTION,
    latent_steps: Optional[int] = CHANNEL_STEPS_OPTION,
    trace: str = typer.Option("latents", help="Must leave every row the same width: latents."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, local folder, or hub id."),
    n: int = typer.Option(1500, help="Items: two thirds fitted, one third scored."),
    layers: Optional[str] = typer.Option(None, help="Comma list of layers (default: every 4th and the last)."),
    seed: int = typer.Option(0, help="The item draw, the fit/score split and the shuffled control."),
    batch_size: int = typer.Option(25),
    out: Optional[Path] = typer.Option(None, help="Write the probes as JSON here."),
    device: str = typer.Option("auto"),
) -> None:
    """Linear probes: what of the answer the final agent's view of the channel holds (docs: diffmas.eval.probe)."""
    from diffmas.eval.probe import probe_channel, probe_table, save_probe

    chosen = [int(x) for x in layers.split(",")] if layers else None
    sys_, task_ = _channel_system(system, model, device, task, topology=topology, latent_steps=latent_steps,
                                  adapter=adapter, trace=trace)
    started = time.time()
    probes = probe_channel(sys_, task_, n=n, layers=chosen, seed=seed, batch_size=batch_size)
    print("\n".join(probe_table(probes)), flush=True)
    if out is not None:
        save_probe(out, probes, _channel_settings(sys_, started, system=system, adapter=adapter, task=task,
                                                  trace=trace, model=model, n=n, seed=seed))
        console.print(f"probes: {out}")


def _channel_system(system: str, model: str, device: str, task: str, **settings):
    """The system whose channel ``probe`` or ``lens`` reads, and the task its items come from (a typo in either
    fails before a model loads)."""
    from diffmas.backbone import load_backbone
    from diffmas.systems import build_system, get_kind
    from diffmas.tasks import get_task

    get_kind(system)
    task_ = get_task(task)
    return build_system(system, load_backbone(model, device), default_topology=getattr(task_, "topology", None),
                        **settings), task_


def _channel_settings(channel, started: float, **given) -> dict:
    """What a probe or lens file records of the run: the options given, the channel's topology and m, the time."""
    return dict(given, topology=channel.spec.topology.name, latent_steps=channel.spec.latent_steps,
                seconds=round(time.time() - started))


@app.command()
@user_errors
def lens(
    system: str = typer.Option("diffmas", help="A multi-agent latent system: diffmas | latent_mas."),
    adapter: Optional[str] = CHANNEL_ADAPTER_OPTION,
    task: str = CHANNEL_TASK_OPTION,
    topology: Optional[str] = CHANNEL_TOPOLOGY_OPTION,
    latent_steps: Optional[int] = CHANNEL_STEPS_OPTION,
    trace: Optional[str] = TRACE_OPTION,
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, local folder, or hub id."),
    n: int = typer.Option(300, help="Items."),
    seed: int = typer.Option(0, help="The item draw."),
    batch_size: int = typer.Option(25),
    out: Optional[Path] = typer.Option(None, help="Write the lens as JSON here."),
    device: str = typer.Option("auto"),
) -> None:
    """Logit lens: what the state fed to each latent position says, read against the answer (diffmas.eval.lens)."""
    from diffmas.eval.lens import lens_channel, lens_table, save_lens

    sys_, task_ = _channel_system(system, model, device, task, topology=topology, latent_steps=latent_steps,
                                  adapter=adapter, trace=trace)
    started = time.time()
    lenses, answers = lens_channel(sys_, task_, n=n, seed=seed, batch_size=batch_size)
    print("\n".join(lens_table(lenses)), flush=True)
    if out is not None:
        save_lens(out, lenses, _channel_settings(sys_, started, system=system, adapter=adapter, task=task,
                                                 model=model, n=n, seed=seed), answers)
        console.print(f"lens: {out}")


@app.command("lens-curve")
@user_errors
def lens_curve(
    run: Path = typer.Argument(..., help="A training run's folder with checkpoints (the --out of `diffmas train`)."),
    out: Path = typer.Option(..., help="The curve's JSON (a plot goes beside it, .png); an existing one resumes."),
    task: str = CHANNEL_TASK_OPTION,
    every: int = typer.Option(1, help="Read every N-th checkpoint (and the last)."),
    steps: Optional[str] = typer.Option(None, help="Comma list of checkpoint steps instead of --every."),
    n: int = typer.Option(150, help="Items, the same at every step."),
    seed: int = typer.Option(0, help="The item draw."),
    places: str = typer.Option("1,2", help="The answer's characters (1-based) the plot draws."),
    batch_size: int = typer.Option(25),
    device: str = typer.Option("cpu"),
) -> None:
    """Logit lens over training: what a run's latent inputs said at each checkpoint, beside its held-out loss."""
    from diffmas.eval.lens_curve import chosen_steps, lens_curve as read_curve, plot_lens_curve
    from diffmas.tasks import get_task

    task_ = get_task(task)
    chosen = chosen_steps(run, every, [int(s) for s in steps.split(",")] if steps else None)
    curve = read_curve(run, task_, out, chosen, n=n, seed=seed, batch_size=batch_size, device=device)
    for point in curve["points"]:
        first = point["positions"][0] if point["positions"] else None
        if first:
            console.print(f"step {point['step']}: held-out {point['heldout_loss']}, position 1 says "
                          f"{first['places'].get('1', 0):.2f} / names {first['read'].get('1', 0):.2f} "
                          f"(floor {first['read_constant'].get('1', 0):.2f}); top {first['top_tokens'][:3]}")
    plot = plot_lens_curve(curve, out.with_suffix(".png"), tuple(places.split(",")))
    console.print(f"lens curve: {out}, plot: {plot}")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where runs, results, plots and summary.md go."),
    ablation: bool = typer.Option(False, help="Gradient mode, adapter layout and latent-steps ablation instead."),
    steps: Optional[int] = typer.Option(None, help="Training steps for each trained system (default: "
                                                   "configs/train/demo.yaml's)."),
    n_eval: int = typer.Option(100, help="Held-out problems per system (>= 100 for the published table)."),
    latent_steps: Optional[int] = typer.Option(None, help="Default: configs/train/demo.yaml's."),
    task: Optional[str] = typer.Option(None, help="Default: configs/train/demo.yaml's."),
    topology: Optional[str] = typer.Option(None, help="Default: configs/train/demo.yaml's."),
    trace: Optional[str] = typer.Option(None, help="keep|drop|latents: what the final agent sees of the writers "
                                                   "(default: configs/train/demo.yaml's)."),
    model: Optional[str] = typer.Option(None, help="Default: configs/train/demo.yaml's (the embedded model)."),
    device: Optional[str] = typer.Option(None, help="Default: configs/train/demo.yaml's (auto)."),
    anneal: Optional[float] = typer.Option(None, help="diffmas's bottleneck curriculum: the share of steps over "
                                                      "which the writers' prompts fade from the reader's view (with "
                                                      "--trace latents; default: configs/train/demo.yaml's)."),
    mixed_precision: Optional[str] = typer.Option(None, help="no|bf16|auto (default: configs/train/demo.yaml's "
                                                             "auto: bf16 where the hardware computes it natively)."),
) -> None:
    """The main job: train diffmas and single_sft, evaluate all five systems, print the comparison."""
    from diffmas.experiments.demo import DemoConfig, run_ablation, run_demo

    cfg = DemoConfig(task=task, topology=topology, trace=trace, latent_steps=latent_steps, steps=steps,
                     n_eval=n_eval, model=model, device=device, anneal=anneal, mixed_precision=mixed_precision)
    summary = (run_ablation if ablation else run_demo)(out, cfg)
    # Plain print, not rich: rich wraps at 80 columns when piped, which breaks the markdown table's rows.
    print(summary.read_text(), end="", flush=True)
    console.print(f"summary: {summary}; plots and per-sample results under {out}")


@app.command()
@user_errors
def compare(
    dirs: list[Path] = typer.Argument(..., metavar="DIR", help="Folders written by `diffmas eval` (samples.jsonl).",
                                      show_default=False),
    baseline: str = typer.Option(..., help="Arm every other arm is compared with."),
    task: Optional[str] = typer.Option(None, help="Only this task (default: every task found)."),
    out: Optional[Path] = typer.Option(None, help="Where compare.json and forest_<task>.png go (default: first DIR)."),
    boot: int = typer.Option(10_000, help="Bootstrap replicates."),
) -> None:
    """Paired comparison with a baseline: accuracy difference with a bootstrap 95% CI, and a paired sign-flip p
    (exact McNemar with one training seed per side).

    Label training seeds at eval time as ARM/sK (--systems curriculum/s1=diffmas:DIR); with 3+ seeds per side the
    interval also covers the spread over training seeds.
    """
    from diffmas.eval.compare import compare_dirs, comparison_table

    if boot < 1:
        raise DiffMASError("--boot must be >= 1")
    by_task, files = compare_dirs(dirs, baseline, task=task, out=out, n_boot=boot)
    printer = Console() if sys.stdout.isatty() else Console(width=160)  # piped: wide, so numbers do not wrap
    for name, comparisons in by_task.items():
        printer.print(comparison_table(comparisons, f"{name}: vs {baseline}"))
    console.print(f"written: {', '.join(map(str, files))}")


def _study(kind: str, out: Path, docs: Path, commit: bool, device: str, max_arms: Optional[int],
           report_only: bool, snapshot: bool = False, plan: bool = False, until: str | None = None,
           keep_going: bool = False) -> None:
    import importlib

    from diffmas.experiments.workers import commit_docs, plan_status, snapshot_unfinished

    study_module = importlib.import_module(f"diffmas.experiments.{kind}")
    report_module = importlib.import_module(f"diffmas.experiments.{kind}_report")
    if keep_going and until is None:
        raise DiffMASError("--keep-going goes with --until: without a deadline every arm is started anyway")
    deadline = {} if until is None else {"until": _deadline(until), "keep_going": keep_going}
    if plan:
        estimate = None
        if kind == "relay":
            from diffmas.experiments.relay_cost import estimate_seconds

            def estimate(arm):
                return estimate_seconds(arm, study_module.study_config(docs), out, docs)

        rows = plan_status(study_module.plan_arms(docs), out, docs, estimate)
        # The ids differ only at their ends (relay_digits--detached_anneal--s1 / _full--s0): never cut them short.
        arm, state = (Column(name, no_wrap=True, min_width=max((len(row[i]) for row in rows), default=len(name)))
                      for i, name in enumerate(("arm", "state")))
        table = Table(arm, state, "detail", title=f"{kind} study: the plan, in order")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        states = [state for _, state, _ in rows]
        console.print(", ".join(f"{states.count(s)} {s}" for s in ("finished", "training", "stopped", "pending")))
        return
    if snapshot:
        arms = snapshot_unfinished(out, docs)
        console.print(f"snapshot of {len(arms)} unfinished arm(s): {', '.join(arms) or 'none'}")
        if commit:
            commit_docs(docs, f"{docs.name}: snapshot of the arms still training ({', '.join(arms) or 'none'})")
        return
    if report_only:
        report_module.write_report(docs)
    else:
        study_module.run_study(out, docs, device=device, commit=commit, max_arms=max_arms, **deadline)
    console.print(f"report: {docs / 'README.md'}")


def _deadline(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (UTC unless it names an offset)."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise DiffMASError(f"--until {text!r}: not an ISO 8601 time (e.g. 2026-12-06T07:00)") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


COMMIT_OPTION = typer.Option(False, "--commit", help="git-commit the docs folder after every finished arm.")
MAX_ARMS_OPTION = typer.Option(None, help="Stop after this many arms (default: until none is left).")
REPORT_ONLY_OPTION = typer.Option(False, "--report-only", help="Only rebuild the report from finished arms.")
PLAN_OPTION = typer.Option(False, "--plan", help="Only list the plan: every arm in order, finished (accuracy, "
                           "steps), training (its step), stopped part-way (where it resumes) or pending.")
SNAPSHOT_OPTION = typer.Option(False, "--snapshot", help="Only copy the curves of arms still training into "
                               "DOCS/in-progress (what a stop commits; with --commit, commit them).")


@app.command()
@user_errors
def study(
    out: Path = typer.Option(Path("runs/study"), help="Weights, checkpoints and evaluation logs (not committed)."),
    docs: Path = typer.Option(Path("docs/study"), help="Results, curves, tables and plots (committed)."),
    commit: bool = COMMIT_OPTION,
    device: str = typer.Option("cpu"),
    max_arms: Optional[int] = MAX_ARMS_OPTION,
    report_only: bool = REPORT_ONLY_OPTION,
    snapshot: bool = SNAPSHOT_OPTION,
    plan: bool = PLAN_OPTION,
) -> None:
    """The grounding study: train and evaluate every arm, resumable; run two at once for two cores."""
    _study("grounding", out, docs, commit, device, max_arms, report_only, snapshot, plan)


@app.command("study-relay")
@user_errors
def study_relay(
    out: Path = typer.Option(Path("runs/study-relay"), help="Weights, checkpoints and evaluation logs (not committed)."),
    docs: Path = typer.Option(Path("docs/study-relay"), help="Results, curves, tables and plots (committed)."),
    commit: bool = COMMIT_OPTION,
    device: str = typer.Option("cpu"),
    max_arms: Optional[int] = MAX_ARMS_OPTION,
    report_only: bool = REPORT_ONLY_OPTION,
    snapshot: bool = SNAPSHOT_OPTION,
    plan: bool = PLAN_OPTION,
    until: Optional[str] = typer.Option(None, help="Start only arms estimated to finish by this time (ISO 8601, "
                                        "UTC unless it names an offset, e.g. 2026-12-06T07:00): where the machine "
                                        "may go away then, an arm still training would be lost."),
    keep_going: bool = typer.Option(False, "--keep-going", help="With --until: once no free arm fits, start the "
                                    "next ones anyway instead of stopping. A machine that outlives the deadline "
                                    "resumes them from their checkpoints; one that does not loses only idle time."),
) -> None:
    """The relay study: can a trained latent channel carry a problem the final agent never sees? Resumable; run
    two at once for two cores (make study-relay)."""
    _study("relay", out, docs, commit, device, max_arms, report_only, snapshot, plan, until, keep_going)


@app.command()
@user_errors
def serve(
    systems: str = typer.Option("latent_mas", help="Model ids to serve, as for eval: e.g. "
                                "single,latent_mas,diffmas:ADAPTER_DIR (LABEL=name:DIR sets the id)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, local folder, or hub id."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; another than 127.0.0.1 exposes the server."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="DIFFMAS_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' (all endpoints but /health)."),
    max_batch: int = typer.Option(8, help="Requests answered by one rollout."),
    batch_window_ms: float = typer.Option(20.0, help="How long a request waits for others to join its batch."),
    max_queue: int = typer.Option(64, help="Waiting requests; more are answered 503 with Retry-After."),
    max_tokens_limit: int = typer.Option(1024, help="Largest max_tokens a request may ask for."),
    max_question_tokens: int = typer.Option(2048, help="Longest question, in tokens."),
    max_latent_steps: int = typer.Option(64, help="Largest latent_steps a request may ask for."),
    max_request_bytes: int = typer.Option(1_000_000, help="Largest request body."),
    max_messages: int = typer.Option(32, help="Most messages a chat request may hold."),
    max_prompts: int = typer.Option(8, help="Most questions one /v1/completions request may hold."),
    topology: Optional[str] = typer.Option(None, help="Default topology of the training-free multi-agent systems "
                                                      "(sequential, or a YAML file); trained ones keep theirs."),
    latent_steps: Optional[int] = typer.Option(None, help="Default latent steps of the training-free systems "
                                                          "(default 10); trained ones keep theirs."),
    writer_max_new_tokens: int = typer.Option(128, help="Token budget of each text_mas writer."),
    realign: bool = REALIGN_OPTION,
    think: bool = THINK_OPTION,
    trace: str = TRACE_OPTION,
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("float32"),
    log_level: str = typer.Option("info", help="uvicorn's log level."),
) -> None:
    """Serve systems over the OpenAI API (chat completions, completions, models), batching concurrent requests."""
    try:
        from diffmas.serve.app import ServeConfig, create_app
        from diffmas.serve.protocol import Limits
        from diffmas.serve.server import load_systems, run_server
    except ImportError as exc:
        raise DiffMASError(f"diffmas serve needs the serve extra (pip install 'diffmas[serve]'): {exc}") from None

    try:
        limits = Limits(max_request_bytes=max_request_bytes, max_messages=max_messages, max_prompts=max_prompts,
                        max_tokens=max_tokens_limit, default_max_tokens=min(256, max_tokens_limit),
                        max_question_tokens=max_question_tokens, max_latent_steps=max_latent_steps)
    except ValueError as exc:
        raise DiffMASError(str(exc)) from None
    config = ServeConfig(max_batch, batch_window_ms, max_queue, api_key, limits)
    served = load_systems([s for s in systems.split(",") if s.strip()], model=model, device=device, dtype=dtype,
                          topology=topology, latent_steps=latent_steps, writer_max_new_tokens=writer_max_new_tokens,
                          realign=realign, think=think, trace=trace)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        console.print(f"warning: serving on {host} without --api-key: anyone who reaches port {port} can use it")
    console.print(f"serving {', '.join(served)} at http://{host}:{port}/v1")
    run_server(create_app(served, config), host, port, log_level)


def main() -> None:  # pragma: no cover - console entry point
    from diffmas.memory import configure_allocator, preload_jemalloc

    try:
        preload_jemalloc()  # restarts this process once with jemalloc, when installed (diffmas.memory)
        configure_allocator()  # the allocator policy (DIFFMAS_MALLOC)
    except DiffMASError as exc:  # a bad DIFFMAS_MALLOC: one line, as every other error of the command line
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

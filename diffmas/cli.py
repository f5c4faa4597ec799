"""Command line: thin wrappers over library functions.

    diffmas run --system latent_mas --question "What is 17 + 25?"
    diffmas train --config configs/train/demo.yaml --out runs/demo/diffmas
    diffmas eval --systems single,latent_mas --task rg:chain_sum --limit 100 --out runs/eval
    diffmas pull            # convert the embedded default model once (offline)
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from diffmas.assets import DEFAULT_MODEL
from diffmas.errors import DiffMASError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-agent LLMs that talk through a trained KV channel.")
console = Console(stderr=True)


def user_errors(fn):
    """Print a DiffMASError as one line and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffMASError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None

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
    no_realign: bool = typer.Option(False, help="Feed hidden states back without the realignment matrix."),
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
                        realign=not no_realign, writer_max_new_tokens=writer_max_new_tokens,
                        lens_top_k=3 if show_latents else 0)
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
    system: Optional[str] = typer.Option(None, help="diffmas | single_sft"),
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
    grad_mode: Optional[str] = typer.Option(None, help="coupled | detached"),
    adapters: Optional[str] = typer.Option(None, help="shared | per-agent"),
    seed: Optional[int] = typer.Option(None),
    checkpoint_every: Optional[int] = typer.Option(None),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing"),
    mixed_precision: Optional[str] = typer.Option(None, help="no | bf16"),
    device: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in --out."),
) -> None:
    """Train DiffMAS (or the single_sft baseline) with LoRA; runs unchanged under `accelerate launch`."""
    from diffmas.config import load_config
    from diffmas.train.loop import train as run_training

    overrides = {
        "system": system, "model.name": model, "data.task": task, "data.source": source,
        "data.target_style": target_style, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
        "lr": lr, "lora.rank": lora_rank, "latent_steps": latent_steps, "topology": topology,
        "grad_mode": grad_mode, "lora.layout": adapters, "seed": seed, "checkpoint_every": checkpoint_every,
        "activation_checkpointing": activation_checkpointing, "mixed_precision": mixed_precision,
        "model.device": device,
    }
    summary = run_training(load_config(config, overrides), out, resume=resume)
    if summary["is_main_process"]:
            console.print(f"adapters, checkpoints and metrics in {summary['out']}; held-out loss "
                      f"{summary['heldout_loss_start']:.4f} -> {summary['heldout_loss_end']:.4f}")


@app.command()
@user_errors
def pull(model: str = typer.Option(DEFAULT_MODEL, help="Embedded model alias to convert.")) -> None:
    """Convert an embedded model into the cache once (offline); later loads take about a second."""
    from diffmas.assets import resolve_model

    console.print(f"{model}: {resolve_model(model)}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

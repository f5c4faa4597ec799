"""Commands that run experiments and compare their results: `demo`, `compare`, `study`, `study-relay`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from diffmas.cli import app, console, user_errors
from diffmas.errors import DiffMASError


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

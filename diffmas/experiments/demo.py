"""The main job: does a trained latent channel beat the alternatives, and what does it cost?

    diffmas demo --out runs/demo                  # make demo: train 2 systems, evaluate 5, table + plots
    diffmas demo --ablation --out runs/ablation   # make ablation: gradient mode, adapter layout, latent steps

On the embedded SmolLM2-135M-Instruct, DiffMAS (coupled, shared LoRA) and the single_sft baseline are trained
on the same generated examples for the same number of steps, with answer-only targets; then single,
text_mas, latent_mas, diffmas and single_sft are evaluated on one held-out set (seeds disjoint from
training). The multi-agent systems are evaluated under the demo's topology and trace scope (on a relay task with
``--trace latents`` the final agent sees only what the writer passes on); the single agents see the whole question
(the skyline). Every stage resumes: rerunning the command after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from diffmas.adapters import read_adapter_meta
from diffmas.backbone import precision_name
from diffmas.config import LoraSettings, TrainConfig, load_config
from diffmas.eval.html_report import HTML_FILE, write_html_report
from diffmas.eval.report import self_perplexity
from diffmas.experiments.presets import machine_description, train_once
from diffmas.experiments.workers import code_version


DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
"""The demo's training settings: configs/train/demo.yaml (linked here, so an installed package carries it too)."""


@dataclass
class DemoConfig:
    """The demo's evaluation settings, and what a run may override of its training settings (None: the value in
    configs/train/demo.yaml, the one source of them); defaults fit about 20 minutes on 2 CPU cores."""

    n_eval: int = 100
    eval_batch_size: int = 16
    max_new_tokens: int = 64
    writer_max_new_tokens: int = 64
    steps: int | None = None
    latent_steps: int | None = None
    batch_size: int | None = None
    task: str | None = None
    topology: str | None = None
    trace: str | None = None
    model: str | None = None
    device: str | None = None
    anneal: float | None = None
    """The bottleneck curriculum of the channel (``channel.anneal``): the share of steps over which the writers'
    prompts fade from the reader's view; diffmas only."""
    mixed_precision: str | None = None

    def train_config(self, system: str, **changes) -> TrainConfig:
        """The training config of ``system``: the demo file, this run's overrides, then ``changes``."""
        overrides = {"system": system, "steps": self.steps, "latent_steps": self.latent_steps,
                     "batch_size": self.batch_size, "data.task": self.task, "topology": self.topology,
                     "trace": self.trace, "model.name": self.model, "model.device": self.device,
                     "channel.anneal": self.anneal, "mixed_precision": self.mixed_precision}
        if system != "diffmas":  # the channel's settings are the multi-agent system's; single_sft sees the question
            overrides |= {"channel.anneal": 0.0, "channel.autoencode_steps": 0}
            changes = {"trace": None, **changes}
        return replace(load_config(DEMO_CONFIG, overrides), **changes)


def _markdown_table(results: dict) -> str:
    lines = ["| system | accuracy ± stderr | n | format failures | tokens / problem | s / problem | gold perplexity "
             "| perplexity of own output |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        gold, own = row.get("gold_perplexity"), self_perplexity(row)
        gold = f"{gold:.2f}" if gold is not None else "–"
        own = f"{own:.2f}" if own is not None else "–"
        lines.append(f"| {row['system']} | {row['accuracy']:.3f} ± {row['stderr']:.3f} | {row['n']} | "
                     f"{row['format_failures']:.2f} | {row['tokens_mean']:.1f} | {row['seconds_mean']:.2f} | {gold} "
                     f"| {own} |")
    return "\n".join(lines)


def _plot_training(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [m["step"] for m in metrics if "loss" in m]
        ax.plot(steps, [m["loss"] for m in metrics if "loss" in m], label=f"{label} (train)", alpha=0.6)
        held = [(m["step"], m["heldout_loss"]) for m in metrics if "heldout_loss" in m]
        ax.plot(*zip(*held), "o--", label=f"{label} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on target tokens")
    ax.legend()
    ax.set_title("Training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _precision(train: TrainConfig, trained: list[Path]) -> str:
    """What the summary says of precision: the setting and what the adapters recorded they trained in (``auto``
    resolves per machine, so the setting alone does not say which arithmetic produced the table)."""
    used = sorted({precision_name(read_adapter_meta(run)["mixed_precision"], train.model.dtype) for run in trained})
    return f"mixed precision {train.mixed_precision}, trained in {' and '.join(used)}"


def _write_summary(out: Path, title: str, cfg: DemoConfig, results: dict, notes: list[str], trained: list[Path],
                   clock: dict[str, float] | None = None) -> Path:
    train = cfg.train_config("diffmas")
    channel = f"topology `{train.topology}`, trace scope `{train.trace or 'keep'}`"
    if train.channel.anneal:
        channel += f" (bottleneck curriculum: the writer's prompt hidden from the reader by step " \
                   f"{round(train.channel.anneal * train.steps)})"
    text = [f"# {title}", "",
            f"Produced by `diffmas demo{' --ablation' if 'ablation' in title.lower() else ''} --out {out}` on "
            f"{time.strftime('%Y-%m-%d')}, {machine_description()}, commit {code_version()}.", "",
            f"Task {train.data.task} (held-out seeds, n = {cfg.n_eval} per system), {channel}, "
            f"m = {train.latent_steps} latent steps, {train.steps} training steps x batch {train.batch_size} "
            f"(configs/train/demo.yaml; {_precision(train, trained)}), "
            "answer-only targets, greedy decoding, max "
            f"{cfg.max_new_tokens} new tokens.", "", _markdown_table(results), "", *notes]
    if clock:
        text += ["", "| stage | wall time |", "|---|---|",
                 *(f"| {stage} | {seconds / 60:.1f} min |" for stage, seconds in clock.items())]
    path = out / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _evaluate(systems: list[str], out: Path, cfg: DemoConfig, latent_steps: int | None = None) -> dict:
    """Evaluate into ``out``: results.json, samples.jsonl, plots and report.html, as ``diffmas eval`` writes them."""
    from diffmas.eval.report import plot
    from diffmas.eval.runner import run_eval

    train = cfg.train_config("diffmas")
    results = run_eval(systems, [train.data.task], out, model=train.model.name, limit=cfg.n_eval,
                       batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                       writer_max_new_tokens=cfg.writer_max_new_tokens, topology=train.topology,
                       latent_steps=train.latent_steps if latent_steps is None else latent_steps,
                       trace=train.trace, device=train.model.device)
    plot(results, out)
    write_html_report(out, results)
    return results


def _rows(results: dict) -> dict:
    """results.json rows keyed the way the markdown table reads them."""
    rows = []
    for row in results["results"]:
        rows.append({"system": row["system"], **{k: row.get(k) for k in (
            "accuracy", "stderr", "n", "format_failures", "tokens_mean", "seconds_mean", "gold_perplexity")},
            "self_perplexity": self_perplexity(row)})
    return {"rows": rows}


def run_demo(out: str | Path, cfg: DemoConfig | None = None) -> Path:
    """Train diffmas and single_sft, evaluate all five systems, write table, plots and summary under ``out``."""
    cfg = cfg or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    clock = setup_clock()
    runs = {}
    for system in ("diffmas", "single_sft"):
        started = time.time()
        runs[system] = train_once(cfg.train_config(system), out / system)
        clock[f"train {system}"] = time.time() - started
    _plot_training(runs, out / "training.png")
    systems = ["single", "text_mas", "latent_mas", f"diffmas:{runs['diffmas']}", f"single_sft:{runs['single_sft']}"]
    started = time.time()
    results = _evaluate(systems, out / "eval", cfg)
    clock[f"evaluate {len(systems)} systems x {cfg.n_eval} problems"] = time.time() - started
    (out / "clock.json").write_text(json.dumps(clock, indent=2) + "\n")
    return _write_summary(out, "DiffMAS demo", cfg, _rows(results), [
        "Plots: `eval/accuracy_vs_tokens.png`, `eval/accuracy_vs_time.png`, `training.png`. "
        "Per-sample outputs: `eval/samples.jsonl`; full metrics and config: `eval/results.json`. "
        f"Every sample, with each agent's segment, on one page: `eval/{HTML_FILE}`. Wall time per stage of this run "
        "(a stage that found its result already there, e.g. on a rerun, took only the time to check it):"],
        list(runs.values()), clock)


SETUP_SECONDS = ".setup-seconds"
"""Written into the virtual environment by ``make setup``: how long installing everything took."""


def setup_clock() -> dict[str, float]:
    """``{"set-up (make setup)": seconds}`` when this environment was made by ``make`` (its timing file), else {}."""
    path = Path(sys.prefix) / SETUP_SECONDS
    try:
        return {"set-up (make setup, downloads included)": float(path.read_text().strip())}
    except (OSError, ValueError):
        return {}


def ablation(m: int) -> dict[str, dict]:
    """The ablation's variants of the demo's diffmas (``m``: its latent steps), by label: TrainConfig changes."""
    return {
        f"coupled / shared / m={m}": {},
        f"detached / shared / m={m}": {"grad_mode": "detached"},
        f"coupled / per-agent / m={m}": {"lora": LoraSettings(layout="per-agent")},
        "coupled / shared / m=0": {"latent_steps": 0},
        f"coupled / shared / m={2 * m}": {"latent_steps": 2 * m},
    }


def run_ablation(out: str | Path, cfg: DemoConfig | None = None) -> Path:
    """Train one diffmas variant per :func:`ablation` row (same data and steps), evaluate each on the same set."""
    cfg = cfg or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(_evaluate(["latent_mas"], out / "eval" / "latent_mas", cfg))["rows"]
    trained = []
    for i, (label, changes) in enumerate(ablation(cfg.train_config("diffmas").latent_steps).items()):
        train_cfg = cfg.train_config("diffmas", **changes)
        run = train_once(train_cfg, out / f"variant{i}", reuse=(out.parent / "demo" / "diffmas",))
        trained.append(run)
        # Each variant is evaluated with the latent steps it was trained with (one eval folder per variant).
        variant = _rows(_evaluate([f"diffmas:{run}"], out / "eval" / f"variant{i}", cfg, train_cfg.latent_steps))
        rows += [{**row, "system": f"diffmas {label}"} for row in variant["rows"]]
    rows = {"rows": rows}
    _plot_ablation(rows, out / "ablation.png")
    return _write_summary(out, "DiffMAS ablation", cfg, rows, [
        "Each variant is evaluated with the latent steps it was trained with. Plot: `ablation.png`. "
        f"Every sample on one page per evaluation: `eval/latent_mas/{HTML_FILE}`, `eval/variant<i>/{HTML_FILE}`."],
        trained)


def _plot_ablation(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["system"] for r in rows["rows"]]
    ax.barh(names, [r["accuracy"] for r in rows["rows"]], xerr=[r["stderr"] for r in rows["rows"]], capsize=3)
    ax.set_xlabel("accuracy (± stderr)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

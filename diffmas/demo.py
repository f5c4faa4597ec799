"""The main job: does a trained latent channel beat the alternatives, and what does it cost?

    diffmas demo --out runs/demo                  # make demo: train 2 systems, evaluate 5, table + plots
    diffmas demo --ablation --out runs/ablation   # make ablation: gradient mode, adapter layout, latent steps

On the embedded SmolLM2-135M-Instruct, DiffMAS (coupled, shared LoRA) and the single_sft baseline are trained
on the same generated examples for the same number of steps, with answer-only targets; then single,
text_mas, latent_mas, diffmas and single_sft are evaluated on one held-out set (seeds disjoint from
training). Every stage resumes: rerunning the command after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from diffmas.config import DataConfig, ModelConfig, LoraSettings, TrainConfig
from diffmas.eval.html_report import HTML_FILE, write_html_report
from diffmas.eval.report import self_perplexity
from diffmas.experiments.presets import machine_description, mixed_precision, train_once


@dataclass
class DemoConfig:
    """The demo's budget; defaults fit about 30 minutes on 2 CPU cores."""

    task: str = "rg:chain_sum"
    topology: str = "duo"
    latent_steps: int = 5
    steps: int = 80
    batch_size: int = 8
    lr: float = 1e-3
    n_eval: int = 100
    eval_batch_size: int = 16
    max_new_tokens: int = 64
    writer_max_new_tokens: int = 64
    model: str = "smollm2-135m-instruct"
    device: str = "auto"
    seed: int = 0

    def train_config(self, system: str, **changes) -> TrainConfig:
        cfg = TrainConfig(
            system=system, topology=self.topology, latent_steps=self.latent_steps, steps=self.steps,
            batch_size=self.batch_size, lr=self.lr, seed=self.seed, checkpoint_every=max(1, self.steps // 4),
            mixed_precision=mixed_precision(),
            model=ModelConfig(name=self.model, device=self.device), data=DataConfig(task=self.task),
        )
        return replace(cfg, **changes)


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


def _write_summary(out: Path, title: str, cfg: DemoConfig, results: dict, notes: list[str]) -> Path:
    text = [f"# {title}", "",
            f"Produced by `diffmas demo{' --ablation' if 'ablation' in title.lower() else ''} --out {out}` on "
            f"{time.strftime('%Y-%m-%d')}, {machine_description()}.", "",
            f"Task {cfg.task} (held-out seeds, n = {cfg.n_eval} per system), topology `{cfg.topology}`, "
            f"m = {cfg.latent_steps} latent steps, {cfg.steps} training steps x batch {cfg.batch_size}, "
            "answer-only targets, greedy decoding, max "
            f"{cfg.max_new_tokens} new tokens.", "", _markdown_table(results), "", *notes]
    path = out / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _evaluate(systems: list[str], out: Path, cfg: DemoConfig, latent_steps: int | None = None) -> dict:
    """Evaluate into ``out``: results.json, samples.jsonl, plots and report.html, as ``diffmas eval`` writes them."""
    from diffmas.eval.report import plot
    from diffmas.eval.runner import run_eval

    results = run_eval(systems, [cfg.task], out, model=cfg.model, limit=cfg.n_eval, batch_size=cfg.eval_batch_size,
                       max_new_tokens=cfg.max_new_tokens, writer_max_new_tokens=cfg.writer_max_new_tokens,
                       topology=cfg.topology, latent_steps=cfg.latent_steps if latent_steps is None else latent_steps,
                       device=cfg.device)
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
    runs = {system: train_once(cfg.train_config(system), out / system) for system in ("diffmas", "single_sft")}
    _plot_training(runs, out / "training.png")
    systems = ["single", "text_mas", "latent_mas", f"diffmas:{runs['diffmas']}", f"single_sft:{runs['single_sft']}"]
    results = _evaluate(systems, out / "eval", cfg)
    return _write_summary(out, "DiffMAS demo", cfg, _rows(results), [
        "Plots: `eval/accuracy_vs_tokens.png`, `eval/accuracy_vs_time.png`, `training.png`. "
        "Per-sample outputs: `eval/samples.jsonl`; full metrics and config: `eval/results.json`. "
        f"Every sample, with each agent's segment, on one page: `eval/{HTML_FILE}`."])


ABLATION = {
    "coupled / shared / m=5": {},
    "detached / shared / m=5": {"grad_mode": "detached"},
    "coupled / per-agent / m=5": {"lora": LoraSettings(layout="per-agent")},
    "coupled / shared / m=0": {"latent_steps": 0},
    "coupled / shared / m=10": {"latent_steps": 10},
}


def run_ablation(out: str | Path, cfg: DemoConfig | None = None) -> Path:
    """Train one diffmas variant per ABLATION row (same data and steps), evaluate each on the same set."""
    cfg = cfg or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(_evaluate(["latent_mas"], out / "eval" / "latent_mas", cfg))["rows"]
    for i, (label, changes) in enumerate(ABLATION.items()):
        train_cfg = cfg.train_config("diffmas", **changes)
        run = train_once(train_cfg, out / f"variant{i}", reuse=(out.parent / "demo" / "diffmas",))
        # Each variant is evaluated with the latent steps it was trained with (one eval folder per variant).
        variant = _rows(_evaluate([f"diffmas:{run}"], out / "eval" / f"variant{i}", cfg, train_cfg.latent_steps))
        rows += [{**row, "system": f"diffmas {label}"} for row in variant["rows"]]
    rows = {"rows": rows}
    _plot_ablation(rows, out / "ablation.png")
    return _write_summary(out, "DiffMAS ablation", cfg, rows, [
        "Each variant is evaluated with the latent steps it was trained with. Plot: `ablation.png`. "
        f"Every sample on one page per evaluation: `eval/latent_mas/{HTML_FILE}`, `eval/variant<i>/{HTML_FILE}`."])


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

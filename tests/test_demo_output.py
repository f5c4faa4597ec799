"""The demo's summary is printed as plain markdown: piped output must not be wrapped at 80 columns."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import diffmas.experiments.demo
from diffmas.cli import app


def test_demo_prints_unwrapped_markdown(tmp_path, monkeypatch):
    row = "| diffmas coupled / per-agent / m=5 | 0.180 ± 0.039 | 100 | 0.00 | 5.8 | 0.34 | 1.58 | [bold]x[/bold] |"
    summary = tmp_path / "summary.md"
    summary.write_text(f"# DiffMAS demo\n\n| system | a | b | c | d | e | f | g |\n|---|---|---|---|---|---|---|---|\n{row}\n")
    monkeypatch.setattr(diffmas.experiments.demo, "run_demo", lambda out, cfg: summary)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(row) > 80
    assert row in result.stdout.splitlines()  # one line, verbatim (no wrapping, no rich markup eaten)


def test_demo_command_line_sets_the_channels_curriculum_and_the_precision(tmp_path, monkeypatch):
    """`diffmas demo --anneal 0.3 --mixed-precision no` reaches diffmas's training config; single_sft, which sees the
    question, trains without the curriculum but in the same precision."""
    seen = {}
    summary = tmp_path / "summary.md"
    summary.write_text("# DiffMAS demo\n")
    monkeypatch.setattr(diffmas.experiments.demo, "run_demo", lambda out, cfg: seen.setdefault("cfg", cfg) and summary)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--task", "relay:digits", "--topology", "relay",
                                      "--trace", "latents", "--anneal", "0.3", "--mixed-precision", "no"])
    assert result.exit_code == 0, result.output
    mas, sft = seen["cfg"].train_config("diffmas"), seen["cfg"].train_config("single_sft")
    assert (mas.channel.anneal, mas.mixed_precision, mas.trace) == (0.3, "no", "latents")
    assert (sft.channel.anneal, sft.mixed_precision, sft.trace) == (0.0, "no", None)


def test_demo_writes_the_html_report_of_its_evaluation_and_names_it(tmp_path, tiny_model_dir, one_thread):
    """`make demo` end to end on the tiny model (one training step each): the evaluation gets its report.html, as
    `diffmas eval` writes it, and the summary names the page."""
    from diffmas.adapters import read_adapter_meta
    from diffmas.experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(model=str(tiny_model_dir), device="cpu", steps=1, batch_size=2, n_eval=2, eval_batch_size=2,
                     max_new_tokens=3, writer_max_new_tokens=3, latent_steps=1, task="relay:digits", topology="relay",
                     trace="latents")
    summary = run_demo(tmp_path / "demo", cfg)
    page = tmp_path / "demo" / "eval" / "report.html"
    assert page.is_file() and "`eval/report.html`" in summary.read_text()
    # `mixed_precision: auto` resolves per machine: the summary says what the training actually computed in.
    resolved = read_adapter_meta(tmp_path / "demo" / "diffmas")["mixed_precision"]
    precision = {"no": "float32", "bf16": "bf16 autocast"}[resolved]
    assert f"trained in {precision})" in summary.read_text()
    html = page.read_text()
    for system in ("single", "text_mas", "latent_mas", "diffmas", "single_sft"):
        assert f"<option value='{system}'>" in html
    # A demo on a relay task with a latents-only channel evaluates every multi-agent system, trained or not, so (its
    # final agent attends to m latent columns, or to the writer's message alone), never to the writer's prompt,
    # which holds the answer.
    samples = [json.loads(line) for line in (tmp_path / "demo" / "eval" / "samples.jsonl").read_text().splitlines()]
    widths = {(s["system"], s["trace_tokens"]) for s in samples if s["system"] in ("latent_mas", "diffmas")}
    assert widths == {("latent_mas", 1), ("diffmas", 1)}
    assert all(s["trace_tokens"] <= 3 for s in samples if s["system"] == "text_mas")


def test_ablation_trains_each_variant_and_names_their_precision(tmp_path, tiny_model_dir, one_thread):
    """`make ablation` end to end on the tiny model: one row per variant beside latent_mas, and the summary says what
    precision the variants trained under."""
    from diffmas.adapters import read_adapter_meta
    from diffmas.experiments.demo import DemoConfig, ablation, run_ablation

    cfg = DemoConfig(model=str(tiny_model_dir), device="cpu", steps=1, batch_size=2, n_eval=2, eval_batch_size=2,
                     max_new_tokens=3, writer_max_new_tokens=3, latent_steps=1)
    summary = run_ablation(tmp_path / "ablation", cfg).read_text()
    for label in ablation(1):
        assert f"| diffmas {label} |" in summary
    resolved = read_adapter_meta(tmp_path / "ablation" / "variant0")["mixed_precision"]
    precision = {"no": "float32", "bf16": "bf16 autocast"}[resolved]
    assert f"trained in {precision})" in summary

"""The demo's summary is printed as plain markdown: piped output must not be wrapped at 80 columns."""

from __future__ import annotations

from typer.testing import CliRunner

import diffmas.demo
from diffmas.cli import app


def test_demo_prints_unwrapped_markdown(tmp_path, monkeypatch):
    row = "| diffmas coupled / per-agent / m=5 | 0.180 ± 0.039 | 100 | 0.00 | 5.8 | 0.34 | 1.58 | [bold]x[/bold] |"
    summary = tmp_path / "summary.md"
    summary.write_text(f"# DiffMAS demo\n\n| system | a | b | c | d | e | f | g |\n|---|---|---|---|---|---|---|---|\n{row}\n")
    monkeypatch.setattr(diffmas.demo, "run_demo", lambda out, cfg: summary)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(row) > 80
    assert row in result.stdout.splitlines()  # one line, verbatim (no wrapping, no rich markup eaten)

"""One self-contained HTML page per evaluation run: ``report.html`` next to results.json.

    diffmas eval --report runs/eval      # also (re)writes runs/eval/report.html
    diffmas eval ... --out runs/eval     # writes it at the end of the run

The page needs no network and no other file: CSS and JS are inline and the plots are embedded PNGs (base64).
It shows the results table, the plots, and every sample of samples.jsonl: the answer, the gold answer, the
grade, and each agent's segment (prompt tokens, latent steps with their logit-lens top tokens as a heat map when
the run recorded them, the text reply of a text writer). Filters: correct / wrong / format failure, and system.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

from diffmas.eval.report import self_perplexity

__all__ = ["HTML_FILE", "write_html_report", "render_html", "sample_status"]

HTML_FILE = "report.html"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1d1d1f;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table.results{border-collapse:collapse;margin:.5em 0}table.results th,table.results td{border:1px solid #ccc;
padding:.25em .6em;text-align:right}table.results td.text,table.results th.text{text-align:left}
table.results thead th{background:#f3f3f3}
.plots img{max-width:48%;margin:.3em;border:1px solid #eee}
.filters{position:sticky;top:0;background:#fafafa;border:1px solid #ddd;padding:.5em;z-index:1}
.filters label{margin-right:1em}
details.sample{border:1px solid #ddd;border-left:6px solid #999;margin:.4em 0;padding:.3em .6em;border-radius:3px}
details.sample.correct{border-left-color:#2a9d4a}details.sample.wrong{border-left-color:#d33}
details.sample.format{border-left-color:#e3a008}
summary{cursor:pointer}.badge{display:inline-block;padding:0 .5em;border-radius:3px;color:#fff;font-size:.85em}
.badge.correct{background:#2a9d4a}.badge.wrong{background:#d33}.badge.format{background:#e3a008}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em;margin:.2em 0;max-height:20em;overflow:auto}
.agent{margin:.4em 0 .4em 1em}.lens{border-collapse:collapse;font-family:ui-monospace,monospace;font-size:12px}
.lens td,.lens th{border:1px solid #e3e3e3;padding:1px 4px}.muted{color:#777}
"""

_JS = """
(function(){
  function apply(){
    var show = {};
    document.querySelectorAll('input.status-filter').forEach(function(b){ show[b.value] = b.checked; });
    var sys = document.getElementById('system-filter').value;
    var shown = 0;
    document.querySelectorAll('details.sample').forEach(function(d){
      var ok = show[d.dataset.status] && (sys === '' || d.dataset.system === sys);
      d.style.display = ok ? '' : 'none';
      if (ok) { shown++; }
    });
    document.getElementById('shown-count').textContent = String(shown);
  }
  document.querySelectorAll('input.status-filter').forEach(function(b){ b.addEventListener('change', apply); });
  document.getElementById('system-filter').addEventListener('change', apply);
  apply();
})();
"""

_STATUS_LABEL = {"correct": "correct", "wrong": "wrong", "format": "format failure"}


def sample_status(sample: dict) -> str:
    """``correct``, ``format`` (no answer in the requested format) or ``wrong``."""
    if sample.get("correct"):
        return "correct"
    if not sample.get("format_ok", True):
        return "format"
    return "wrong"


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(scale * value, fmt)


def _pct(mean, stderr) -> str:
    return "–" if mean is None else f"{100 * mean:.1f} ± {100 * (stderr or 0):.1f}"


def _results_table(rows: list[dict]) -> str:
    head = ["system", "task", "strict % ± se", "flexible % ± se", "n", "tokens", "s/problem", "gold ppl",
            "own-output ppl", "format fail %"]
    out = ["<table class='results' id='results-table'><thead><tr>"]
    out += [f"<th class='{'text' if h in ('system', 'task') else ''}'>{_e(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cells = [_pct(r.get("accuracy"), r.get("stderr")), _pct(r.get("accuracy_flexible"), r.get("stderr_flexible")),
                 str(r.get("n", "–")), _num(r.get("tokens_mean"), ".1f"), _num(r.get("seconds_mean"), ".3f"),
                 _num(r.get("gold_perplexity"), ".2f"), _num(self_perplexity(r), ".2f"),
                 _num(r.get("format_failures"), ".1f", 100)]
        out.append(f"<tr><td class='text'>{_e(r.get('system'))}</td><td class='text'>{_e(r.get('task'))}</td>"
                   + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _visible(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣")


def _lens_cell(entry, rank: int) -> str:
    """One logit-lens entry: a token string (colour by rank) or [token, probability] / {token, p}."""
    prob = None
    if isinstance(entry, dict):
        token, prob = entry.get("token", ""), entry.get("p", entry.get("prob"))
    elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], (int, float)):
        token, prob = entry
    else:
        token = entry
    heat = float(prob) if prob is not None else 1.0 / (rank + 1)
    heat = min(1.0, max(0.0, heat))
    title = f"rank {rank + 1}" + (f", p = {float(prob):.3f}" if prob is not None else "")
    return (f"<td style='background:rgba(220,60,40,{0.12 + 0.8 * heat:.2f})' title='{_e(title)}'>"
            f"{_e(_visible(str(token)))}</td>")


def _lens_table(latents: list) -> str:
    width = max((len(step) for step in latents if isinstance(step, list)), default=0)
    out = ["<table class='lens'><tr><th>step</th>", *(f"<th>top {k + 1}</th>" for k in range(width)), "</tr>"]
    for i, step in enumerate(latents):
        entries = step if isinstance(step, list) else [step]
        out.append(f"<tr><th>{i + 1}</th>" + "".join(_lens_cell(t, k) for k, t in enumerate(entries)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _agent_html(agent: dict) -> str:
    view = agent.get("sees", "question")
    parts = [f"<div class='agent'><b>{_e(agent.get('role'))}</b> "
             f"<span class='muted'>sees {_e(view)} · prompt {_e(agent.get('prompt_tokens'))} tok · latent steps "
             f"{_e(agent.get('latent_steps', 0))} · generated {_e(agent.get('generated_tokens', 0))} tok · "
             f"{_num(agent.get('seconds'), '.2f')} s</span>"]
    if agent.get("latents"):
        parts.append(_lens_table(agent["latents"]))
    if agent.get("text") is not None:
        parts.append(f"<pre class='reply'>{_e(agent['text'])}</pre>")
    parts.append("</div>")
    return "".join(parts)


def _sample_html(sample: dict) -> str:
    status = sample_status(sample)
    head = (f"<span class='badge {status}'>{_e(_STATUS_LABEL[status])}</span> "
            f"<b>{_e(sample.get('system'))}</b> · {_e(sample.get('task'))} · id {_e(sample.get('id'))} · "
            f"seed {_e(sample.get('seed'))} · answer <code>{_e(sample.get('extracted'))}</code> · gold "
            f"<code>{_e(sample.get('gold'))}</code>")
    body = [f"<div>grade: {_e(_STATUS_LABEL[status])}"
            + (f" ({_e(sample.get('detail'))})" if sample.get("detail") else "")
            + (" · flexible match" if sample.get("flexible") and not sample.get("correct") else "")
            + (" · truncated" if sample.get("truncated") else "") + "</div>",
            f"<div>answer (extracted): <code>{_e(sample.get('extracted'))}</code> · gold: "
            f"<code>{_e(sample.get('gold'))}</code></div>",
            f"<div>response:</div><pre class='response'>{_e(sample.get('response'))}</pre>",
            *(_agent_html(a) for a in sample.get("agents", []))]
    return (f"<details class='sample {status}' data-status='{status}' data-system='{_e(sample.get('system'))}'>"
            f"<summary>{head}</summary>{''.join(body)}</details>")


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _read_samples(path: Path) -> list[dict]:
    samples = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except ValueError:  # a cut-off last line of a killed run
                    continue
    return samples


def render_html(results: dict, samples: list[dict], plots: list[Path], title: str) -> str:
    """The page for one run (``results``: results.json contents)."""
    systems = list(dict.fromkeys([*(r.get("system") for r in results.get("results", [])),
                                  *(s.get("system") for s in samples)]))
    counts = {k: sum(sample_status(s) == k for s in samples) for k in _STATUS_LABEL}
    config = results.get("config", {})
    notes = results.get("notes", [])
    filters = ("<div class='filters'>" + "".join(
        f"<label><input type='checkbox' class='status-filter' value='{k}' id='filter-{k}' checked> "
        f"{_e(label)} ({counts[k]})</label>" for k, label in _STATUS_LABEL.items())
        + "<label>system <select id='system-filter'><option value=''>all</option>"
        + "".join(f"<option value='{_e(s)}'>{_e(s)}</option>" for s in systems if s is not None)
        + f"</select></label> <span class='muted'>showing <span id='shown-count'>{len(samples)}</span> of "
        f"{len(samples)}</span></div>")
    plot_html = "".join(f"<img alt='{_e(p.stem)}' src='{_png(p)}'>" for p in plots)
    return "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='muted'>model {_e(config.get('model'))} · tasks {_e(', '.join(config.get('tasks', [])))} · "
        f"max new tokens {_e(config.get('max_new_tokens'))} · latent steps {_e(config.get('latent_steps'))}</p>",
        "<h2>Results</h2>", _results_table(results.get("results", [])),
        "".join(f"<p class='muted'>{_e(n)}</p>" for n in notes),
        f"<h2>Plots</h2><div class='plots'>{plot_html or '<p class=muted>no plots</p>'}</div>",
        f"<h2>Samples</h2>{filters}<div id='samples'>", *(_sample_html(s) for s in samples), "</div>",
        f"<script>{_JS}</script></body></html>",
    ])


def write_html_report(run_dir: str | Path, results: dict | None = None) -> Path:
    """Write ``run_dir/report.html`` from its results.json (or ``results``) and samples.jsonl; returns its path.

    The plots are drawn for this run alone into a temporary folder and embedded, so the run's own PNG files
    (which may hold a merged report) are left as they are.
    """
    from diffmas.eval.report import plot, read_results

    run_dir = Path(run_dir)
    if results is None:
        results = read_results(run_dir)
    samples = _read_samples(run_dir / "samples.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        plots = plot(results, Path(tmp)) if results.get("results") else []
        page = render_html(results, samples, plots, f"DiffMAS evaluation: {run_dir.name or run_dir}")
    out = run_dir / HTML_FILE
    out.write_text(page, encoding="utf-8")
    return out

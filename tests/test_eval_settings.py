"""diffmas eval records every system's effective settings, warns when they differ, and runs the full-budget single."""

from __future__ import annotations

import json

import pytest
from conftest import make_backbone

from diffmas.adapters import LoraSettings, attach_lora, save_adapters
from diffmas.errors import DiffMASError
from diffmas.eval.entries import parse_systems
from diffmas.eval.runner import run_eval
from diffmas.eval.samples import RESULTS_FILE, SAMPLES_FILE
from diffmas.prompts import load_topology

TASK = "rg:chain_sum"
KW = dict(limit=2, batch_size=2, max_new_tokens=6, writer_max_new_tokens=6, show_progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _samples(out) -> list[dict]:
    return [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]


def test_every_system_records_its_effective_settings_and_a_notice_says_when_they_differ(tiny_model_dir, tmp_path,
                                                                                          capsys):
    bb = make_backbone()
    roles = [a.role for a in load_topology("duo").agents]
    settings = LoraSettings(rank=2, targets=("q_proj", "v_proj"))
    attach_lora(bb, settings, roles)
    save_adapters(bb, tmp_path / "adapter", {r: "default" for r in roles}, settings,
                  extra={"system": "diffmas", "topology": "duo", "latent_steps": 1, "realign": False})
    results = run_eval(["text_mas", "latent_mas", f"diffmas:{tmp_path / 'adapter'}"], [TASK], tmp_path / "mixed",
                       model=str(tiny_model_dir), **KW)
    got = {s["label"]: s["settings"] for s in results["config"]["systems"]}
    assert (got["latent_mas"]["topology"], got["latent_mas"]["latent_steps"], got["latent_mas"]["realign"]) == \
        ("sequential", 10, True)  # the silent default m = 10 ...
    assert (got["diffmas"]["topology"], got["diffmas"]["latent_steps"], got["diffmas"]["realign"]) == \
        ("duo", 1, False)  # ... next to the adapter's own topology and m
    assert got["text_mas"]["latent_steps"] is None and got["text_mas"]["writer_max_new_tokens"] == 6
    assert [a["max_new_tokens"] for a in got["text_mas"]["agents"]] == [6, 6, 6, 6]
    assert got["text_mas"]["thinking_budget"] == 24 and got["latent_mas"]["thinking_budget"] == 3 * 10 + 6
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "latent_mas sequential (m=10)" in notices[0] and "diffmas duo (m=1" in notices[0]
    assert any("differ in topology or latent steps" in n for n in results["notes"])
    # Samples of each system ran with those settings.
    steps = {s["system"]: [a["latent_steps"] for a in s["agents"]] for s in _samples(tmp_path / "mixed")}
    assert steps["latent_mas"] == [10, 10, 10, 0] and steps["diffmas"] == [1, 0]

    same = run_eval(["text_mas", "latent_mas"], [TASK], tmp_path / "same", model=str(tiny_model_dir),
                    latent_steps=2, **KW)
    assert "notice:" not in capsys.readouterr().err
    assert not any("differ in topology" in n for n in same["notes"])


def test_full_thinking_budget_single_and_per_role_budgets(tiny_model_dir, tmp_path):
    topo = tmp_path / "pair.yaml"
    topo.write_text("name: pair\nagents:\n"
                    "  - {role: writer, system: You write., instruction: Think., max_new_tokens: 4, latent_steps: 1}\n"
                    "  - {role: reader, system: You read., instruction: Answer., max_new_tokens: 5}\n")
    out = tmp_path / "first"
    results = run_eval(["text_mas", "latent_mas", "single", "single@budget"], [TASK], out, model=str(tiny_model_dir),
                       topology=str(topo), latent_steps=3, budget_from="text_mas", **KW)
    got = {s["label"]: s["settings"] for s in results["config"]["systems"]}
    assert [(a["latent_steps"], a["max_new_tokens"]) for a in got["text_mas"]["agents"]] == [(0, 4), (0, 5)]
    assert [(a["latent_steps"], a["max_new_tokens"]) for a in got["latent_mas"]["agents"]] == [(1, 0), (0, 5)]
    assert got["text_mas"]["thinking_budget"] == 9
    assert got["single"]["max_new_tokens"] == 6 and "budget_from" not in got["single"]
    assert got["single@budget"]["max_new_tokens"] == 9 and got["single@budget"]["budget_from"] == "text_mas"
    by_system: dict[str, list[dict]] = {}
    for s in _samples(out):
        by_system.setdefault(s["system"], []).append(s)
    # the random tiny model never stops early: every agent uses exactly its budget
    assert {s["final_tokens"] for s in by_system["single@budget"]} == {9}
    assert {s["final_tokens"] for s in by_system["single"]} == {6}
    assert {s["final_tokens"] for s in by_system["text_mas"]} == {5}
    assert all(s["truncated"] for s in by_system["text_mas"])  # truncation is judged against the agent's budget
    assert {s["agents"][0]["generated_tokens"] for s in by_system["text_mas"]} == {4}
    assert {s["agents"][0]["latent_steps"] for s in by_system["latent_mas"]} == {1}

    # From an earlier evaluation's folder, also one written before settings were recorded.
    again = run_eval(["single"], [TASK], tmp_path / "second", model=str(tiny_model_dir), budget_from=f"{out}:text_mas",
                     **KW)
    assert again["config"]["systems"][0]["settings"]["max_new_tokens"] == 9
    assert again["config"]["systems"][0]["settings"]["budget_from"] == f"{out}:text_mas"
    saved = json.loads((out / RESULTS_FILE).read_text())
    for item in saved["config"]["systems"]:
        del item["settings"], item["budget"]
    (out / RESULTS_FILE).write_text(json.dumps(saved))
    legacy = run_eval(["single@budget"], [TASK], tmp_path / "third", model=str(tiny_model_dir),
                      budget_from=f"{out}:text_mas", **KW)
    assert legacy["config"]["systems"][0]["settings"]["max_new_tokens"] == 9
    with pytest.raises(DiffMASError, match="text_mas, latent_mas"):  # two candidates: say which
        run_eval(["single@budget"], [TASK], tmp_path / "fourth", model=str(tiny_model_dir), budget_from=str(out), **KW)
    # A folder written before settings were recorded still resumes.
    run_eval(["text_mas", "latent_mas", "single", "single@budget"], [TASK], out, model=str(tiny_model_dir),
             topology=str(topo), latent_steps=3, budget_from="text_mas", **KW)
    assert len(_samples(out)) == 8  # nothing was rerun


def test_budget_entries_parse():
    assert [(e.label, e.name, e.budget) for e in parse_systems(["single", "single@budget"])] == \
        [("single", "single", False), ("single@budget", "single", True)]
    with pytest.raises(DiffMASError, match="only single-agent"):
        parse_systems(["text_mas@budget"])

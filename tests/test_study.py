"""The grounding study's machinery: arm planning, claims, one arm end to end on a tiny model, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffmas.experiments.grounding import (GROUNDED, Arm, StudyConfig, best_grounded, plan_arms, run_study,
                                           train_config)
from diffmas.experiments.grounding_report import write_report
from diffmas.experiments import workers
from diffmas.experiments.workers import claim, snapshot_unfinished, work_through


def _fake_arm(docs, name, seed, accuracy, correct):
    (docs / "arms").mkdir(parents=True, exist_ok=True)
    (docs / "samples").mkdir(parents=True, exist_ok=True)
    (docs / "curves").mkdir(parents=True, exist_ok=True)
    stem = f"chain_sum--{name}--s{seed}"
    record = {"arm": name, "task": "rg:chain_sum", "seed": seed, "phase": 1, "system": "diffmas",
              "label": f"{name}/s{seed}", "n": len(correct), "accuracy": accuracy, "stderr": 0.05,
              "format_failures": 0.0, "tokens_mean": 6.0, "accuracy_flexible": accuracy, "train_seconds": 1,
              "machine": "test", "date": "2026-11-28"}
    (docs / "arms" / f"{stem}.json").write_text(json.dumps(record))
    (docs / "samples" / f"{stem}.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "correct": c, "tokens": 6, "extracted": "1"}) + "\n"
                for i, c in enumerate(correct)))
    (docs / "curves" / f"{stem}.jsonl").write_text(
        json.dumps({"step": 0, "heldout_loss": 2.0}) + "\n" + json.dumps({"step": 5, "heldout_loss": 1.0}) + "\n")


def test_phase_two_waits_for_the_grounded_screen(tmp_path):
    docs = tmp_path / "docs"
    first = plan_arms(docs)
    assert [a.phase for a in first] == [1] * len(first)
    assert {"sft_answer", "sft_worked", "curriculum", "distill", "link", "pause", "single_latent", "m0_trace",
            "diffmas_answer"} == {a.name for a in first}
    for name, acc in zip(GROUNDED, (0.3, 0.5, 0.4)):
        _fake_arm(docs, name, 0, acc, [True] * 3 + [False])
    assert best_grounded(docs) == ("distill", "link")
    later = [a for a in plan_arms(docs) if a.phase > 1]
    assert {(a.name, a.seed) for a in later if a.phase == 2} == \
        {(n, s) for n in ("sft_answer", "sft_worked", "distill", "link", "diffmas_answer") for s in (1, 2)}
    assert {a.name for a in later if a.phase == 3} == {"sft_answer", "sft_worked", "distill", "pause"}
    assert all(a.task == "rg:leg_counting" for a in later if a.phase == 3)


def test_arms_share_one_budget_and_controls_match_their_method():
    cfg = StudyConfig()
    configs = {a.name: train_config(a, cfg) for a in plan_arms(Path("/nonexistent"))}
    assert len({c.steps for c in configs.values()}) == 1 and len({c.batch_size for c in configs.values()}) == 1
    assert configs["pause"].method == configs["curriculum"].method == "curriculum"
    assert configs["pause"].latent_map == "pause" and configs["pause"].latent_steps == configs["curriculum"].latent_steps
    assert configs["m0_trace"].latent_steps == 0 and configs["m0_trace"].method == configs["diffmas_answer"].method
    assert configs["single_latent"].system == "single_latent" and configs["single_latent"].method == "curriculum"
    assert configs["sft_answer"].data.target_style == "answer" and configs["sft_worked"].data.target_style == "worked"


def test_a_dead_workers_claim_is_taken_over(tmp_path):
    arm = Arm("curriculum", "rg:chain_sum", 0)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"{arm.id}.claim").write_text(str(dead.pid))
    assert claim(tmp_path, arm.id)
    assert (tmp_path / f"{arm.id}.claim").read_text() == str(os.getpid())
    assert not claim(tmp_path, arm.id)  # now held by a live process (this one)


def test_a_stop_snapshots_unfinished_arms_and_a_finished_arm_drops_its_snapshot(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    curve = [{"step": 0, "heldout_loss": 2.5}, {"step": 1, "loss": 2.0}, {"step": 25, "heldout_loss": 1.25}]
    for arm_id in ("a--s0", "b--s0"):
        (out / "runs" / arm_id).mkdir(parents=True)
        (out / "runs" / arm_id / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    assert snapshot_unfinished(out, docs) == ["a--s0", "b--s0"]
    snapshot = docs / "in-progress" / "a--s0.jsonl"
    assert snapshot.read_text() == (out / "runs" / "a--s0" / "metrics.jsonl").read_text()
    table = (docs / "in-progress" / "README.md").read_text()
    assert "| a--s0 |" in table and "| 25 | 0: 2.500, 25: 1.250 |" in table

    class Fake:
        def __init__(self, id):
            self.id = id

    def run(arm):  # finishing an arm writes its result, as run_arm does
        (docs / "arms").mkdir(exist_ok=True)
        (docs / "arms" / f"{arm.id}.json").write_text("{}")
        return "done"

    work_through(lambda: [Fake("a--s0")], run, lambda: None, out, docs)
    assert not (docs / "in-progress" / "a--s0.jsonl").exists()
    assert (docs / "in-progress" / "b--s0.jsonl").exists()
    (docs / "arms" / "b--s0.json").write_text("{}")  # finished by a worker without this code: the next stop drops it
    assert snapshot_unfinished(out, docs) == []
    assert not list((docs / "in-progress").glob("*.jsonl"))
    assert "No arm is training." in (docs / "in-progress" / "README.md").read_text()



class FakeArm:
    def __init__(self, id):
        self.id = id


def _finishing(docs: Path, ran: list[str]):
    """A worker's ``run``: records the arm and writes its result, as run_arm does."""
    def run(arm):
        ran.append(arm.id)
        (docs / "arms").mkdir(exist_ok=True)
        (docs / "arms" / f"{arm.id}.json").write_text("{}")
        return "done"
    return run


@pytest.mark.parametrize("trees, restarts", [(["t1", "t2"], True), (["t1", "t1"], False), (["t1", None], False),
                                             ([None, "t2"], False)])
def test_a_worker_restarts_on_newly_committed_code_between_arms(tmp_path, monkeypatch, trees, restarts):
    # trees: the package's committed tree when the worker starts and after its first arm (None: unreadable, or
    # uncommitted changes in the package: no restart onto a half-made edit).
    out, docs = tmp_path / "out", tmp_path / "docs"
    seen = iter(trees + trees[-1:] * 3)
    monkeypatch.setattr(workers, "code_tree", lambda: next(seen))
    execs = []

    def execv(path, argv):
        execs.append(argv)
        raise SystemExit(0)  # exec never returns: the process goes on as the new command

    monkeypatch.setattr(workers.os, "execv", execv)
    preloaded = []
    monkeypatch.setattr(workers, "preload_package", lambda: preloaded.append(next(iter(ran), None)))
    ran = []
    run = _finishing(docs, ran)
    try:
        work_through(lambda: [FakeArm("a--s0"), FakeArm("b--s0")], run, lambda: None, out, docs)
    except SystemExit:
        pass
    assert ran == (["a--s0"] if restarts else ["a--s0", "b--s0"])
    assert preloaded == [None]  # every module imported once, before the first arm
    assert execs == ([[sys.executable, *sys.argv]] if restarts else [])
    assert not (out / "claims" / "a--s0.claim").exists()  # the finished arm's claim is released before the restart


def test_a_worker_with_a_deadline_passes_over_arms_that_would_not_finish_and_stops(tmp_path, capsys):
    out, docs = tmp_path / "out", tmp_path / "docs"
    ran = []
    plan = [FakeArm("long--s0"), FakeArm("short--s0"), FakeArm("long--s1"), FakeArm("short--s1")]
    work_through(lambda: plan, _finishing(docs, ran), lambda: None, out, docs,
                 fits=lambda arm: arm.id.startswith("short"))
    assert ran == ["short--s0", "short--s1"]
    assert "no free arm fits in the time left (2 left, the next: long--s0): stopping" in capsys.readouterr().out
    work_through(lambda: plan, _finishing(docs, ran), lambda: None, out, docs)  # no deadline: the rest, in order
    assert ran == ["short--s0", "short--s1", "long--s0", "long--s1"]


def test_a_worker_that_keeps_going_takes_the_arms_that_do_not_fit_once_none_fits(tmp_path, capsys):
    out, docs = tmp_path / "out", tmp_path / "docs"
    ran = []
    plan = [FakeArm("long--s0"), FakeArm("short--s0"), FakeArm("long--s1")]
    (out / "claims").mkdir(parents=True)
    (out / "claims" / "long--s1.claim").write_text(str(os.getppid()))  # another live worker's arm: never taken
    work_through(lambda: plan, _finishing(docs, ran), lambda: None, out, docs,
                 fits=lambda arm: arm.id.startswith("short"), keep_going=True, max_arms=2)
    assert ran == ["short--s0", "long--s0"]  # the arms that fit first, then the rest in plan order
    assert "starting long--s0 anyway (--keep-going)" in capsys.readouterr().out


def test_the_plan_status_says_where_each_arm_stands(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"

    class Fake:
        def __init__(self, id):
            self.id = id

    (docs / "arms").mkdir(parents=True)
    (docs / "arms" / "done--s0.json").write_text(json.dumps({"accuracy": 0.25, "stderr": 0.02, "steps_trained": 300}))
    curve = "".join(json.dumps(r) + "\n" for r in ({"step": 0, "heldout_loss": 2.0}, {"step": 30, "loss": 1.0}))
    for arm_id in ("live--s0", "dead--s0", "fresh--s0"):
        (out / "runs" / arm_id).mkdir(parents=True)
        (out / "runs" / arm_id / "metrics.jsonl").write_text(curve)
    (out / "runs" / "dead--s0" / "checkpoints" / "step-000025").mkdir(parents=True)
    assert claim(out / "claims", "live--s0")  # held by this (live) process
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / "claims" / "dead--s0.claim").write_text(str(dead.pid))
    rows = workers.plan_status([Fake(i) for i in ("done--s0", "live--s0", "dead--s0", "fresh--s0", "new--s0")], out,
                               docs)
    assert rows == [("done--s0", "finished", "accuracy 0.250 ± 0.020, 300 steps"),
                    ("live--s0", "training", f"step 30 (pid {os.getpid()})"),
                    ("dead--s0", "stopped", "logged step 30; resumes from step 25"),
                    ("fresh--s0", "stopped", "logged step 30; restarts from step 0"),
                    ("new--s0", "pending", "")]
    # With what each would still cost (None: unknown), for the arms not finished or training.
    costs = {"dead--s0": 5400.0, "new--s0": 9000.0}
    rows = workers.plan_status([Fake(i) for i in ("done--s0", "dead--s0", "fresh--s0", "new--s0")], out, docs,
                               lambda arm: costs.get(arm.id))
    assert [detail for _, _, detail in rows][1:] == ["logged step 30; resumes from step 25; about 1.5 h",
                                                     "logged step 30; restarts from step 0", "about 2.5 h"]

def test_report_pairs_each_arm_with_both_baselines(tmp_path):
    docs = tmp_path / "docs"
    _fake_arm(docs, "sft_answer", 0, 0.25, [True, False, False, False] * 5)
    _fake_arm(docs, "sft_worked", 0, 0.5, [True, True, False, False] * 5)
    _fake_arm(docs, "curriculum", 0, 0.75, [True, True, True, False] * 5)
    results = write_report(docs, n_boot=500)
    row = next(r for r in results["arms"] if r["arm"] == "curriculum")
    assert row["vs_sft_answer"]["diff"] == 0.5 and row["vs_sft_worked"]["diff"] == 0.25
    assert row["vs_sft_answer"]["ci_low"] > 0
    assert (docs / "README.md").read_text().count("| curriculum |") >= 1
    assert (docs / "forest_chain_sum_vs_sft_answer.png").is_file() and (docs / "heldout_loss.png").is_file()


def test_one_arm_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    import diffmas.experiments.grounding as study

    monkeypatch.setattr(study, "plan_arms", lambda docs: [Arm("curriculum", "rg:chain_sum", 0, shuffled=True)])
    cfg = StudyConfig(steps=4, batch_size=2, stage_steps=1, n_eval=4, max_new_tokens=3, eval_batch_size=4,
                      heldout_every=2, link_pretrain_steps=1, model=str(tiny_model_dir))
    run_study(tmp_path / "out", tmp_path / "docs", cfg)
    record = json.loads((tmp_path / "docs" / "arms" / "chain_sum--curriculum--s0.json").read_text())
    assert record["n"] == 4 and record["shuffled"]["n"] == 4 and record["config"]["method"] == "curriculum"
    assert record["code"].split("+")[0] == subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                         capture_output=True).stdout.strip()
    curve = (tmp_path / "docs" / "curves" / "chain_sum--curriculum--s0.jsonl").read_text().splitlines()
    assert sum('"heldout_loss"' in line for line in curve) == 3  # steps 0, 2, 4
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert results["arms"][0]["arm"] == "curriculum"
    run_study(tmp_path / "out", tmp_path / "docs", cfg)  # finished arms are not run again
    assert not list((tmp_path / "out" / "claims").glob("*.claim"))


def test_the_curves_give_each_arm_one_colour_and_each_seed_one_line_style(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from diffmas.experiments.curves import plot_heldout

    runs = []
    for label, start in (("coupled/s0", 2.0), ("coupled/s1", 2.2), ("pause/s0", 2.4), ("skyline", 0.5)):
        path = tmp_path / f"{label.replace('/', '-')}.jsonl"
        path.write_text("".join(json.dumps({"step": s, "heldout_loss": start / (1 + s)}) + "\n" for s in (0, 1, 2)))
        runs.append((label, path))
    drawn = []
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn.extend((line.get_label(), line.get_color(), line.get_linestyle()) for line in ax.get_lines())
        drawn.append(ax.get_ylim())
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    assert plot_heldout({"t": runs}, tmp_path / "curves.png", "validation") == tmp_path / "curves.png"
    lines, ylim = {label: (color, style) for label, color, style in drawn[:-1]}, drawn[-1]
    assert lines["coupled/s0"][0] == lines["coupled/s1"][0] != lines["pause/s0"][0]
    assert lines["coupled/s0"][1] == "-" and lines["coupled/s1"][1] == "--" and lines["skyline"][1] == "-"
    assert ylim[1] == pytest.approx(1.1 * 2.4 / 2)  # set by the losses after step 0
    assert (tmp_path / "curves.png").is_file()


def test_the_curves_never_draw_two_arms_alike(tmp_path, monkeypatch):
    """A study panel holds 15+ arms: past the palette's ten colours the marker tells them apart."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from diffmas.experiments.curves import plot_heldout

    runs = []
    for i in range(17):
        path = tmp_path / f"arm{i}.jsonl"
        path.write_text("".join(json.dumps({"step": s, "heldout_loss": 1.0 + i / (1 + s)}) + "\n" for s in (0, 1)))
        runs.append((f"arm{i:02d}/s0", path))
    drawn = []
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        drawn.extend((line.get_color(), line.get_marker()) for line in fig.axes[0].get_lines())
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    plot_heldout({"t": runs}, tmp_path / "curves.png", "validation")
    assert len(drawn) == 17 and len(set(drawn)) == 17


def test_the_gate_table_follows_each_gated_run_and_skips_the_others(tmp_path):
    from diffmas.experiments.curves import gate_table

    gated, plain = tmp_path / "gated.jsonl", tmp_path / "plain.jsonl"
    rows = [{"step": s, "loss": 1.0, "gate": s / 1000} | ({"heldout_loss": 2.0 - s / 100} if s % 25 == 0 else {})
            for s in range(1, 121)]
    gated.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gate"}) + "\n" for r in rows))
    assert gate_table([("plain/s0", plain)]) == []
    table = gate_table([("gated_anneal-m1/s0", gated), ("plain/s0", plain)])
    runs = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    # Every 50 steps and the last, with the held-out loss where one was measured.
    assert runs == ["| gated_anneal-m1/s0 | 50: +0.050 (1.500), 100: +0.100 (1.000), 120: +0.120 |"]


def test_a_preloaded_worker_keeps_running_the_code_it_started_with(tmp_path, monkeypatch):
    """A module a worker imports lazily mid-arm must not come from files edited after it started."""
    package = tmp_path / "pkg_started"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("raise SystemExit('a __main__ module is never imported')")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "late.py").write_text("VERSION = 1\n")
    (package / "needs.py").write_text("import a_module_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert workers.preload_package("pkg_started") == ["pkg_started.needs"]
    assert "pkg_started.sub.late" in sys.modules
    (package / "sub" / "late.py").write_text("VERSION = 2\n")  # edited while the worker runs
    import importlib

    assert importlib.import_module("pkg_started.sub.late").VERSION == 1

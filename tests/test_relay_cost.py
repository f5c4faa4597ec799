"""What an arm will cost before it starts (from the finished arms' own curves), and the deadline that uses it."""

from __future__ import annotations

import json

import pytest

from diffmas.experiments import relay
from diffmas.experiments.relay import Arm, RelayConfig
from diffmas.experiments.relay_cost import MARGIN, estimate_seconds, remaining_line, steps_done


def _finished(docs, name, task, step_s, heldout_s, eval_s, m=6, system="diffmas", steps=500):
    """A finished arm's record and curve: ``steps`` steps of ``step_s`` seconds, held-out every 25 of ``heldout_s``."""
    arm = Arm(name, task, latent_steps=None if m == 6 else m)
    rec = {"arm": name, "task": task, "seed": 0, "label": arm.label, "system": system, "latent_steps": m,
           "eval_seconds": eval_s, "steps_trained": steps if system != "text_mas" else 0}
    (docs / "arms").mkdir(parents=True, exist_ok=True)
    (docs / "arms" / f"{arm.id}.json").write_text(json.dumps(rec))
    if system != "text_mas":
        (docs / "curves").mkdir(exist_ok=True)
        lines = [{"step": 0, "heldout_loss": 2.0, "heldout_seconds": heldout_s}]
        for step in range(1, steps + 1):
            line = {"step": step, "loss": 1.0, "seconds": step_s}
            lines.append({**line, "heldout_loss": 1.0, "heldout_seconds": heldout_s} if step % 25 == 0 else line)
        (docs / "curves" / f"{arm.id}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _checkpoint(out, arm_id, step):
    ckpt = out / "runs" / arm_id / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": step}))


def test_an_arm_costs_its_references_steps_heldout_evaluations_and_test_evaluation(tmp_path):
    out, docs, cfg = tmp_path / "out", tmp_path / "docs", RelayConfig()
    assert estimate_seconds(Arm("coupled", relay.DIGITS, 1), cfg, out, docs) is None  # nothing to go by yet
    _finished(docs, "coupled", relay.DIGITS, step_s=10.0, heldout_s=100.0, eval_s=400)
    _finished(docs, "skyline", relay.DIGITS, step_s=4.0, heldout_s=30.0, eval_s=200)
    _finished(docs, "text_m", relay.DIGITS, step_s=0, heldout_s=0, eval_s=500, system="text_mas")
    # A fresh seed of coupled: 500 steps, 21 held-out evaluations (step 0 included), the test evaluation and the
    # same items with its thoughts shuffled (a latents-only writer that feeds its states back).
    fresh = (500 * 10.0 + 21 * 100.0 + 2 * 400) * MARGIN
    assert estimate_seconds(Arm("coupled", relay.DIGITS, 1), cfg, out, docs) == pytest.approx(fresh)
    assert estimate_seconds(Arm("text_4m", relay.CHAIN), cfg, out, docs) == pytest.approx(500 * MARGIN)
    # Resuming from its own checkpoint: only the steps left.
    _checkpoint(out, Arm("coupled", relay.DIGITS, 1).id, 300)
    assert steps_done(Arm("coupled", relay.DIGITS, 1), out) == 300
    assert estimate_seconds(Arm("coupled", relay.DIGITS, 1), cfg, out, docs) == pytest.approx(
        (200 * 10.0 + 8 * 100.0 + 2 * 400) * MARGIN)
    # A run to the cap continues its stopped run's checkpoint.
    _checkpoint(out, Arm("pause", relay.DIGITS).id, 325)
    assert steps_done(Arm("pause_full", relay.DIGITS), out) == 325
    # More latent steps than the reference: steps and held-out evaluations scale with m (conservative).
    assert estimate_seconds(Arm("coupled", relay.DIGITS, latent_steps=12), cfg, out, docs) == pytest.approx(
        (500 * 20.0 + 21 * 200.0 + 2 * 400) * MARGIN)
    # Three times the cap, and no reference of its own name: every trained arm of the task (10 s and 4 s steps).
    long = estimate_seconds(Arm("coupled_long", relay.DIGITS), cfg, out, docs)
    assert long == pytest.approx((1500 * 7.0 + 61 * 65.0 + 2 * 300) * MARGIN)
    # Measured at two m: a line through them (m = 2: 6 s steps, 60 s held-out; m = 6: 10 s, 100 s).
    _finished(docs, "coupled", relay.DIGITS, step_s=6.0, heldout_s=60.0, eval_s=400, m=2)
    assert estimate_seconds(Arm("coupled", relay.DIGITS, latent_steps=16), cfg, out, docs) == pytest.approx(
        (500 * 20.0 + 21 * 200.0 + 2 * 400) * MARGIN)


def test_a_recipe_not_run_on_a_task_yet_costs_what_the_arm_under_another_recipe_costs_there(tmp_path):
    out, docs, cfg = tmp_path / "out", tmp_path / "docs", RelayConfig()
    _finished(docs, "coupled", relay.DIGITS, step_s=6.0, heldout_s=60.0, eval_s=300)
    _finished(docs, "coupled_anneal", relay.CHAIN, step_s=12.0, heldout_s=120.0, eval_s=900)
    # The task's prompts set a step's cost: the digits' coupled, not the sums' curriculum.
    assert estimate_seconds(Arm("coupled_anneal", relay.DIGITS), cfg, out, docs) == pytest.approx(
        (500 * 6.0 + 21 * 60.0 + 2 * 300) * MARGIN)
    # Under its own recipe where that has run on the task.
    _finished(docs, "coupled_anneal", relay.DIGITS, step_s=7.0, heldout_s=70.0, eval_s=300)
    assert estimate_seconds(Arm("coupled_anneal", relay.DIGITS, 1), cfg, out, docs) == pytest.approx(
        (500 * 7.0 + 21 * 70.0 + 2 * 300) * MARGIN)
    # A gated arm on the sums (no gated arm there yet: the curriculum's steps there, not the digits' gated arm at
    # m = 1 scaled to m = 6) also evaluates with its gate closed and with its thoughts shuffled.
    _finished(docs, "gated_anneal", relay.DIGITS, step_s=5.0, heldout_s=50.0, eval_s=300, m=1)
    assert estimate_seconds(Arm("gated_anneal", relay.CHAIN), cfg, out, docs) == pytest.approx(
        (500 * 12.0 + 21 * 120.0 + 3 * 900) * MARGIN)


def test_an_arm_on_another_data_seed_costs_what_the_arm_costs(tmp_path):
    out, docs, cfg = tmp_path / "out", tmp_path / "docs", RelayConfig()
    _finished(docs, "pause_anneal", relay.DIGITS, step_s=5.0, heldout_s=50.0, eval_s=300, m=1)
    _finished(docs, "coupled_anneal", relay.DIGITS, step_s=15.0, heldout_s=150.0, eval_s=300, m=1)
    # pause_anneal's own steps, not the mean of every arm on the task.
    assert estimate_seconds(Arm("pause_anneal_data0", relay.DIGITS, 2, latent_steps=1), cfg, out, docs) == \
        pytest.approx((500 * 5.0 + 21 * 50.0 + 300) * MARGIN)


def test_the_command_line_reads_the_deadline_and_rejects_a_bad_one(tmp_path):
    from typer.testing import CliRunner

    from diffmas.cli import app
    from diffmas.cli.experiments import _deadline

    assert _deadline("2026-12-06T07:00") == 1796540400.0
    assert _deadline("2026-12-06T08:00+01:00") == 1796540400.0
    result = CliRunner().invoke(app, ["study-relay", "--until", "tonight", "--out", str(tmp_path / "runs"),
                                      "--docs", str(tmp_path / "docs")])
    assert result.exit_code == 2 and "--until 'tonight': not an ISO 8601 time" in result.output
    result = CliRunner().invoke(app, ["study-relay", "--keep-going", "--out", str(tmp_path / "runs"),
                                      "--docs", str(tmp_path / "docs")])
    assert result.exit_code == 2 and "--keep-going goes with --until" in result.output
    assert not (tmp_path / "runs").exists()


def test_the_report_says_what_the_rest_of_the_plan_will_cost(tmp_path):
    docs, cfg = tmp_path / "docs", RelayConfig()
    _finished(docs, "coupled", relay.DIGITS, step_s=10.0, heldout_s=100.0, eval_s=400)
    plan = [Arm("coupled", relay.DIGITS), Arm("coupled", relay.DIGITS, 1), Arm("coupled", relay.DIGITS, 2),
            Arm("text_m", relay.DIGITS)]
    # Two fresh seeds at (500 * 10 + 21 * 100 + 400) * 1.15 s each; no text arm has finished to go by.
    assert remaining_line(plan, cfg, docs) == (
        "Still planned: 3 arms, about 5 core-hours by their estimates (`relay_cost.py`: each from step 0 to its "
        "step cap, +15%; an upper bound where the flat-loss rule stops an arm early), 1 of them with no finished "
        "arm to estimate from yet.")
    assert remaining_line(plan[:1], cfg, docs) == "Nothing more is planned."


def test_an_arm_whose_channel_is_probed_costs_the_probes_measured_time_too(tmp_path):
    out, docs, cfg = tmp_path / "out", tmp_path / "docs", RelayConfig()
    _finished(docs, "coupled", relay.DIGITS, step_s=10.0, heldout_s=100.0, eval_s=400)
    _finished(docs, "skyline", relay.DIGITS, step_s=10.0, heldout_s=100.0, eval_s=400)
    before = {name: estimate_seconds(Arm(name, relay.DIGITS, 1), cfg, out, docs) for name in ("coupled", "skyline")}
    (docs / "probes").mkdir()
    (docs / "probes" / f"{Arm('coupled', relay.DIGITS).id}.json").write_text(json.dumps({"settings": {"seconds": 600}}))
    assert estimate_seconds(Arm("coupled", relay.DIGITS, 1), cfg, out, docs) == pytest.approx(
        before["coupled"] + 600 * MARGIN)
    assert estimate_seconds(Arm("skyline", relay.DIGITS, 1), cfg, out, docs) == pytest.approx(before["skyline"])
    # The lens curve read after the probe is part of the same cost.
    (docs / "lens" / "curves").mkdir(parents=True)
    (docs / "lens" / "curves" / f"{Arm('coupled', relay.DIGITS).id}.json").write_text(
        json.dumps({"points": [{"step": 25, "seconds": 100}, {"step": 50, "seconds": 20}]}))
    assert estimate_seconds(Arm("coupled", relay.DIGITS, 1), cfg, out, docs) == pytest.approx(
        before["coupled"] + 720 * MARGIN)
    # Arms probed before lens curves existed cost less than the arms to come: those read with a curve set the cost.
    for name, seconds in (("pause", 500), ("detached", 550)):
        _finished(docs, name, relay.DIGITS, step_s=10.0, heldout_s=100.0, eval_s=400)
        (docs / "probes" / f"{Arm(name, relay.DIGITS).id}.json").write_text(json.dumps({"settings": {"seconds": seconds}}))
    assert estimate_seconds(Arm("coupled", relay.DIGITS, 1), cfg, out, docs) == pytest.approx(
        before["coupled"] + 720 * MARGIN)
    no_lens = RelayConfig(lens_items=0)  # without lens curves, the arms read by a probe alone (median of 500, 550)
    assert estimate_seconds(Arm("coupled", relay.DIGITS, 1), no_lens, out, docs) == pytest.approx(
        before["coupled"] + 525 * MARGIN)

"""The logit lens of a channel's latent inputs: one reading per writer and latent position, the same whatever
shares the batch; scored against the answer's places beside what one fixed token would match; refused where there
is no latent input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_backbone

from diffmas.decode import DecodeConfig
from diffmas.eval.lens import latent_tokens, lens_channel, lens_table, read_positions
from diffmas.eval.probe import DRAW_SEED, ProbeError
from diffmas.systems import build_system
from diffmas.tasks import get_task

M = 3


def _system(name: str = "latent_mas"):
    return build_system(name, make_backbone(dtype=torch.float64), topology="relay", latent_steps=M,
                        trace="latents")


def test_a_position_that_says_the_first_digit_scores_there_and_a_constant_only_what_a_constant_would():
    answers = ["7", "42", "709", "123456", "71"]
    said = {("reasoner", 1): [a[0] for a in answers], ("reasoner", 2): ["7"] * len(answers)}
    first, constant = read_positions(answers, said)
    assert (first.writer, first.position, first.n) == ("reasoner", 1, 5)
    assert first.places["1"] == 1.0 and first.constant["1"] == 0.6  # three of five start with 7
    assert first.places["2"] == 0.0  # no answer repeats its first digit second
    assert constant.places["1"] == constant.constant["1"] == 0.6
    assert constant.places["6"] == 0.0 and first.places["6"] == 0.0  # one answer has a sixth place: "6"
    assert constant.top_tokens == [("7", 1.0)]
    table = lens_table([first, constant])
    assert table[2].startswith("| reasoner | 1 | 5 | 1.00 (0.60) / ")  # said (what one fixed token would match)
    assert "| 0.00 (0.50) / " in table[2]  # place 2 holds 2, 0, 2, 1


def test_a_position_that_names_the_first_digit_in_words_is_read_but_not_said():
    words = dict(zip("123456789", ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")))
    answers = [f"{d}{(7 * i) % 10}" for i in range(6) for d in "123456789"]  # every first digit in both parts
    said = {("reasoner", 1): [words[a[0]] for a in answers], ("reasoner", 2): ["x"] * len(answers)}
    named, blank = read_positions(answers, said)
    assert named.places["1"] == 0.0 and named.read["1"] == 1.0  # never the digit itself, always readable
    assert named.read_constant["1"] == blank.read["1"] == blank.read_constant["1"] < 0.2
    assert named.read["2"] < 0.5  # the second digit is not in the word
    assert named.tokens == said[("reasoner", 1)]


def test_the_lens_reads_every_latent_position_in_item_order_whatever_the_batch():
    system, task = _system(), get_task("relay:digits")
    prompts = [task.views(e) for e in task.load(limit=7)]
    one = latent_tokens(system, prompts, batch_size=1, show_progress=False)
    many = latent_tokens(system, prompts, batch_size=7, show_progress=False)
    assert list(one) == [("reasoner", p) for p in range(1, M + 1)] and one == many
    # What answering the same prompts records (its own batching and ordering) says the same, item by item.
    lensed = build_system("latent_mas", system.backbone, topology="relay", latent_steps=M, trace="latents",
                          lens_top_k=1)
    records = lensed.run(prompts, DecodeConfig(max_new_tokens=1), batch_size=3)
    assert [[r["agents"][0]["latents"][p][0].strip() for r in records] for p in range(M)] == list(one.values())
    assert len({*one[("reasoner", 1)]}) > 1  # the items differ: a misordering would show
    lenses, answers = lens_channel(system, task, n=7, batch_size=3, show_progress=False)
    items = task.training_examples(7, DRAW_SEED, "answer", exclude={e.question for e in task.load()})
    assert answers == [e.answer for e in items]  # fresh items, never evaluation ones
    drawn = latent_tokens(system, [task.views(e) for e in items], batch_size=7, show_progress=False)
    assert [x.tokens for x in lenses] == list(drawn.values())
    assert [(x.writer, x.position, x.n) for x in lenses] == [("reasoner", p, 7) for p in range(1, M + 1)]


def test_a_channel_without_latent_inputs_is_refused():
    with pytest.raises(ProbeError, match="no latent writers"):
        lens_channel(_system("text_mas"), get_task("relay:digits"), n=4, show_progress=False)


def test_the_cli_writes_the_lens(tmp_path, tiny_model_dir):
    done = subprocess.run([sys.executable, "-m", "diffmas.cli", "lens", "--system", "latent_mas", "--model",
                           str(tiny_model_dir), "--n", "6", "--latent-steps", "2", "--out", str(tmp_path / "l.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "l.json").read_text())
    assert saved["settings"]["latent_steps"] == 2 and [p["position"] for p in saved["positions"]] == [1, 2]
    assert len(saved["answers"]) == 6 and all(len(p["tokens"]) == 6 for p in saved["positions"])
    assert "| reasoner | 2 | 6 |" in done.stdout


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, tiny_model_dir):
    """A tiny coupled latents-only run on relay:digits with checkpoints at steps 2 and 4 and held-out losses."""
    from diffmas.config import TrainConfig, from_dict
    from diffmas.train import loop

    run = tmp_path_factory.mktemp("digits-run")
    cfg = from_dict(TrainConfig, {"model": {"name": str(tiny_model_dir), "device": "cpu"}, "trace": "latents",
                            "latent_steps": 2, "batch_size": 4, "steps": 4, "checkpoint_every": 2, "eval_every": 2,
                            "lr": 5e-2, "lora": {"rank": 4, "dropout": 0.0},
                            "data": {"task": "relay:digits", "heldout_examples": 4}})
    loop.train(cfg, run)
    return run


def test_the_lens_curve_reads_each_checkpoint_as_the_run_stood_and_resumes_without_reading_again(
        tmp_path, digits_run, monkeypatch):
    from diffmas.backbone import load_backbone
    from diffmas.config import load_config
    from diffmas.errors import DiffMASError
    from diffmas.eval import lens_curve as curves

    task, out = get_task("relay:digits"), tmp_path / "curve.json"
    assert curves.chosen_steps(digits_run) == [2, 4] and curves.chosen_steps(digits_run, every=2) == [4]
    exported = []
    real_export = curves.export_checkpoint
    monkeypatch.setattr(curves, "export_checkpoint", lambda run, folder, step: exported.append(step) or
                        real_export(run, folder, step))
    curves.lens_curve(digits_run, task, out, [2], n=6, show_progress=False)
    curve = curves.lens_curve(digits_run, task, out, [2, 4], n=6, show_progress=False)
    assert exported == [2, 4]  # step 2 was kept from the first call, not read again
    # The same run by another spelling of its path is the same run.
    curves.lens_curve(digits_run.parent / ".." / digits_run.parent.name / digits_run.name, task, out, [2, 4], n=6,
                      show_progress=False)
    assert exported == [2, 4]
    assert [p["step"] for p in curve["points"]] == [2, 4]
    held = curves.heldout_losses(digits_run)
    assert [p["heldout_loss"] for p in curve["points"]] == [held[2], held[4]] and None not in held.values()
    # The last checkpoint read through its export is the finished run read directly, item by item.
    final = build_system("diffmas", load_backbone(load_config(digits_run / "config.yaml").model.name, "cpu"),
                         adapter=str(digits_run))
    lenses, answers = lens_channel(final, task, n=6, show_progress=False)
    assert curve["answers"] == answers
    assert [x["tokens"] for x in curve["points"][1]["positions"]] == [x.tokens for x in lenses]
    assert [x["tokens"] for x in curve["points"][0]["positions"]] != [x.tokens for x in lenses]  # step 2 is not 4
    assert curves.plot_lens_curve(curve, tmp_path / "curve.png").stat().st_size > 0
    with pytest.raises(DiffMASError, match="other settings"):
        curves.lens_curve(digits_run, task, out, [2], n=7, show_progress=False)
    with pytest.raises(DiffMASError, match=r"no checkpoint at step\(s\) \[3\]"):
        curves.chosen_steps(digits_run, steps=[3])


def test_the_cli_draws_the_lens_curve_and_names_a_missing_checkpoint(tmp_path, digits_run):
    out = tmp_path / "curve.json"
    cli = [sys.executable, "-m", "diffmas.cli", "lens-curve", str(digits_run), "--n", "4", "--out", str(out)]
    done = subprocess.run([*cli, "--every", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [p["step"] for p in json.loads(out.read_text())["points"]] == [4]
    assert out.with_suffix(".png").stat().st_size > 0 and "step 4: held-out" in done.stdout + done.stderr
    missing = subprocess.run([*cli, "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no checkpoint at step(s) [3]" in missing.stdout + missing.stderr


def _point(step: int, loss: float | None, *reads: dict[str, float]) -> dict:
    return {"step": step, "heldout_loss": loss,
            "positions": [{"writer": "reasoner", "position": i + 1, "read": read} for i, read in enumerate(reads)]}


def test_naming_steps_lists_where_each_position_reads_at_least_the_threshold():
    from diffmas.eval import lens_curve as curves

    curve = {"points": [_point(100, 0.9, {"1": 0.49}, {"1": 0.9, "2": 0.6}),  # unsorted on purpose
                        _point(50, 1.2, {"1": 0.1}, {"1": 0.5})]}
    assert curves.naming_steps(curve, "1") == {("reasoner", 1): [], ("reasoner", 2): [50, 100]}
    assert curves.naming_steps(curve, "2") == {("reasoner", 1): [], ("reasoner", 2): [100]}
    assert curves.naming_steps(curve, "1", at_least=0.4) == {("reasoner", 1): [100], ("reasoner", 2): [50, 100]}

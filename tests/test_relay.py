"""Relay, split and digits tasks, and the training options of a bottlenecked channel (anneal, autoencoding,
a budget set by the validation split's held-out loss)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from diffmas.adapters import read_adapter_meta
from diffmas.backbone import load_backbone
from diffmas.config import StopConfig, load_config
from diffmas.errors import DiffMASError
from diffmas.eval.results import constant_floor
from diffmas.decode import DecodeConfig
from diffmas.eval.runner import gold_target, run_eval
from diffmas.prompts import DUO, RELAY, SPLIT
from diffmas.systems import build_system
from diffmas.tasks import get_task
from diffmas.train.data import TrainExample, build_datasets
from diffmas.experiments.presets import train_once
from diffmas.train.loop import TrajectoryLoss, attach_trainable, heldout_loss, train
from diffmas.train.objectives import AUTOENCODE_INSTRUCTION, plan_step, reveal_at
from diffmas.train.resume import INHERITED, flattened
from diffmas.tasks.relay import split_expression


@pytest.mark.parametrize("expression, parts", [
    ("76 - 32 + 75 - 32", ("76 - 32", "+ 75 - 32")),
    ("0 - 2", ("0", "- 2")),
    ("4 + 5 - 6", ("4 + 5", "- 6")),
])
def test_split_expression_cuts_between_terms(expression, parts):
    assert split_expression(expression) == parts


def test_relay_and_split_tasks_keep_the_rg_items_and_name_their_topology():
    rg, relay, split = (get_task(n) for n in ("rg:chain_sum", "relay:chain_sum", "split:chain_sum"))
    items = rg.load(20)
    assert [e.question for e in relay.load(20)] == [e.question for e in items]  # same evaluation set
    assert (rg.topology, relay.topology, split.topology) == (None, "relay", "split")
    for ex in split.load(20):
        views = split.views(ex)
        first, rest = views["part:a"].split(": ", 1)[1], views["part:b"].split(": ", 1)[1]
        assert f"{first} {rest}" == ex.meta["expression"]  # the parts together are the whole expression
        assert ex.meta["expression"] not in views["none"]
    assert split.grade(items[3], f"Answer: {items[3].answer}").correct


def test_digits_task_ladder_items_and_grading():
    ladder = get_task("relay:digits")
    items = ladder.load(60)
    assert {e.meta["n_digits"] for e in items} == set(range(1, 7))
    assert all(len(e.answer) == e.meta["n_digits"] for e in items)
    assert all(e.id.startswith(f"digits{e.meta['n_digits']}-") for e in items)
    three = get_task("relay:digits3").load(10)
    assert all(len(e.answer) == 3 and e.answer[0] != "0" for e in three)
    ex = three[0]
    assert ladder.grade(ex, f"I think\nAnswer: {ex.answer}").correct
    assert not ladder.grade(ex, f"Answer: {ex.answer}1").correct
    assert not ladder.grade(ex, ex.answer).format_ok
    train = get_task("relay:digits3").training_examples(5, 0, "answer", set())
    assert train == get_task("relay:digits3").training_examples(5, 0, "answer", set())  # seeded
    assert all(t.target == f"Answer: {t.answer}" for t in train)
    with pytest.raises(DiffMASError):
        get_task("relay:digits9")
    with pytest.raises(DiffMASError, match="chain_sum only"):
        get_task("split:leg_counting")


def test_the_floor_is_the_best_constant_answer():
    task = get_task("relay:digits1")
    items = task.load(200)
    best = max(sum(e.answer == str(d) for e in items) for d in range(10))
    assert constant_floor(task, items) == best / 200
    assert constant_floor(get_task("humaneval"), items) is None


def test_training_data_carries_the_views():
    cfg = load_config(None, {"data.task": "split:chain_sum", "data.heldout_examples": 3})
    train_set, heldout = build_datasets(cfg, 4)
    assert {"question", "none", "part:a", "part:b"} <= set(train_set[0].prompt)
    evaluated = {e.question for e in get_task("split:chain_sum").load()}
    assert not any(ex.prompt["question"].split("\n")[0] in evaluated for ex in train_set + heldout)


def test_the_data_seed_draws_the_items_and_the_run_seed_keeps_the_rest():
    def items(**changes):
        cfg = load_config(None, {"data.task": "relay:digits", "data.heldout_examples": 3, **changes})
        return [[e.prompt["question"] for e in part] for part in build_datasets(cfg, 4)]

    assert items(seed=2, **{"data.seed": 0}) == items(seed=0)  # the items (training and held-out) are seed 0's
    assert items(seed=2) != items(seed=0) and items(seed=2, **{"data.seed": 2}) == items(seed=2)
    with pytest.raises(DiffMASError, match="data.seed"):
        load_config(None, {"data.seed": "zero"})


def test_autoencoding_steps_ask_the_reader_to_repeat_what_the_writers_saw():
    cfg = load_config(None, {"channel.autoencode_steps": 2, "steps": 10, "trace": "latents"})
    views = {"question": "Q: 3 + 4 =", "none": "Answer with a number.", "part:a": "3", "part:b": "+ 4"}
    examples = [TrainExample(views, "Answer: 7")]
    first = plan_step(cfg, 0, examples, RELAY)
    assert first.targets == ["Q: 3 + 4 ="] and first.prompts[0]["none"] == AUTOENCODE_INSTRUCTION
    assert plan_step(cfg, 1, examples, SPLIT).targets == ["3\n\n+ 4"]
    later = plan_step(cfg, 2, examples, RELAY)
    assert later.targets == ["Answer: 7"] and later.prompts[0]["none"] == "Answer with a number."
    with pytest.raises(DiffMASError, match="sees: none"):
        plan_step(cfg, 0, examples, DUO)


def test_the_bottleneck_anneals_visibility_from_one_to_zero():
    cfg = load_config(None, {"channel.anneal": 0.5, "steps": 10, "trace": "latents"})
    assert [reveal_at(s, cfg) for s in (0, 1, 4, 5, 9)] == pytest.approx([1.0, 0.8, 0.2, 0.0, 0.0])
    assert reveal_at(0, load_config(None, {"steps": 10})) == 0.0
    plan = plan_step(cfg, 1, [TrainExample("Q", "Answer: 1")], RELAY)
    assert plan.reveal == pytest.approx(0.8) and plan.reveal_seed == 1  # seeded per step: a resume replays it


def test_flattened_stops_when_the_window_improves_by_less_than_the_tolerance():
    stop = StopConfig(enabled=True, min_steps=40, window=0.25, tolerance=0.01)
    falling = [(s, 1.0 - s / 100) for s in range(0, 50, 10)]
    assert not flattened(falling, stop)
    flat = [(0, 2.0), (10, 1.0), (20, 0.9), (30, 0.899), (40, 0.898)]
    assert flattened(flat, stop)  # window (30, 40]: 0.899 -> best 0.898, -0.1%
    assert not flattened(flat[:-1], stop)  # fewer than min_steps
    assert not flattened(flat, StopConfig(enabled=False, min_steps=40, window=0.25))
    rising = [(0, 2.0), (10, 1.0), (20, 0.9), (30, 0.95), (40, 1.0)]
    assert flattened(rising, stop)  # getting worse is not improving


def test_the_heldout_loss_is_a_token_mean_over_all_items_whatever_the_batch(tiny_model_dir):
    # The stopping rule compares a run's held-out losses with each other and a study's runs with one another: the
    # loss must not depend on how the items are batched (answers of 1-6 digits: uneven token counts per batch).
    cfg = load_config(None, {"model.name": str(tiny_model_dir), "model.device": "cpu", "data.task": "relay:digits",
                             "data.heldout_examples": 5, "latent_steps": 2, "trace": "latents"})
    _, heldout = build_datasets(cfg, 2)
    assert len({len(ex.target) for ex in heldout}) > 1
    backbone = load_backbone(cfg.model.name, "cpu", cfg.model.dtype)
    module = TrajectoryLoss(backbone, attach_trainable(backbone, cfg), cfg)
    one, two, five = (heldout_loss(module, heldout, batch, cfg) for batch in (1, 2, 5))
    assert two == pytest.approx(one, rel=1e-6) and five == pytest.approx(one, rel=1e-6)  # float32 rounding

def test_channel_options_need_a_bottleneck_and_a_reader_that_sees_nothing(tmp_path):
    with pytest.raises(DiffMASError, match="trace 'latents'"):
        train(load_config(None, {"channel.anneal": 0.5, "topology": "relay", "steps": 2}), tmp_path / "a")
    with pytest.raises(DiffMASError, match="sees: none"):
        train(load_config(None, {"channel.autoencode_steps": 1, "topology": "duo", "steps": 2}), tmp_path / "b")
    with pytest.raises(DiffMASError, match="eval_every"):
        load_config(None, {"stop.enabled": True})
    with pytest.raises(DiffMASError, match="system must be diffmas"):
        load_config(None, {"system": "single_sft", "channel.anneal": 0.5})


def test_relay_training_stops_when_flat_and_a_resume_does_not_continue(tmp_path, tiny_model_dir):
    cfg = {"model": {"name": str(tiny_model_dir), "device": "cpu"}, "task": None, "latent_steps": 2,
           "batch_size": 2, "steps": 40, "eval_every": 2, "checkpoint_every": 50, "lr": 5e-3, "trace": "latents",
           "lora": {"rank": 4, "dropout": 0.0}, "channel": {"anneal": 0.2, "autoencode_steps": 2},
           "stop": {"enabled": True, "min_steps": 4, "window": 0.5, "tolerance": 0.5},
           "data": {"task": "relay:digits2", "heldout_examples": 4}}
    del cfg["task"]
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = train(load_config(path), tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] < 40 and metrics[-1].get("stopped_early") and metrics[-1]["step"] == summary["steps"]
    heldout = [m for m in metrics if "heldout_loss" in m]  # timed apart from the training step (the study's cost)
    assert heldout[0]["step"] == 0 and all(m["heldout_seconds"] > 0 for m in heldout)
    meta = read_adapter_meta(tmp_path / "run")
    assert (meta["topology"], meta["trace"], meta["steps"]) == ("relay", "latents", summary["steps"])
    again = train(load_config(path), tmp_path / "run", resume=True)
    assert again["steps"] == summary["steps"]
    assert len(Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(metrics)


def _relay_run(tiny_model_dir, **changes):
    return load_config(None, {"model.name": str(tiny_model_dir), "model.device": "cpu", "latent_steps": 2,
                              "batch_size": 2, "steps": 10, "eval_every": 2, "checkpoint_every": 50, "lr": 5e-3,
                              "trace": "latents", "lora.rank": 4, "lora.dropout": 0.0, "stop.enabled": True,
                              "stop.min_steps": 4, "stop.window": 0.5, "stop.tolerance": 0.5,
                              "data.task": "relay:digits2", "data.heldout_examples": 4, **changes})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_stopped_early_goes_on_under_a_looser_rule_as_if_trained_so_from_the_start(tmp_path, tiny_model_dir):
    short = tmp_path / "short"
    stopped = train(_relay_run(tiny_model_dir), short)["steps"]
    assert stopped < 10 and _metrics(short)[-1].get("stopped_early")
    full = _relay_run(tiny_model_dir, **{"stop.min_steps": 10})
    train(full, tmp_path / "direct")
    direct = {m["step"]: m for m in _metrics(tmp_path / "direct")}
    # In a new folder: the stopped run's checkpoint and curve are taken over, only the remaining steps are trained.
    with pytest.raises(DiffMASError, match=r"differ in \['lr'\]"):
        train_once(_relay_run(tiny_model_dir, **{"stop.min_steps": 10, "lr": 1e-3}), tmp_path / "other",
                   continue_from=short)
    assert not (tmp_path / "other").exists()
    train_once(full, tmp_path / "continued", continue_from=short)
    continued = _metrics(tmp_path / "continued")
    assert [m["step"] for m in continued if INHERITED in m] == list(range(stopped + 1))
    assert [m["step"] for m in continued if INHERITED not in m] == list(range(stopped + 1, 11))
    assert not any(m.get("stopped_early") for m in continued)
    for m in continued:
        for key in ("loss", "grad_norm", "heldout_loss"):
            assert (key in m) == (key in direct[m["step"]])
            assert m.get(key, 0) == pytest.approx(direct[m["step"]].get(key, 0), rel=1e-5)
    # In its own folder (--resume): the same, and the old rule's stop mark goes.
    train(full, short, resume=True)
    assert [m["step"] for m in _metrics(short)] == list(range(11)) and not _metrics(short)[stopped].get("stopped_early")
    assert _metrics(short)[-1]["heldout_loss"] == pytest.approx(direct[10]["heldout_loss"], rel=1e-5)


def test_text_sft_is_text_mas_on_a_borrowed_single_sft_adapter(tmp_path, tiny_model_dir):
    sft = tmp_path / "sft"
    train(load_config(None, {"system": "single_sft", "model.name": str(tiny_model_dir), "model.device": "cpu",
                             "steps": 2, "batch_size": 2, "lr": 5e-2, "lora.rank": 4, "lora.dropout": 0.0,
                             "checkpoint_every": 50, "data.task": "relay:digits1"}), sft)
    with pytest.raises(DiffMASError, match="train --system single_sft"):
        build_system("text_sft", None)
    other = tmp_path / "other"
    shutil.copytree(sft, other)
    meta = json.loads((other / "diffmas_adapters.json").read_text())
    (other / "diffmas_adapters.json").write_text(json.dumps({**meta, "system": "diffmas"}))
    with pytest.raises(DiffMASError, match="not 'single_sft'"):
        build_system("text_sft", None, adapter=str(other))
    # The adapter's own settings (one agent, topology 'single') are not borrowed: the task's topology is used.
    assert build_system("text_sft", None, adapter=str(sft), default_topology="relay").spec.topology.name == "relay"
    results = run_eval(["text_mas", f"sft=text_sft:{sft}"], ["relay:digits1"], tmp_path / "eval",
                       model=str(tiny_model_dir), limit=3, max_new_tokens=2, writer_max_new_tokens=2,
                       trace="latents", device="cpu")
    settings = {s["label"]: s["settings"] for s in results["config"]["systems"]}
    assert settings["sft"]["topology"] == "relay" and settings["sft"]["writer_mode"] == "text"
    assert settings["sft"]["trace"] == "latents"
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    nll = {(s["system"], s["id"]): s["gold_nll_sum"] for s in samples}
    ids = {s["id"] for s in samples}
    assert len(ids) == 3 and all(nll[("sft", i)] != nll[("text_mas", i)] for i in ids)  # the adapter is on


def test_a_shuffled_part_swaps_only_the_writer_that_sees_it(tmp_path, tiny_model_dir):
    with pytest.raises(DiffMASError, match="no parts"):
        run_eval(["latent_mas"], ["relay:chain_sum"], tmp_path / "bad", model=str(tiny_model_dir), limit=2,
                 device="cpu", show_progress=False, shuffle_part="part:b")
    results = run_eval(["latent_mas"], ["split:chain_sum"], tmp_path / "eval", model=str(tiny_model_dir), limit=4,
                       max_new_tokens=2, latent_steps=1, trace="latents", device="cpu", show_progress=False,
                       shuffle_part="part:b")
    assert results["config"]["shuffle_part"] == "part:b"
    samples = {s["id"]: s for s in map(json.loads, (tmp_path / "eval" / "samples.jsonl").read_text().splitlines())}
    task = get_task("split:chain_sum")
    examples = {ex.id: ex for ex in task.load(4)}
    views = {item: task.views(ex) for item, ex in examples.items()}
    system = build_system("latent_mas", load_backbone(str(tiny_model_dir), "cpu"), latent_steps=1, trace="latents",
                          default_topology="split")
    cfg = DecodeConfig(max_new_tokens=2)
    for item, s in samples.items():
        partner = views[s["trace_from"]]
        assert s["trace_from"] != item

        def nll(writers: dict) -> float:
            return system.run([views[item]], cfg, writer_prompts=[writers],
                              targets=[gold_target(examples[item])])[0]["gold_nll_sum"]

        # Writer a worked on its own part, writer b on the partner's: neither the unshuffled nor the fully
        # shuffled trace gives this gold NLL. (fp32: batch 4 vs 1 moves it by <= 1e-5; the random model's
        # latents move it by >= 1e-4.)
        swapped, own, other = nll({**views[item], "part:b": partner["part:b"]}), nll(views[item]), nll(partner)
        assert s["gold_nll_sum"] == pytest.approx(swapped, abs=2e-5)
        assert abs(s["gold_nll_sum"] - own) > 5e-5 and abs(s["gold_nll_sum"] - other) > 5e-5

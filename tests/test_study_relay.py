"""The relay study's machinery: its arms share one budget, each arm is what its name says, and one trained arm, one
text arm and the report run end to end on a tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from diffmas.config import to_dict
from diffmas.experiments import relay, relay_arm, relay_capacity, relay_report
from diffmas.experiments.relay import Arm, RelayConfig, arm_settings, continued_from, plan_arms, run_study
from diffmas.experiments.relay_arm import train_config
from diffmas.experiments.relay_answers import Rung, digit_places, ladder, sum_closeness, thought_places
from diffmas.experiments.relay_report import _hours_line, _seconds, write_report
from diffmas.tasks import get_task
from diffmas.train.checkpoint import checkpoints
from diffmas.train.resume import INHERITED
from diffmas.prompts import load_topology


def test_arms_share_one_budget_and_differ_only_where_named():
    cfg = RelayConfig()
    arms = plan_arms()
    assert len({a.id for a in arms}) == len(arms)
    assert [a.name for a in arms[:4]] == ["coupled", "open", "coupled", "blind"]  # the decisive ones first
    trained = {a.id: train_config(a, cfg) for a in arms if arm_settings(a.name, cfg)[0] != "text_mas"}
    assert len({(c.batch_size, c.lr, c.steps, c.stop.min_steps, c.data.heldout_examples)
                for i, c in trained.items() if "coupled_long" not in i and "_full" not in i}) == 1
    assert all(c.stop.enabled and c.eval_every for c in trained.values())
    # fp32 everywhere: 'auto' would train under bf16 autocast on a CPU with native bf16 and in fp32 elsewhere.
    assert {c.mixed_precision for c in trained.values()} == {"no"}
    chain = {a.name: trained[a.id] for a in arms if a.task == relay.CHAIN and a.seed == 0 and a.id in trained}
    assert chain["open"].trace == "keep" and chain["coupled"].trace == "latents"
    assert chain["detached"].grad_mode == "detached" and chain["pause"].latent_map == "pause"
    for name in ("detached", "pause"):  # the controls change one thing against coupled
        assert chain[name].channel == chain["coupled"].channel and chain[name].trace == "latents"
    assert chain["coupled_ae"].channel.autoencode_steps > 0 and chain["coupled_anneal"].channel.anneal > 0
    assert chain["blind"].latent_steps == 0 and chain["skyline"].system == "single_sft"
    long = trained[Arm("coupled_long", relay.DIGITS, phase=2).id]
    assert long.steps == 3 * cfg.max_steps and long.stop.enabled and long.trace == "latents"
    digits = {a.name: trained[a.id] for a in arms if a.task == relay.DIGITS and a.phase == 1}
    assert digits["detached"].grad_mode == "detached" and digits["pause"].latent_map == "pause"
    assert digits["coupled"].grad_mode == "coupled" and digits["coupled"].latent_map != "pause"
    frozen = trained[Arm("frozen", relay.DIGITS).id]  # only the reader trains: the writer has its own, detached adapter
    assert frozen.grad_mode == "detached" and frozen.lora.layout == "per-agent"
    assert digits["coupled"].lora.layout == "shared"
    assert frozen.channel == digits["coupled"].channel and frozen.trace == "latents"
    sweep = [(a.name, trained[a.id]) for a in arms if a.phase == 4]
    assert sorted({c.latent_steps for _, c in sweep}) == list(relay.SWEEP)
    # The ladder runs under the recipe that read the digits (the curriculum), coupled and pause alike.
    assert {n for n, _ in sweep} == {"coupled_anneal", "pause_anneal", "kvonly_anneal", "gated_anneal"}
    kvonly, gated, coupled_m1 = (trained[Arm(n, relay.DIGITS, latent_steps=1).id]
                                 for n in ("kvonly_anneal", "gated_anneal", "coupled_anneal"))
    assert kvonly.grad_mode == "kv_only" and coupled_m1.grad_mode == "coupled" == gated.grad_mode
    assert (kvonly.channel, kvonly.latent_map, kvonly.trace, kvonly.latent_steps) == \
        (coupled_m1.channel, coupled_m1.latent_map, coupled_m1.trace, coupled_m1.latent_steps)
    assert (gated.latent_map, gated.channel, gated.trace) == ("gated", coupled_m1.channel, coupled_m1.trace)
    assert all(c.channel.anneal > 0 for _, c in sweep)
    frozen_anneal = trained[Arm("frozen_anneal", relay.DIGITS).id]
    assert frozen_anneal.lora.layout == "per-agent" and frozen_anneal.channel.anneal > 0
    for half in ("half_a", "half_b"):
        topology = load_topology(train_config(Arm(half, relay.SPLIT), cfg).topology)
        assert len(topology.writers) == 1 and topology.final.sees == "none"
    seeds = {(a.name, a.task) for a in arms if a.seed > 0}  # where the claims are
    assert seeds == {(n, relay.DIGITS) for n in ("coupled", "detached", "pause", "coupled_anneal", "detached_anneal",
                                                 "pause_anneal", "gated_anneal", "pause_anneal_data0")} | \
        {("open", relay.CHAIN)}
    # The data-seed probes (plan change 20): pause at m = 1 with its items drawn by the other seed, nothing else moved.
    for seed, data in ((0, 2), (2, 0)):
        probe = trained[Arm(f"pause_anneal_data{data}", relay.DIGITS, seed, latent_steps=1).id]
        same = train_config(Arm("pause_anneal", relay.DIGITS, seed, latent_steps=1), cfg)
        assert (probe.seed, probe.data.seed) == (seed, data) and same.data.seed is None
        assert replace(probe, data=same.data) == same
    on_sums = trained[Arm("gated_anneal", relay.CHAIN).id]  # the sums' curriculum with the gated map
    coupled_sums = trained[Arm("coupled_anneal", relay.CHAIN).id]
    assert (on_sums.latent_map, on_sums.grad_mode, on_sums.channel) == ("gated", "coupled", coupled_sums.channel)


def test_the_split_task_waits_until_a_latent_channel_passes_a_sum(tmp_path):
    (tmp_path / "arms").mkdir()
    arm = tmp_path / "arms" / f"{Arm('coupled', relay.CHAIN).id}.json"
    arm.write_text(json.dumps({"accuracy": 0.026, "stderr": 0.007, "floor": 0.032}))  # the measured null
    assert not any(a.task == relay.SPLIT for a in plan_arms(tmp_path))
    # No plain-recipe controls of a channel that passed nothing (planned while plain coupled's result is unknown).
    planned = {a.id for a in plan_arms(tmp_path)}
    assert not {Arm(n, relay.CHAIN).id for n in ("detached", "pause")} & planned
    assert {Arm(n, relay.CHAIN).id for n in ("detached", "pause")} <= {a.id for a in plan_arms()}
    anneal = tmp_path / "arms" / f"{Arm('coupled_anneal', relay.CHAIN).id}.json"
    anneal.write_text(json.dumps({"accuracy": 0.05, "stderr": 0.01, "floor": 0.032}))  # inside two stderr
    assert not any(a.task == relay.SPLIT for a in plan_arms(tmp_path))
    anneal.write_text(json.dumps({"accuracy": 0.08, "stderr": 0.012, "floor": 0.032}))
    # They train under the recipe that crossed (the curriculum here), the split task right after the curriculum.
    arms = plan_arms(tmp_path)
    assert {a.name for a in arms if a.task == relay.SPLIT} == {"coupled_anneal", "half_a_anneal", "half_b_anneal"}
    assert {(a.name, a.seed) for a in arms if a.task == relay.CHAIN and a.phase == 5} == {
        (n, s) for n in ("detached_anneal", "pause_anneal") for s in (0, 1, 2)} | {("coupled_anneal", 1),
                                                                                  ("coupled_anneal", 2)}
    ids = [a.id for a in arms]
    assert len(set(ids)) == len(ids)
    assert ids.index(Arm("coupled_anneal", relay.SPLIT).id) < ids.index(Arm("coupled_long", relay.DIGITS).id)
    # The sums' seeds under that recipe go before the plain recipe's remaining seeds on the digits (plan change 17).
    assert ids.index(Arm("pause_anneal", relay.CHAIN, 2).id) < ids.index(Arm("pause", relay.DIGITS, 1).id)
    cfg = RelayConfig()
    for name in ("pause", "detached", "half_a"):  # a recipe suffix changes the recipe and nothing else
        task = relay.SPLIT if name.startswith("half") else relay.CHAIN
        plain, cured = (to_dict(train_config(Arm(n, task), cfg)) for n in (name, f"{name}_anneal"))
        assert cured["channel"].pop("anneal") == 0.3 and plain["channel"].pop("anneal") == 0 and plain == cured
    # Where plain coupled crosses, its controls (planned among the sums' controls) move up, planned once.
    anneal.unlink()
    arm.write_text(json.dumps({"accuracy": 0.08, "stderr": 0.012, "floor": 0.032}))
    arms = plan_arms(tmp_path)
    ids = [a.id for a in arms]
    assert len(set(ids)) == len(ids) and {a.name for a in arms if a.task == relay.SPLIT} == {"coupled", "half_a", "half_b"}
    assert ids.index(Arm("detached", relay.CHAIN).id) < ids.index(Arm("coupled_long", relay.DIGITS).id)


def test_only_trained_latents_only_channels_on_the_digits_are_probed():
    cfg = RelayConfig()
    assert relay_arm.probed(Arm("coupled_anneal", relay.DIGITS, latent_steps=2), cfg)
    assert relay_arm.probed(Arm("pause", relay.DIGITS), cfg) and relay_arm.probed(Arm("frozen_full", relay.DIGITS), cfg)
    for arm in (Arm("blind", relay.DIGITS), Arm("text_m", relay.DIGITS), Arm("skyline", relay.DIGITS),
                Arm("coupled", relay.CHAIN)):
        assert not relay_arm.probed(arm, cfg), arm
    assert not relay_arm.probed(Arm("coupled", relay.DIGITS), RelayConfig(probe_items=0))


def test_the_thoughts_are_shuffled_only_where_a_writer_feeds_its_states_back():
    cfg = RelayConfig()
    for arm in (Arm("coupled_anneal", relay.DIGITS, latent_steps=1), Arm("gated_anneal", relay.CHAIN),
                Arm("detached_anneal_full", relay.DIGITS), Arm("kvonly_anneal", relay.DIGITS, latent_steps=1)):
        assert relay_arm.thinks(arm, cfg), arm
    for arm in (Arm("pause_anneal", relay.DIGITS, latent_steps=1), Arm("blind", relay.CHAIN),
                Arm("open", relay.CHAIN), Arm("text_m", relay.DIGITS), Arm("skyline", relay.DIGITS)):
        assert not relay_arm.thinks(arm, cfg), arm


def test_ladder_reads_the_number_of_digits_from_item_ids():
    outcomes = {0: {"digits1-5": True, "digits1-6": False, "digits3-7": True}, 1: {"digits1-5": True}}
    rungs = ladder(outcomes)
    assert {k: (r.correct, r.n) for k, r in rungs.items()} == {1: (2, 3), 3: (1, 1)}
    assert rungs[3].bits == math.log2(900)  # every 3-digit number repeated: all of its information


def test_thought_places_count_each_place_where_the_two_numbers_differ():
    samples = [{"extracted": "1299", "gold": "1234", "thought_gold": "5299"},  # 1 own, 2 equal, 3-4 thought's
               {"extracted": "58", "gold": "58", "thought_gold": "17"},        # both places own
               {"extracted": None, "gold": "7", "thought_gold": "30"}]         # no answer: neither
    places = thought_places(samples)
    assert places == {1: (0.0, 2 / 3, 3), 2: (0.0, 1.0, 1), 3: (1.0, 0.0, 1), 4: (1.0, 0.0, 1)}


def test_digit_places_count_the_length_and_each_digit_against_the_regenerated_number():
    task = get_task("relay:digits")
    three = next(f"digits3-{seed}" for seed in range(100) if task.item(seed).meta["n_digits"] == 3)
    gold = task.item(int(three.split("-")[1])).answer
    wrong_second = gold[0] + str((int(gold[1]) + 1) % 10) + gold[2]
    places = digit_places([(three, gold), (three, wrong_second), (three, gold[0]), (three, None)])
    assert places["length"] == (2, 4)
    assert places["1"] == (3, 4) and places["2"] == (1, 4) and places["3"] == (2, 4)
    assert "4" not in places


def test_fano_bits_are_zero_at_chance_and_grow_with_accuracy():
    assert Rung(1, 10, 100).bits == 0.0  # 1 in 10: what guessing gets
    assert Rung(1, 100, 100).bits == math.log2(10)
    assert 0 < Rung(1, 50, 100).bits < Rung(1, 90, 100).bits < math.log2(10)
    # 50% right, the errors spread over the other 9 digits: I = log2 10 - 1 - 0.5 log2 9 (the bound is tight)
    assert abs(Rung(1, 50, 100).bits - (math.log2(10) - 1 - 0.5 * math.log2(9))) < 1e-12


def test_a_trained_arm_a_text_arm_and_the_report_end_to_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    arms = [Arm("coupled", "relay:digits"), Arm("text_m", relay.CHAIN), Arm("gated_anneal", relay.CHAIN)]
    monkeypatch.setattr(relay, "plan_arms", lambda docs=None: arms)
    cfg = RelayConfig(latent_steps=2, min_steps=2, max_steps=4, batch_size=2, heldout=4, eval_every=2, n_eval=6,
                      max_new_tokens=3, eval_batch_size=6, model=str(tiny_model_dir), autoencode_steps=1,
                      probe_items=60, lens_items=6, lens_every=1)
    docs = tmp_path / "docs"
    run_study(tmp_path / "out", docs, cfg)
    coupled = json.loads((docs / "arms" / f"{arms[0].id}.json").read_text())
    assert coupled["n"] == 6 and coupled["positions_passed"] == 2 and 0 < coupled["steps_trained"] <= 4
    assert coupled["config"]["trace"] == "latents" and coupled["config"]["stop"]["enabled"]
    assert coupled["mixed_precision"] == "no"  # fp32 on any machine, as resolved where it trained
    assert coupled["kv_bytes_passed"] == 2 * (2 * 2 * 2 * 16 * 4)  # positions x (K+V x layers x heads x dim x fp32)
    text = json.loads((docs / "arms" / f"{arms[1].id}.json").read_text())
    assert text["steps_trained"] == 0 and text["positions_passed"] <= 2  # the message alone, at most m tokens
    kept = {a.id: [json.loads(line) for line in (docs / "samples" / f"{a.id}.jsonl").read_text().splitlines()]
            for a in arms}
    # The gated arm's test items again with its gate closed: a copy of its adapter whose gate is 0 (the run's moved).
    from diffmas.latent import MAP_FILE
    from safetensors.torch import load_file

    gated = json.loads((docs / "arms" / f"{arms[2].id}.json").read_text())
    closed = [json.loads(line) for line in (docs / "gate-closed" / f"{arms[2].id}.jsonl").read_text().splitlines()]
    assert gated["gate_closed"]["n"] == 6 and [s["id"] for s in closed] == [s["id"] for s in kept[arms[2].id]]
    assert gated["gate_closed"]["accuracy"] == sum(s["correct"] for s in closed) / 6
    assert load_file(str(tmp_path / "out" / "runs" / arms[2].id / MAP_FILE))["gate"].item() != 0
    copy = tmp_path / "out" / "eval" / f"{arms[2].id}--gate-closed" / "adapter"
    assert load_file(str(copy / MAP_FILE))["gate"].item() == 0 and not (copy / "checkpoints").exists()
    assert not (docs / "gate-closed" / f"{arms[0].id}.jsonl").exists()  # only gated arms'
    assert f"| {arms[2].id} | 6 | " in (docs / "README.md").read_text()
    # Each arm whose writer feeds back thoughts is evaluated again with them shuffled (the text arm has none).
    for arm in (arms[0], arms[2]):
        path = docs / "shuffled-thought" / f"{arm.id}.jsonl"
        shuffled = [json.loads(line) for line in path.read_text().splitlines()]
        record = json.loads((docs / "arms" / f"{arm.id}.json").read_text())
        assert record["shuffled_thought"]["n"] == 6
        assert sorted(s["id"] for s in shuffled) == sorted(s["id"] for s in kept[arm.id])
        assert all(s["thought_from"] != s["id"] for s in shuffled)
        assert sorted(s["thought_gold"] for s in shuffled) == sorted(s["gold"] for s in shuffled)  # a derangement
    assert not (docs / "shuffled-thought" / f"{arms[1].id}.jsonl").exists() and "shuffled_thought" not in text
    report = (docs / "README.md").read_text()
    assert "| run | n | accuracy as trained | thoughts shuffled |" in report
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.count(" | ") == 6}
    assert " 1: " in rows[arms[0].id] and rows[arms[2].id].endswith("| – |")  # places on the digits only
    assert all(len(s["messages"]) == 1 for s in kept[arms[1].id])  # what crossed the text channel is kept
    assert not any("messages" in s for s in kept[arms[0].id])
    results = json.loads((docs / "results.json").read_text())
    assert set(results["by_arm"]) == {"relay:digits", relay.CHAIN}
    readme = (docs / "README.md").read_text()
    assert "## Goals" in readme and "k = 1" in readme and (docs / "capacity.png").is_file()
    assert "bits (per position)" in readme and "(n=" in readme  # the ladder, with n per k
    assert "place by place" in readme and "| digit 1 |" in readme
    # The trained digits arm's channel was probed (what it holds, beside what its reader repeated); the text arm not.
    probe = json.loads((docs / "probes" / f"{arms[0].id}.json").read_text())
    assert probe["settings"]["latent_steps"] == 2 and probe["labels"]["length"]["n_scored"] == 20
    assert sorted(p.stem for p in (docs / "probes").iterdir()) == [arms[0].id]
    # ... and its logit lens read at each of its checkpoints, beside the held-out loss there.
    lens = json.loads((docs / "lens" / "curves" / f"{arms[0].id}.json").read_text())
    steps = [p["step"] for p in lens["points"]]
    assert steps == [int(c.name.removeprefix("step-")) for c in checkpoints(tmp_path / "out" / "runs" / arms[0].id)]
    assert steps[-1] == coupled["steps_trained"] and lens["points"][-1]["heldout_loss"] == coupled["heldout_loss_end"]
    assert (docs / "lens" / "curves" / f"{arms[0].id}.png").is_file()
    assert sorted(p.name for p in (docs / "lens" / "curves").iterdir()) == [f"{arms[0].id}.json", f"{arms[0].id}.png"]
    # The report rebuilt from the same files is the same (before the probe below runs again and times itself anew).
    again = write_report(docs, n_boot=200)
    assert again["by_arm"] == results["by_arm"]
    # A curve of other settings at that path is reported, and neither replaced nor fatal to the arm's record.
    other = {**lens, "settings": {**lens["settings"], "n": 7}}
    (docs / "lens" / "curves" / f"{arms[0].id}.json").write_text(json.dumps(other))
    relay_arm.probe_arm(arms[0], tmp_path / "out" / "runs" / arms[0].id, cfg, docs, "cpu")
    assert "no lens curve" in capsys.readouterr().out
    assert json.loads((docs / "lens" / "curves" / f"{arms[0].id}.json").read_text()) == other
    assert f"| {arms[0].id} | 2 | 60 | " in readme
    assert "When the latent inputs named a digit" in readme and f"[plot](lens/curves/{arms[0].id}.png) |" in readme
    # An evaluation resumed by a later process: eval_seconds counts the samples an earlier process evaluated too.
    evaluated = tmp_path / "out" / "eval" / arms[1].id / "samples.jsonl"
    rows = [{**json.loads(line), "seconds": 10.0} for line in evaluated.read_text().splitlines()]
    evaluated.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert relay_arm.run_arm(arms[1], cfg, tmp_path / "out", docs)["eval_seconds"] == 60


@pytest.mark.parametrize("task", [relay.DIGITS, relay.CHAIN])
def test_trained_text_arms_are_planned_once_their_tasks_skyline_has_finished(tmp_path, task):
    assert not any(a.name.startswith("text_sft") for a in plan_arms(tmp_path))
    (tmp_path / "arms").mkdir()
    (tmp_path / "arms" / f"{Arm('skyline', task).id}.json").write_text("{}")
    ids = [a.id for a in plan_arms(tmp_path)]
    assert {a for a in ids if "text_sft" in a} == {Arm(n, task).id for n in ("text_sft_m", "text_sft_4m")}
    assert ids.index(Arm("text_sft_m", task).id) > ids.index(Arm("skyline", task).id)
    assert arm_settings("text_sft_m", RelayConfig())[0] == "text_sft"


def test_latent_meets_text_on_the_digits_before_the_sums_curriculum():
    ids = [a.id for a in plan_arms()]
    text = [ids.index(Arm(n, relay.DIGITS).id) for n in ("text_m", "text_4m", "skyline")]
    assert max(text) < ids.index(Arm("coupled_anneal", relay.CHAIN).id)


def test_the_digits_report_pairs_latent_with_text_counts_bits_per_text_token_and_what_crossed(tmp_path):
    for sub in ("arms", "samples"):
        (tmp_path / sub).mkdir()
    task = get_task(relay.DIGITS)
    ones = [seed for seed in range(200) if task.item(seed).meta["n_digits"] == 1][:20]
    # coupled repeats every 1-digit number through m = 6 positions; the text arm does so through 20 tokens on average
    for name, system, positions in (("coupled", "diffmas", 6.0), ("text_4m", "text_mas", 20.0)):
        rec = {"task": relay.DIGITS, "label": f"{name}/s0", "seed": 0, "accuracy": 1.0, "stderr": 0.0, "floor": 0.1,
               "positions_passed": positions, "kv_bytes_passed": 1.0, "steps_trained": 0, "stopped_early": False,
               "eval_seconds": 1, "latent_steps": 6, "system": system, "machine": "test"}
        (tmp_path / "arms" / f"relay_digits--{name}--s0.json").write_text(json.dumps(rec))
        # the text writer's message holds the number in every other item (the rest say a longer number with it)
        messages = {s: [f"The number {task.item(s).answer}" if i % 2 else f"The number {task.item(s).answer}7"]
                    for i, s in enumerate(ones)}
        (tmp_path / "samples" / f"relay_digits--{name}--s0.jsonl").write_text("".join(json.dumps(
            {"id": f"digits1-{s}", "correct": True, "extracted": task.item(s).answer,
             **({"messages": messages[s]} if system == "text_mas" else {})}) + "\n" for s in ones))
    results = write_report(tmp_path, n_boot=100)
    assert [(c["arm"], c["baseline"]) for c in results["comparisons"][relay.DIGITS]] == [("coupled", "text_4m")]
    readme = (tmp_path / "README.md").read_text()
    bits = math.log2(10)
    assert f"| coupled | 1.00 ± 0.00 (n=20) | {bits:.1f} ({bits / 6:.2f}) |" in readme
    assert f"| text_4m | 1.00 ± 0.00 (n=20) | {bits:.1f} ({bits / 20:.2f}) |" in readme
    assert "| text_4m | 0.50 (10/20) | 1.00 (10/10) |" in readme and "| coupled | 0." not in readme.split(
        "What crossed the text channels")[1]  # only text arms have messages


def test_core_hours_count_every_process_that_trained_an_arm_and_its_heldout_evaluations(tmp_path):
    # The arm's own train_seconds (5) holds only the process that finished it; its curve holds every step.
    rec = {"task": relay.DIGITS, "label": "coupled/s0", "seed": 0, "train_seconds": 5}
    (tmp_path / "curves").mkdir()
    curve = tmp_path / "curves" / "relay_digits--coupled--s0.jsonl"
    lines = [{"step": 0, "heldout_loss": 1.0}] + [{"step": i, "loss": 1.0, "seconds": 10.0} for i in (1, 2, 3)]
    curve.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _seconds(rec, tmp_path) == (30.0, None)  # a curve from before held-out evaluations were timed
    assert _seconds({**rec, "label": "text_m/s0"}, tmp_path) == (0.0, None)  # text arms have no curve
    assert "not counted before." in _hours_line(0.0, [rec], tmp_path)
    # Steps a continued run copied from another are that run's time, counted there.
    lines += [{"step": 4, "loss": 1.0, "seconds": 10.0, INHERITED: "relay_digits--coupled--s0"}]
    curve.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _seconds(rec, tmp_path) == (30.0, None)
    lines[3]["heldout_loss"], lines[3]["heldout_seconds"] = 1.0, 4.0
    curve.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _seconds(rec, tmp_path) == (30.0, None)  # not every held-out evaluation timed: none counted
    lines[0]["heldout_seconds"] = 2.0
    curve.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _seconds(rec, tmp_path) == (30.0, 6.0)
    assert "held-out" in _hours_line(0.0, [rec], tmp_path) and "not counted" not in _hours_line(0.0, [rec], tmp_path)
    other = {**rec, "label": "pause/s0"}
    (tmp_path / "curves" / "relay_digits--pause--s0.jsonl").write_text(json.dumps({"step": 1, "seconds": 5.0}))
    assert "Where timed (1 of 2 runs) they added 20%" in _hours_line(0.0, [rec, other], tmp_path)
    # The probe of an arm's channel (docs/probes) is its cost too.
    assert relay_report._core_seconds({**rec, "eval_seconds": 7}, tmp_path) == 30.0 + 6.0 + 7
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "relay_digits--coupled--s0.json").write_text(json.dumps({"settings": {"seconds": 11}}))
    assert relay_report._core_seconds({**rec, "eval_seconds": 7}, tmp_path) == 30.0 + 6.0 + 7 + 11
    # So is its lens curve (docs/lens/curves), point by point.
    (tmp_path / "lens" / "curves").mkdir(parents=True)
    (tmp_path / "lens" / "curves" / "relay_digits--coupled--s0.json").write_text(
        json.dumps({"points": [{"step": 2, "seconds": 3}, {"step": 4, "seconds": 4}]}))
    assert relay_report._core_seconds({**rec, "eval_seconds": 7}, tmp_path) == 30.0 + 6.0 + 7 + 11 + 7



def test_a_control_run_to_the_cap_continues_its_stopped_run(tmp_path):
    cfg = RelayConfig()
    for name in ("pause", "detached"):
        full, stopped = Arm(f"{name}_full", relay.DIGITS, phase=2), Arm(name, relay.DIGITS)
        assert continued_from(full).id == stopped.id
        # They differ only in the stopping rule, so continue_run accepts the stopped run's checkpoint.
        a, b = to_dict(train_config(full, cfg)), to_dict(train_config(stopped, cfg))
        assert a.pop("stop") != b.pop("stop") and a == b
    assert continued_from(Arm("pause", relay.DIGITS)) is None
    for sub in ("arms", "samples"):
        (tmp_path / sub).mkdir()
    rec = {"task": relay.DIGITS, "label": "pause_full/s0", "seed": 0, "accuracy": 0.1, "stderr": 0.1, "floor": 0.1,
           "positions_passed": 6.0, "kv_bytes_passed": 1.0, "steps_trained": 500, "stopped_early": False,
           "eval_seconds": 1, "latent_steps": 6, "system": "diffmas", "machine": "test",
           "continued_from": {"run": "relay_digits--pause--s0", "steps": 300}}
    (tmp_path / "arms" / "relay_digits--pause_full--s0.json").write_text(json.dumps(rec))
    (tmp_path / "samples" / "relay_digits--pause_full--s0.jsonl").write_text(
        json.dumps({"id": "digits1-0", "correct": True, "extracted": "1"}) + "\n")
    write_report(tmp_path, n_boot=100)
    assert "| 500 (1-300: relay_digits--pause--s0's) |" in (tmp_path / "README.md").read_text()


def test_the_report_names_the_baseline_of_every_paired_difference(tmp_path):
    for sub in ("arms", "samples"):
        (tmp_path / sub).mkdir()
    for name, right in (("coupled", 1), ("open", 6), ("blind", 1)):
        rec = {"task": relay.CHAIN, "label": f"{name}/s0", "seed": 0, "accuracy": right / 8, "stderr": 0.1,
               "floor": 0.1, "positions_passed": 6.0, "kv_bytes_passed": 1024.0, "steps_trained": 300,
               "stopped_early": False, "eval_seconds": 1, "latent_steps": 6, "machine": "test"}
        (tmp_path / "arms" / f"relay_chain_sum--{name}--s0.json").write_text(json.dumps(rec))
        (tmp_path / "samples" / f"relay_chain_sum--{name}--s0.jsonl").write_text("".join(
            json.dumps({"id": f"q{i}", "correct": i < right, "extracted": "1"}) + "\n" for i in range(8)))
    readme = write_report(tmp_path, n_boot=100) and (tmp_path / "README.md").read_text()
    # coupled is compared with blind and with open: each under its own baseline's heading
    blind, opened = readme.index("Baseline `blind`"), readme.index("Baseline `open`")
    rows = readme[min(blind, opened):].split("Baseline `")[1:]
    assert sum("| coupled |" in part for part in rows) == 2 and all(part.count("| arm | n |") == 1 for part in rows)


def test_controls_run_to_the_cap_and_the_goals_flag_unequal_budgets(tmp_path):
    cfg = RelayConfig()
    full = {n: train_config(Arm(n, relay.DIGITS), cfg) for n in ("pause_full", "detached_full", "pause")}
    assert full["pause_full"].stop.min_steps == full["detached_full"].stop.min_steps == cfg.max_steps
    assert full["pause_full"].latent_map == "pause" and full["detached_full"].grad_mode == "detached"
    assert full["pause"].stop.min_steps == cfg.min_steps
    for sub in ("arms", "samples"):
        (tmp_path / sub).mkdir()
    for name, steps, right in (("coupled", 500, 6), ("pause", 300, 1), ("pause_full", 500, 2)):
        rec = {"task": relay.DIGITS, "label": f"{name}/s0", "seed": 0, "accuracy": right / 8, "stderr": 0.1,
               "floor": 0.1, "positions_passed": 6.0, "kv_bytes_passed": 1.0, "steps_trained": steps,
               "stopped_early": steps < 500, "eval_seconds": 1, "latent_steps": 6, "system": "diffmas",
               "machine": "test"}
        (tmp_path / "arms" / f"relay_digits--{name}--s0.json").write_text(json.dumps(rec))
        (tmp_path / "samples" / f"relay_digits--{name}--s0.jsonl").write_text("".join(
            json.dumps({"id": f"digits1-{i}", "correct": i < right, "extracted": "1"}) + "\n" for i in range(8)))
    write_report(tmp_path, n_boot=100)
    goals = (tmp_path / "README.md").read_text().split("## Goals")[1].split("##")[0]
    pause = next(line for line in goals.splitlines() if "coupled - pause =" in line)
    same = next(line for line in goals.splitlines() if "coupled - pause_full =" in line)
    assert pause.endswith("not at equal budgets: trained 500 vs 300 steps") and "equal budgets" not in same


def _sums_goals(tmp_path, right: dict[str, int]) -> str:
    """The report's goals for relay:chain_sum arms answering ``right[name]`` of the same 8 items at seed 0."""
    for sub in ("arms", "samples"):
        (tmp_path / sub).mkdir()
    for name, n_right in right.items():
        rec = {"task": relay.CHAIN, "label": f"{name}/s0", "seed": 0, "accuracy": n_right / 8, "stderr": 0.1,
               "floor": 0.1, "positions_passed": 6.0 if name != "open" else 80.0, "kv_bytes_passed": 1.0,
               "steps_trained": 500, "stopped_early": False, "eval_seconds": 1, "latent_steps": 6,
               "system": "diffmas", "machine": "test"}
        (tmp_path / "arms" / f"relay_chain_sum--{name}--s0.json").write_text(json.dumps(rec))
        (tmp_path / "samples" / f"relay_chain_sum--{name}--s0.jsonl").write_text("".join(
            json.dumps({"id": f"q{i}", "correct": i < n_right, "extracted": "1"}) + "\n" for i in range(8)))
    write_report(tmp_path, n_boot=100)
    return (tmp_path / "README.md").read_text().split("## Goals")[1].split("##")[0]


def test_the_sums_goals_judge_the_best_latent_recipe_against_its_own_controls(tmp_path):
    goals = _sums_goals(tmp_path, {"coupled": 0, "coupled_anneal": 3, "detached_anneal": 0, "open": 6})
    assert "relay:chain_sum, coupled_anneal / open accuracy 0.50" in goals
    assert "coupled_anneal - detached_anneal = +37.5 points" in goals


def test_gated_on_the_sums_counts_as_a_coupled_recipe_and_is_paired_with_pause(tmp_path):
    goals = _sums_goals(tmp_path, {"coupled_anneal": 3, "gated_anneal": 5, "pause_anneal": 2, "open": 6})
    assert "relay:chain_sum, gated_anneal / open accuracy 0.83" in goals
    assert "relay:chain_sum: gated_anneal - pause_anneal = +37.5 points" in goals
    assert "relay:chain_sum: coupled_anneal - gated_anneal = -25.0 points" in goals


def test_sum_closeness_counts_exact_answers_per_number_of_terms_the_sign_and_near_misses():
    # The first evaluation items of relay:chain_sum: 0 - 2 = -2, 84 - 12 = 72, 6 - 9 = -3, 76 - 32 + 75 - 32 = 87.
    answers = [("chain_sum-1000000", "-2"), ("chain_sum-1000001", "75"), ("chain_sum-1000002", "3"),
               ("chain_sum-1000003", None), ("not-an-item", "1")]
    counts = sum_closeness(relay.CHAIN, answers)
    assert counts["2 terms"] == (1, 3) and counts["4 terms"] == (0, 1) and "3 terms" not in counts
    assert counts["sign"] == (2, 4) and counts["within 5"] == (2, 4)  # an answer that is no number is wrong


def test_the_split_report_pairs_the_share_of_answers_near_the_sum(tmp_path):
    # Neither arm is ever exact; coupled's answers land within 5 of the sum, half_a's 20 off: only the finer
    # measure can tell them apart.
    items = get_task(relay.SPLIT).load(8)
    for sub in ("arms", "samples"):
        (tmp_path / sub).mkdir()
    for name, off in (("coupled_anneal", 3), ("half_a_anneal", 20)):
        rec = {"task": relay.SPLIT, "label": f"{name}/s0", "seed": 0, "accuracy": 0.0, "stderr": 0.0,
               "floor": 0.1, "positions_passed": 12.0, "kv_bytes_passed": 1.0, "steps_trained": 500,
               "stopped_early": False, "eval_seconds": 1, "latent_steps": 6, "system": "diffmas", "machine": "test"}
        (tmp_path / "arms" / f"split_chain_sum--{name}--s0.json").write_text(json.dumps(rec))
        (tmp_path / "samples" / f"split_chain_sum--{name}--s0.jsonl").write_text("".join(
            json.dumps({"id": e.id, "correct": False, "extracted": str(int(e.answer) + off)}) + "\n" for e in items))
    results = write_report(tmp_path, n_boot=100)
    near = {(c["arm"], c["baseline"]): c for c in results["near_comparisons"][relay.SPLIT]}
    assert near[("coupled_anneal", "half_a_anneal")]["diff"] == pytest.approx(1.0)
    assert near[("coupled_anneal", "half_a_anneal")]["ci_low"] > 0
    readme = (tmp_path / "README.md").read_text()
    assert "| coupled_anneal - half_a_anneal | 8 | 1 vs 1 | 1.000 / 0.000 | +100.0" in readme


def test_the_digits_seeds_come_before_the_other_controls():
    ids = [a.id for a in plan_arms()]
    # The curriculum on the digits at two seeds, after seed 1's coupled and detached, before its pause and seed 2.
    curriculum = [ids.index(Arm("coupled_anneal", relay.DIGITS, seed).id) for seed in (0, 1)]
    frozen = ids.index(Arm("frozen", relay.DIGITS).id)
    assert ids.index(Arm("detached", relay.DIGITS, 1).id) < frozen < min(curriculum)
    # Then the curriculum's controls at seed 0, coupled's third seed, the m sweep below m = 6 (plan change 14), the
    # controls' seeds, open's seeds and the sums' (plan change 17), the plain recipe's remaining seeds; the sweep's
    # m = 8 and 16 last of all.
    controls = [ids.index(Arm(n, relay.DIGITS).id) for n in ("detached_anneal", "pause_anneal", "frozen_anneal")]
    assert max(curriculum) < min(controls) and controls == sorted(controls)
    third = ids.index(Arm("coupled_anneal", relay.DIGITS, 2).id)
    small, large = ([ids.index(Arm(n, relay.DIGITS, latent_steps=m).id) for m in ms
                     for n in ("coupled_anneal", "pause_anneal")] for ms in ((1, 2, 4), (8, 16)))
    seeds = [ids.index(Arm(n, relay.DIGITS, s).id) for s in (1, 2) for n in ("detached_anneal", "pause_anneal")]
    assert max(controls) < third < min(small) and small == sorted(small) and max(small) < min(seeds)
    # kvonly at m = 1 (plan change 16) right after the sweep's m = 1 and 2, before its m = 4.
    assert ids.index(Arm("kvonly_anneal", relay.DIGITS, latent_steps=1).id) == small[3] + 1 == small[4] - 1
    # gated at m = 1 (plan change 18) right after the sweep's m = 4; then (plan change 19) its seeds 1 and 2 each
    # with pause's at m = 1, gated on the sums between them, all before the controls' seeds.
    gated = [ids.index(a.id) for s in (0, 1, 2) for a in (Arm("gated_anneal", relay.DIGITS, s, latent_steps=1),
                                                         Arm("pause_anneal", relay.DIGITS, s, latent_steps=1))
             if s or a.name == "gated_anneal"]
    on_sums = ids.index(Arm("gated_anneal", relay.CHAIN).id)
    assert gated[0] == small[5] + 1 and gated[1:3] == [gated[0] + 1, gated[0] + 2]
    assert gated[3:] == [on_sums + 1, on_sums + 2] and on_sums == gated[2] + 1 and gated[-1] == min(seeds) - 1
    plain = [ids.index(Arm("pause", relay.DIGITS, 1).id), ids.index(Arm("coupled", relay.DIGITS, 2).id)]
    assert max(seeds) < plain[0] < plain[1] and min(large) > max(i for i, a in enumerate(ids) if "-m" not in a)
    assert ids.index(Arm("pause", relay.DIGITS, 2).id) < ids.index(Arm("coupled_long", relay.DIGITS).id)
    sums = [ids.index(Arm(n, relay.CHAIN, s).id) for n, s in (("open", 1), ("open", 2), ("coupled_ae", 0))]
    assert max(seeds) < sums[0] < sums[1] < sums[2] < plain[0]
    # The data-seed probes (plan change 20) right after the controls' seeds, before open's.
    probes = [ids.index(Arm(f"pause_anneal_data{d}", relay.DIGITS, s, latent_steps=1).id) for s, d in ((0, 2), (2, 0))]
    assert probes == [max(seeds) + 1, max(seeds) + 2] and probes[1] + 1 == sums[0]


def test_an_arm_evaluated_without_its_record_goes_after_every_other_arm(tmp_path):
    # Its samples were committed, its probe and record were lost with a machine: rerunning it measures nothing new.
    lost = Arm("pause_anneal", relay.DIGITS, latent_steps=1, phase=4)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / f"{lost.id}.jsonl").write_text('{"id": 0, "correct": true}\n')
    others = [a.id for a in plan_arms() if a.id != lost.id]
    assert [a.id for a in plan_arms(tmp_path)] == others + [lost.id]


@pytest.mark.parametrize("control, task, seed", [("pause", relay.DIGITS, 1), ("half_a_anneal", relay.SPLIT, 0)])
def test_a_control_the_flat_rule_stopped_before_coupled_is_run_on_to_the_cap_right_after_it(tmp_path, control, task,
                                                                                             seed):
    (tmp_path / "arms").mkdir()
    coupled = "coupled_anneal" if control.endswith("_anneal") else "coupled"
    # The split task's arms are planned once the curriculum has passed a sum.
    (tmp_path / "arms" / f"{Arm('coupled_anneal', relay.CHAIN).id}.json").write_text(json.dumps(
        {"accuracy": 0.12, "stderr": 0.015, "floor": 0.032, "stopped_early": False, "steps_trained": 500}))
    full = Arm(f"{control}_full", task, seed)

    def finish(name: str, steps: int, stopped: bool) -> None:
        (tmp_path / "arms" / f"{Arm(name, task, seed).id}.json").write_text(json.dumps(
            {"stopped_early": stopped, "steps_trained": steps}))

    def planned() -> list[str]:
        return [a.id for a in plan_arms(tmp_path)]

    finish(control, 300, True)
    assert full.id not in planned()  # coupled has not finished: whether it trains longer is not known yet
    finish(coupled, 300, True)
    assert full.id not in planned()  # both stopped at the same step: equal budgets already
    finish(coupled, 500, False)
    ids = planned()
    assert ids.index(full.id) == ids.index(Arm(control, task, seed).id) + 1
    assert continued_from(full).id == Arm(control, task, seed).id
    cfg = RelayConfig()
    a, b = to_dict(train_config(full, cfg)), to_dict(train_config(Arm(control, task, seed), cfg))
    assert a.pop("stop") == {**b.pop("stop"), "min_steps": cfg.max_steps} and a == b
    finish(control, 500, False)  # one that reached the cap needs no run to it
    finish(coupled, 1500, False)
    assert full.id not in planned()



def test_coupled_stopped_before_a_control_it_is_compared_with_is_run_on_to_the_cap_too(tmp_path):
    (tmp_path / "arms").mkdir()

    def finish(name: str, task: str, steps: int, stopped: bool, **extra) -> None:
        (tmp_path / "arms" / f"{Arm(name, task).id}.json").write_text(json.dumps(
            {"stopped_early": stopped, "steps_trained": steps, **extra}))

    def planned() -> list[str]:
        return [a.id for a in plan_arms(tmp_path)]

    finish("coupled_anneal", relay.CHAIN, 500, False, accuracy=0.12, stderr=0.015, floor=0.032)  # the recipe
    coupled, full = Arm("coupled_anneal", relay.SPLIT), Arm("coupled_anneal_full", relay.SPLIT)
    finish("coupled_anneal", relay.SPLIT, 375, True)
    finish("half_b_anneal", relay.SPLIT, 350, True)
    assert full.id not in planned()  # the half stopped first: it is the one run on
    finish("half_b_anneal_full", relay.SPLIT, 500, False)
    ids = planned()  # the half run on trained longer than coupled: coupled is run on as well, right after it
    assert ids.index(full.id) == ids.index(coupled.id) + 1 and continued_from(full).id == coupled.id
    cfg = RelayConfig()
    a, b = to_dict(train_config(full, cfg)), to_dict(train_config(coupled, cfg))
    assert a.pop("stop") == {**b.pop("stop"), "min_steps": cfg.max_steps} and a == b
    assert Arm("coupled_anneal_full", relay.CHAIN).id not in ids  # the sums' coupled reached the cap
    # Both run on: the report pairs them at equal budgets, and the goals judge that pair too.
    assert ("coupled_anneal_full", "half_b_anneal_full") in relay_report.PAIRS[relay.SPLIT]

def test_a_seed_the_flat_rule_stopped_before_another_seed_of_the_same_arm_is_run_on_to_the_cap(tmp_path):
    # Seeds replicate one comparison: coupled at seed 1, stopped on a plateau at 325, trains as long as seed 0 did.
    (tmp_path / "arms").mkdir()

    def finish(name: str, seed: int, steps: int, stopped: bool) -> None:
        (tmp_path / "arms" / f"{Arm(name, relay.DIGITS, seed).id}.json").write_text(json.dumps(
            {"stopped_early": stopped, "steps_trained": steps}))

    def planned() -> list[str]:
        return [a.id for a in plan_arms(tmp_path)]

    seed1, full = Arm("coupled", relay.DIGITS, 1), Arm("coupled_full", relay.DIGITS, 1)
    finish("coupled", 1, 325, True)
    assert full.id not in planned()  # no other seed of coupled has finished
    finish("coupled", 0, 325, True)
    assert full.id not in planned()  # seed 0 stopped there too: equal budgets already
    finish("coupled", 0, 500, False)
    ids = planned()
    assert ids.index(full.id) == ids.index(seed1.id) + 1 and continued_from(full).id == seed1.id
    assert Arm("coupled_full", relay.DIGITS, 0).id not in ids  # seed 0 reached the cap
    finish("coupled", 0, 300, True)  # the other way round: seed 0 stopped first, and seed 1's run on trained longer
    finish("coupled_full", 1, 500, False)
    assert Arm("coupled_full", relay.DIGITS, 0).id in planned()


def test_the_goals_say_when_an_unequal_budget_favours_the_baseline(tmp_path):
    for sub in ("arms", "samples"):
        (tmp_path / sub).mkdir()
    for name, steps in (("coupled_anneal", 375), ("half_a_anneal", 325), ("half_a_anneal_full", 500)):
        rec = {"task": relay.SPLIT, "label": f"{name}/s0", "seed": 0, "accuracy": 0.5, "stderr": 0.1, "floor": 0.1,
               "positions_passed": 6.0, "kv_bytes_passed": 1.0, "steps_trained": steps, "stopped_early": steps < 500,
               "eval_seconds": 1, "latent_steps": 6, "system": "diffmas", "machine": "test"}
        (tmp_path / "arms" / f"split_chain_sum--{name}--s0.json").write_text(json.dumps(rec))
        (tmp_path / "samples" / f"split_chain_sum--{name}--s0.jsonl").write_text("".join(
            json.dumps({"id": f"q{i}", "correct": i < 4, "extracted": "1"}) + "\n" for i in range(8)))
    write_report(tmp_path, n_boot=100)
    goals = (tmp_path / "README.md").read_text().split("## Goals")[1].split("##")[0].splitlines()
    stopped = next(line for line in goals if "coupled_anneal - half_a_anneal =" in line)
    full = next(line for line in goals if "coupled_anneal - half_a_anneal_full =" in line)
    assert stopped.endswith("; not at equal budgets: trained 375 vs 325 steps")
    assert full.endswith("; not at equal budgets (in the baseline's favour): trained 375 vs 500 steps")


def _digits_arm(docs, name, seed=0, steps=500, stopped=False, right=4, hours=1.0, m=None, **extra):
    """A finished relay:digits arm in ``docs`` (at the sweep's ``m`` where given): its record, 8 items of which the
    first ``right`` are correct, and a one-step curve of ``hours`` of training."""
    for sub in ("arms", "samples", "curves"):
        (docs / sub).mkdir(exist_ok=True)
    arm = Arm(name, relay.DIGITS, seed, latent_steps=m)
    rec = {"arm": name, "task": relay.DIGITS, "label": arm.label, "seed": seed, "accuracy": right / 8, "stderr": 0.1,
           "floor": 0.03, "positions_passed": float(m or 6), "kv_bytes_passed": 1.0, "steps_trained": steps,
           "stopped_early": stopped, "eval_seconds": 100, "latent_steps": m or 6, "system": "diffmas", "machine": "test",
           "config": {"steps": 500}, **extra}
    (docs / "arms" / f"{arm.id}.json").write_text(json.dumps(rec))
    (docs / "samples" / f"{arm.id}.jsonl").write_text("".join(
        json.dumps({"id": f"digits1-{i}", "correct": i < right, "extracted": "1"}) + "\n" for i in range(8)))
    (docs / "curves" / f"{arm.id}.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "seconds": 3600 * hours}))


def test_the_latent_against_text_goal_is_judged_for_the_curriculum_too(tmp_path):
    # On the digits the curriculum, not the plain recipe, is what beat the trained text channel.
    for name, right in (("coupled", 1), ("coupled_anneal", 8), ("text_sft_m", 4)):
        _digits_arm(tmp_path, name, right=right)
    results = write_report(tmp_path, n_boot=100)
    pairs = {(c["arm"], c["baseline"]) for c in results["comparisons"][relay.DIGITS]}
    assert {("coupled", "text_sft_m"), ("coupled_anneal", "text_sft_m")} <= pairs
    goals = (tmp_path / "README.md").read_text().split("## Goals")[1]
    assert "relay:digits: coupled_anneal - text_sft_m = +50.0 points" in goals
    assert "relay:digits: coupled - text_sft_m = -37.5 points" in goals


def test_an_arm_that_reached_the_cap_pools_with_the_runs_to_the_cap_of_other_seeds(tmp_path):
    # Seed 0's coupled trained to the cap itself; seed 1's stopped flat at 325 and was run on (coupled_full). Against
    # the controls run to the cap, the equal-budget pair pools both seeds, and seed 0's run is not counted twice.
    runs = (("coupled", 0, 500, False, 6), ("coupled", 1, 325, True, 2), ("coupled_full", 1, 500, False, 6),
            ("detached_full", 0, 500, False, 1), ("detached_full", 1, 500, False, 1))
    for name, seed, steps, stopped, right in runs:
        _digits_arm(tmp_path, name, seed, steps, stopped, right)
    results = write_report(tmp_path, n_boot=100)
    digits = results["by_arm"][relay.DIGITS]
    assert digits["coupled_full"]["seeds"] == [0, 1] and digits["coupled_full"]["per_seed"] == [0.75, 0.75]
    assert digits["coupled"]["seeds"] == [0, 1] and digits["coupled"]["steps"] == [500, 325]
    pair = next(c for c in results["comparisons"][relay.DIGITS]
                if (c["arm"], c["baseline"]) == ("coupled_full", "detached_full"))
    assert pair["seeds_arm"] == pair["seeds_base"] == 2 and pair["diff"] == pytest.approx(5 / 8)
    readme = (tmp_path / "README.md").read_text()
    assert "| coupled_full | 2 | 0.750 / 0.750 |" in readme and "500 (= relay_digits--coupled--s0), 500 |" in readme
    assert "Core-hours so far (training steps, test evaluations and held-out evaluations where timed): 5.1." \
        in readme  # five runs' hours (an hour of steps, 100 s of evaluation each), seed 0's coupled once
    goals = readme.split("## Goals")[1].split("##")[0]
    # Both sides at the cap on every seed: equal budgets, although the arm has its cap run at seed 0 by itself.
    assert "- relay:digits: coupled_full - detached_full = +62.5 points" in goals
    assert next(line for line in goals.splitlines() if "coupled_full - detached_full" in line).endswith("above 0: met")
    assert "- relay:digits, coupled_full, k = 1: accuracy 0.750 ± " in goals and "(n = 16; per seed 0.75 / 0.75;" \
        in goals


def test_the_digits_goal_is_judged_for_coupled_under_each_recipe_and_the_recipes_are_paired(tmp_path):
    for name, right in (("coupled", 1), ("coupled_anneal", 8)):
        _digits_arm(tmp_path, name, right=right)
    results = write_report(tmp_path, n_boot=100)
    goals = (tmp_path / "README.md").read_text().split("## Goals")[1].split("##")[0]
    assert "- relay:digits, coupled, k = 1: accuracy 0.125 ± " in goals and goals.count("): not met") == 1
    assert "- relay:digits, coupled_anneal, k = 1: accuracy 1.000 ± 0.000 (n = 8; goal >= 0.9, chance 0.1): met" \
        in goals
    pair = next(c for c in results["comparisons"][relay.DIGITS] if (c["arm"], c["baseline"]) ==
                ("coupled_anneal", "coupled"))
    assert pair["diff"] == pytest.approx(7 / 8)


def test_the_report_counts_the_precision_of_the_trained_runs_and_flags_a_run_not_in_fp32(tmp_path):
    for name, precision in (("coupled", "no"), ("detached", "no"), ("pause", "bf16")):
        _digits_arm(tmp_path, name, mixed_precision=precision)
    _digits_arm(tmp_path, "skyline")  # finished before runs recorded their precision
    write_report(tmp_path, n_boot=100)
    line = next(line for line in (tmp_path / "README.md").read_text().splitlines() if line.startswith("Precision"))
    assert line.startswith("Precision of the trained runs: bf16 autocast: 1, fp32: 2, not recorded: 1.")
    assert "predate the record" in line and "**Not every run trained in fp32" in line
    (tmp_path / "arms" / f"{Arm('pause', relay.DIGITS).id}.json").unlink()
    write_report(tmp_path, n_boot=100)
    assert "Not every run" not in (tmp_path / "README.md").read_text()


def test_the_digits_curriculum_is_paired_with_its_own_controls_and_judged(tmp_path):
    # The digits' claims moved to the curriculum (plan change 13): its controls are paired and judged under it.
    for name, right in (("coupled_anneal", 8), ("detached_anneal", 2), ("frozen_anneal", 1), ("pause_anneal", 3)):
        _digits_arm(tmp_path, name, right=right)
    results = write_report(tmp_path, n_boot=100)
    pairs = {(c["arm"], c["baseline"]): c["diff"] for c in results["comparisons"][relay.DIGITS]}
    assert pairs[("coupled_anneal", "detached_anneal")] == pytest.approx(6 / 8)
    assert pairs[("coupled_anneal", "frozen_anneal")] == pytest.approx(7 / 8)
    assert pairs[("coupled_anneal", "pause_anneal")] == pytest.approx(5 / 8)
    goals = (tmp_path / "README.md").read_text().split("## Goals")[1]
    assert "relay:digits: coupled_anneal - detached_anneal = +75.0 points" in goals


def test_the_sweep_pairs_coupled_with_pause_at_each_m_at_equal_budgets_and_tables_bits_per_position(tmp_path):
    # At m = 1 coupled stopped flat at 350 and was run on to the cap; pause reached the cap by itself: the
    # equal-budget pair is coupled's run on against pause as it is. At m = 6 both reached the cap.
    for name, steps, stopped, right, m in (("coupled_anneal", 500, False, 8, None), ("pause_anneal", 500, False, 8, None),
                                           ("coupled_anneal", 350, True, 2, 1), ("coupled_anneal_full", 500, False, 6, 1),
                                           ("pause_anneal", 500, False, 1, 1), ("detached_anneal", 300, True, 0, None),
                                           ("coupled_full", 500, False, 3, None)):
        _digits_arm(tmp_path, name, steps=steps, stopped=stopped, right=right, m=m)
    results = write_report(tmp_path, n_boot=100)
    pairs = {(c["arm"], c["baseline"]): c["diff"] for c in results["comparisons"][relay.DIGITS]}
    assert pairs[("coupled_anneal_full-m1", "pause_anneal-m1")] == pytest.approx(5 / 8)
    assert pairs[("coupled_anneal-m1", "pause_anneal-m1")] == pytest.approx(1 / 8)  # unequal budgets, and flagged
    assert ("coupled_full", "detached_anneal") not in pairs
    assert ("coupled_anneal_full", "detached_anneal") not in pairs  # no such run; and detached stopped early
    goals = (tmp_path / "README.md").read_text().split("## Goals")[1].split("##")[0]
    line = next(l for l in goals.splitlines() if "coupled_anneal_full-m1 - pause_anneal-m1" in l)
    assert "+62.5 points" in line and "not at equal budgets" not in line
    assert "not at equal budgets" in next(l for l in goals.splitlines() if "coupled_anneal-m1 - pause_anneal-m1" in l)
    kinds = relay_capacity.sweep_points(results["arms"], {
        key: {0: {f"digits1-{i}": i < round(8 * acc) for i in range(8)}}
        for key, acc in ((relay.arm_key(r), r["accuracy"]) for r in results["arms"])})
    assert set(kinds) == {"coupled_anneal", "pause_anneal"}  # detached and coupled_full: one size each
    assert [(p.positions, p.arm) for p in kinds["coupled_anneal"]] == [(1, "coupled_anneal_full-m1"),
                                                                      (6, "coupled_anneal")]  # the run on to the cap
    assert kinds["coupled_anneal"][0].bits == pytest.approx(Rung(1, 6, 8).bits)
    # At m = 6 a second seed stopped flat and was run on: the run on to the cap (every seed at 500, seed 0's
    # run counted under its name) is the sweep's point, not the arm pooled with a stopped seed.
    _digits_arm(tmp_path, "coupled_anneal", seed=1, steps=350, stopped=True, right=1)
    _digits_arm(tmp_path, "coupled_anneal_full", seed=1, right=8)
    results = write_report(tmp_path, n_boot=100)
    assert "| coupled_anneal | 6 | coupled_anneal_full | 2 |" in (tmp_path / "README.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "| coupled_anneal | 1 | coupled_anneal_full-m1 | 1 |" in readme
    assert "| pause_anneal | 6 | pause_anneal | 1 | 3.3 | 0.55 | 1 |" in readme


def test_the_report_says_when_each_position_named_a_digit_and_the_loss_there(tmp_path):
    folder = tmp_path / "lens" / "curves"
    folder.mkdir(parents=True)

    def point(step, loss, first, second=0.1):
        return {"step": step, "heldout_loss": loss,
                "positions": [{"writer": "reasoner", "position": 1, "read": {"1": first, "2": second}}]}

    named = [point(50, 1.3, 0.1), point(100, 0.80, 0.9), point(150, 0.78, 0.95), point(200, 0.5, 0.2, 0.7),
             point(250, 0.76, 0.6)]
    (folder / "a.json").write_text(json.dumps({"settings": {"n": 150}, "points": named}))
    (folder / "a.png").write_bytes(b"")
    (folder / "b.json").write_text(json.dumps({"settings": {"n": 60}, "points": [point(50, None, 0.1)]}))
    rows = [line for line in relay_report._lens_table(tmp_path) if line.startswith("| a ") or line.startswith("| b ")]
    assert rows == [
        "| a | 50-250 (150) | reasoner 1 | 100-150, 250 | 0.760-0.800 | 200 | [plot](lens/curves/a.png) |",
        "| b | 50 (60) | reasoner 1 | never | – | never | – |"]
    assert relay_report._lens_table(tmp_path / "nothing") == []

"""Eval runner: one log line per sample, kill-and-resume == uninterrupted, results from samples, report, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffmas.adapters import META_FILE, LoraSettings, attach_lora, save_adapters
from diffmas.cli import app
from diffmas.errors import DiffMASError
from diffmas.eval.metrics import mean_stderr, pass_at_k
from diffmas.eval.report import PLOTS, report
from diffmas.eval.entries import parse_systems
from diffmas.eval.runner import run_eval
from diffmas.eval.samples import RESULTS_FILE, SAMPLES_FILE
from diffmas.prompts import load_topology

from conftest import make_backbone

TASK = "rg:chain_sum"
LIMIT = 6
# Shared by the in-process runs and the CLI runs below, so their results can be compared.
KW = dict(limit=LIMIT, batch_size=2, max_new_tokens=6, writer_max_new_tokens=6, latent_steps=2, show_progress=False)
CLI_ARGS = ["eval", "--systems", "single,latent_mas", "--task", TASK, "--limit", str(LIMIT), "--seeds", "2",
            "--batch-size", "2", "--max-new-tokens", "6", "--writer-max-new-tokens", "6", "--latent-steps", "2",
            "--no-progress"]

# A CLI run whose every batch takes >= 0.25 s, so a kill lands mid-run; one thread, like the in-process runs,
# so both do the same arithmetic.
SLOW_CLI = """
import sys, time, torch
torch.set_num_threads(1)
from diffmas.systems import System
run = System.run
System.run = lambda self, *a, **k: (time.sleep(0.25), run(self, *a, **k))[1]
from diffmas.cli import app
app(args=sys.argv[1:], prog_name="diffmas")
"""


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


pytestmark = pytest.mark.usefixtures("one_thread")


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]


def keys(samples: list[dict]) -> list[tuple]:
    return [(s["system"], s["task"], s["seed"], s["id"]) for s in samples]


def comparable(value):
    """Drop wall-time fields, and the git state (other people edit and commit this checkout meanwhile)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if "seconds" not in k and not k.startswith("git_")}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def test_one_line_per_sample(model_dir, tmp_path):
    out = tmp_path / "run"
    results = run_eval(["single", "text_mas", "latent_mas"], [TASK], out, model=str(model_dir), seeds=(0, 1), **KW)
    samples = lines(out)
    assert len(samples) == 3 * 2 * LIMIT == len(set(keys(samples)))
    assert {s["system"] for s in samples} == {"single", "text_mas", "latent_mas"}
    for s in samples:
        assert s["tokens"] == sum(a["generated_tokens"] for a in s["agents"])
        assert s["seconds"] == pytest.approx(sum(a["seconds"] for a in s["agents"]))
        assert s["final_tokens"] == s["agents"][-1]["generated_tokens"] > 0
    text = [s for s in samples if s["system"] == "text_mas"]
    assert all(s["tokens"] > s["final_tokens"] for s in text)  # the writers' replies count too
    assert results["status"] == "complete" and json.loads((out / RESULTS_FILE).read_text()) == results
    assert [(r["system"], r["n"], r["n_samples"]) for r in results["results"]] == [
        ("single", LIMIT, 2 * LIMIT), ("text_mas", LIMIT, 2 * LIMIT), ("latent_mas", LIMIT, 2 * LIMIT)]
    assert results["notes"] and "redundant" in results["notes"][0]  # greedy: seed 1 repeats seed 0
    assert results["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("seeds,temperature", [((0,), 0.0), ((0, 1, 2), 1.0)])
def test_results_follow_the_samples(model_dir, tmp_path, seeds, temperature):
    out = tmp_path / "run"
    run_eval(["single"], [TASK], out, model=str(model_dir), seeds=seeds, temperature=temperature, **KW)
    # A random model gets nothing right: give the samples a known mix of correct answers, then let a rerun
    # (nothing left to run) rebuild results.json from them.
    samples = lines(out)
    for n, s in enumerate(samples):
        s["correct"] = n % 3 != 0 or s["seed"] == 1
    (out / SAMPLES_FILE).write_text("".join(json.dumps(s) + "\n" for s in samples))
    row = run_eval(["single"], [TASK], out, model=str(model_dir), seeds=seeds, temperature=temperature,
                   **KW)["results"][0]
    assert row["accuracy"] == pytest.approx(mean_stderr(s["correct"] for s in samples)[0])
    per_problem = {}
    for s in samples:
        per_problem.setdefault(s["id"], []).append(s["correct"])
    # With several seeds the error is over problems (a problem's samples are correlated), not over samples.
    expected = mean_stderr(sum(c) / len(c) for c in per_problem.values())[1]
    assert row["stderr"] == pytest.approx(expected) and row["stderr"] > 0
    if len(seeds) == 1:
        assert row["stderr"] == pytest.approx(mean_stderr(s["correct"] for s in samples)[1])
        assert "seeds" not in row and "pass_at_k" not in row
    else:
        per_seed = [mean_stderr(s["correct"] for s in samples if s["seed"] == k)[0] for k in seeds]
        assert row["seeds"]["accuracy_per_seed"] == pytest.approx(per_seed)
        pass_k = [pass_at_k(len(c), sum(c), len(seeds)) for c in per_problem.values()]
        assert row["pass_at_k"]["value"] == pytest.approx(sum(pass_k) / len(pass_k))


def test_kill_and_resume_matches_uninterrupted(model_dir, tmp_path):
    whole = run_eval(["single", "latent_mas"], [TASK], tmp_path / "whole", model=str(model_dir), seeds=(0, 1), **KW)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", SLOW_CLI, *CLI_ARGS, "--model", str(model_dir), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path, total, seen = out / SAMPLES_FILE, 2 * 2 * LIMIT, 0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and seen < 4:
        seen = path.read_bytes().count(b"\n") if path.exists() else 0
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 0 < path.read_bytes().count(b"\n") < total
    assert json.loads((out / RESULTS_FILE).read_text())["status"] == "running"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    samples = lines(out)
    assert sorted(keys(samples)) == sorted(keys(lines(tmp_path / "whole")))  # none lost, none twice
    assert comparable(json.loads((out / RESULTS_FILE).read_text())["results"]) == comparable(whole["results"])
    by_key = {k: s for k, s in zip(keys(samples), samples)}
    for k, s in zip(keys(lines(tmp_path / "whole")), lines(tmp_path / "whole")):
        assert comparable(by_key[k]) == comparable(s)


def test_cut_off_last_line_is_repaired(model_dir, tmp_path):
    out = tmp_path / "run"
    first = run_eval(["single"], [TASK], out, model=str(model_dir), **KW)
    path = out / SAMPLES_FILE
    raw = path.read_bytes()
    last = raw[:-1].rfind(b"\n") + 1
    path.write_bytes(raw[: last + (len(raw) - last) // 2])  # a kill in the middle of writing the last record
    again = run_eval(["single"], [TASK], out, model=str(model_dir), **KW)
    assert len(lines(out)) == LIMIT == len(set(keys(lines(out))))
    assert comparable(again) == comparable(first)

    path.write_bytes(path.read_bytes()[:-1])  # a whole record that lost only its newline is kept as it is
    run_eval(["single"], [TASK], out, model=str(model_dir), **KW)
    assert path.read_bytes().endswith(b"\n") and len(lines(out)) == LIMIT

    samples = path.read_text().splitlines()
    path.write_text("\n".join(samples[:2] + ["{oops"] + samples[2:]) + "\n")  # not a kill: refuse to guess
    with pytest.raises(DiffMASError, match="line 3 is corrupt"):
        run_eval(["single"], [TASK], out, model=str(model_dir), **KW)


def test_resume_refuses_other_settings(model_dir, tmp_path):
    run_eval(["single"], [TASK], tmp_path, model=str(model_dir), **KW)
    with pytest.raises(DiffMASError, match="max_new_tokens: 6 -> 7"):
        run_eval(["single"], [TASK], tmp_path, model=str(model_dir), **{**KW, "max_new_tokens": 7})


def test_report_rerenders_table_and_plots(model_dir, tmp_path):
    for name in ("a", "b"):
        run_eval(["single"], [TASK], tmp_path / name, model=str(model_dir), **KW)
    for png in PLOTS:
        (tmp_path / "a" / png).unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["eval", "--report", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "single" in result.output and TASK in result.output
    for png in PLOTS:
        assert (tmp_path / "a" / png).read_bytes().startswith(b"\x89PNG")
    merged, table, _ = report([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert [r["system"] for r in merged["results"]] == ["single@a", "single@b"] and table.row_count == 2
    assert all((tmp_path / "merged" / png).is_file() for png in PLOTS)
    missing = CliRunner().invoke(app, ["eval", "--report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no results.json" in missing.output


def test_system_entries(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / META_FILE).write_text(json.dumps({"roles": {}}))
    entries = parse_systems(["single", f"diffmas:{tmp_path / 'x'}", f"diffmas:{tmp_path / 'y'}"])
    assert [e.label for e in entries] == ["single", "diffmas@x", "diffmas@y"]
    for bad, message in ((["diffmas"], "needs an adapter"), (["single:x"], "training-free"),
                         (["single", "single"], "listed twice"), ([f"diffmas:{tmp_path}"], "not found")):
        with pytest.raises(DiffMASError, match=message):
            parse_systems(bad)


def test_trained_adapter_does_not_leak_into_other_systems(model_dir, tmp_path):
    bb = make_backbone()
    roles = [a.role for a in load_topology("sequential").agents]
    settings = LoraSettings(rank=2, targets=("q_proj", "v_proj"))
    attach_lora(bb, settings, roles)
    torch.manual_seed(1)
    with torch.no_grad():  # fresh LoRA is the identity (B = 0): make it change the model
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    save_adapters(bb, tmp_path / "adapter", {r: "default" for r in roles}, settings,
                  extra={"system": "diffmas", "topology": "sequential", "latent_steps": 2})
    mixed = run_eval(["latent_mas", f"diffmas:{tmp_path / 'adapter'}", "single"], [TASK], tmp_path / "mixed",
                     model=str(model_dir), **KW)
    plain = run_eval(["latent_mas", "single"], [TASK], tmp_path / "plain", model=str(model_dir), **KW)
    by_system = {}
    for s in lines(tmp_path / "mixed"):
        by_system.setdefault(s["system"], []).append(s["response"])
    assert by_system["diffmas"] != by_system["latent_mas"]  # the adapter took effect ...
    rows = {r["system"]: comparable(r) for r in mixed["results"]}
    for r in plain["results"]:  # ... and only where it was asked for
        assert rows[r["system"]] == comparable(r)


# ---------------------------------------------------------------------- gold-target perplexity (issue 9)

def _gold_setup(spec_kind: str):
    from diffmas.eval.runner import gold_target
    from diffmas.prompts import SINGLE
    from diffmas.rollout import RolloutSpec
    from diffmas.systems import System, build_system, get_kind
    from diffmas.tasks import get_task

    bb = make_backbone(dtype=torch.float64)
    if spec_kind == "final_latent":  # the final agent's own latent steps: the target is a segment of its own
        system = System(get_kind("single_latent"), bb, RolloutSpec(SINGLE, "latent", 0, final_latent_steps=2))
    else:
        system = build_system(spec_kind, bb, latent_steps=2)
    examples = get_task(TASK).load(5)
    return bb, system, [get_task(TASK).prompt(ex) for ex in examples], [gold_target(ex) for ex in examples]


@pytest.mark.parametrize("spec_kind", ["latent_mas", "single", "final_latent"])
def test_gold_perplexity_is_training_loss_and_batch_invariant(spec_kind):
    from diffmas.decode import DecodeConfig
    from diffmas.rollout import rollout

    bb, system, prompts, targets = _gold_setup(spec_kind)
    assert all(t.startswith("Answer: ") for t in targets)
    cfg = DecodeConfig(4)
    full = system.run(prompts, cfg, batch_size=len(prompts), targets=targets)
    for i, rec in enumerate(full):
        alone = system.run([prompts[i]], cfg, batch_size=1, targets=[targets[i]])[0]
        assert alone["gold_tokens"] == rec["gold_tokens"] > 0
        assert alone["gold_nll_sum"] == pytest.approx(rec["gold_nll_sum"], rel=1e-9, abs=1e-9)
        assert alone["answer"] == rec["answer"]  # the answers do not change with gold targets either
        with torch.no_grad():  # the training path: the same rows teacher-forced on the same target
            train = rollout(bb, system.spec, [prompts[i]], targets=[targets[i]], grad_mode="detached")
        assert train.target_tokens == rec["gold_tokens"]
        assert rec["gold_nll_sum"] == pytest.approx(float(train.loss) * train.target_tokens, rel=1e-9)
    with torch.no_grad():
        train = rollout(bb, system.spec, prompts, targets=targets, grad_mode="detached")
    gold_ppl = math.exp(sum(r["gold_nll_sum"] for r in full) / sum(r["gold_tokens"] for r in full))
    assert gold_ppl == pytest.approx(math.exp(float(train.loss)), rel=1e-9)
    assert [r["answer"] for r in full] == [r["answer"] for r in system.run(prompts, cfg, batch_size=len(prompts))]


def test_eval_records_gold_and_own_output_perplexity(model_dir, tmp_path):
    from diffmas.eval.metrics import perplexity

    out = tmp_path / "run"
    results = run_eval(["single", "text_mas", "latent_mas"], [TASK], out, model=str(model_dir), **KW)
    samples = lines(out)
    assert all(s["gold_tokens"] > 0 and s["gold_nll_sum"] > 0 for s in samples)
    for row in results["results"]:
        mine = [s for s in samples if s["system"] == row["system"]]
        assert "perplexity" not in row
        assert row["gold_perplexity"] == pytest.approx(perplexity(sum(s["gold_nll_sum"] for s in mine),
                                                                   sum(s["gold_tokens"] for s in mine)))
        assert row["self_perplexity"] == pytest.approx(perplexity(sum(s["nll_sum"] for s in mine),
                                                                   sum(s["final_tokens"] for s in mine)))
    # Samples written before gold NLLs existed still give results (gold perplexity only over those that have one).
    for s in samples:
        del s["gold_nll_sum"], s["gold_tokens"]
    (out / SAMPLES_FILE).write_text("".join(json.dumps(s) + "\n" for s in samples))
    again = run_eval(["single", "text_mas", "latent_mas"], [TASK], out, model=str(model_dir), **KW)
    assert all(r["gold_perplexity"] is None and r["self_perplexity"] for r in again["results"])


def test_eval_top_p(model_dir, tmp_path, monkeypatch):
    from diffmas.systems import System

    seen = []
    run = System.run
    monkeypatch.setattr(System, "run", lambda self, prompts, cfg, *a, **k: (seen.append(cfg.top_p),
                                                                           run(self, prompts, cfg, *a, **k))[1])
    out = tmp_path / "run"
    args = [*CLI_ARGS[:CLI_ARGS.index("--seeds")], "--temperature", "1.0", "--top-p", "0.5", "--model",
            str(model_dir), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {0.5}
    assert json.loads((out / RESULTS_FILE).read_text())["config"]["top_p"] == 0.5
    with pytest.raises(DiffMASError, match="top_p: 0.5 -> 0.9"):
        run_eval(["single", "latent_mas"], [TASK], out, model=str(model_dir), temperature=1.0, top_p=0.9, **KW)
    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "bad"), "--top-p", "0"])
    assert bad.exit_code == 2 and "top_p" in bad.output
    # A folder written before top_p was recorded ran with 1.0: resuming it with the default is allowed.
    plain = tmp_path / "plain"
    run_eval(["single"], [TASK], plain, model=str(model_dir), **KW)
    data = json.loads((plain / RESULTS_FILE).read_text())
    del data["config"]["top_p"]
    (plain / RESULTS_FILE).write_text(json.dumps(data))
    run_eval(["single"], [TASK], plain, model=str(model_dir), **KW)


def test_train_realign_flag(tmp_path, monkeypatch):
    import diffmas.train.loop

    seen = []
    monkeypatch.setattr(diffmas.train.loop, "train",
                        lambda cfg, out, resume=False: (seen.append(cfg.realign), {"is_main_process": False})[1])
    config = tmp_path / "train.yaml"
    config.write_text("realign: false\n")
    for flags, expected in (([], True), (["--no-realign"], False), (["--config", str(config)], False),
                            (["--config", str(config), "--realign"], True)):
        result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "out"), *flags])
        assert result.exit_code == 0, result.output
        assert seen[-1] is expected, flags
    assert "--no-realign" in CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output

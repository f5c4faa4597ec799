"""The CLI on bad input: one line on stderr, a non-zero exit, and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_backbone

from diffmas.adapters import LoraSettings, attach_lora, save_adapters


def _diffmas(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffmas.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def _assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(line.startswith("error:") and fragment in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr


def test_empty_question_file(tmp_path, tiny_model_dir):
    questions = tmp_path / "questions.txt"
    questions.write_text("\n  \n")
    _assert_one_line_error(_diffmas("run", "--model", str(tiny_model_dir), "--question-file", str(questions)),
                           "no questions")


def test_unknown_system(tiny_model_dir):
    _assert_one_line_error(_diffmas("run", "--system", "telepathy", "--question", "hi"), "unknown system 'telepathy'")


def test_missing_model_folder(tmp_path):
    _assert_one_line_error(_diffmas("run", "--model", str(tmp_path / "nowhere"), "--question", "hi"),
                           "does not exist")


def test_adapter_for_another_model(tmp_path, tiny_model_dir):
    other = make_backbone("qwen2")  # different architecture and shapes than the tiny Llama
    roles = attach_lora(other, LoraSettings(rank=2), ["solver"])
    adapter = tmp_path / "adapter"
    save_adapters(other, adapter, roles, LoraSettings(rank=2), extra={"system": "single_sft"})
    result = _diffmas("run", "--system", "single_sft", "--adapter", str(adapter), "--model", str(tiny_model_dir),
                      "--question", "hi")
    _assert_one_line_error(result, "was trained on")


def test_missing_adapter_dir(tmp_path, tiny_model_dir):
    result = _diffmas("run", "--system", "diffmas", "--adapter", str(tmp_path / "none"), "--model",
                      str(tiny_model_dir), "--question", "hi")
    _assert_one_line_error(result, "not found")


def test_run_prints_json_records(tiny_model_dir):
    result = _diffmas("run", "--system", "latent_mas", "--model", str(tiny_model_dir), "--question", "2+2?",
                      "--latent-steps", "2", "--max-new-tokens", "4", "--json", "--show-latents")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert len(records) == 1 and set(records[0]) >= {"answer", "agents", "trace_tokens"}
    assert [a["role"] for a in records[0]["agents"]] == ["planner", "critic", "refiner", "judger"]
    assert all(a["latent_steps"] == 2 for a in records[0]["agents"][:-1])
    # The logit lens: top-3 tokens for each latent step of each writer.
    assert all(len(a["latents"]) == 2 and all(len(top) == 3 for top in a["latents"])
               for a in records[0]["agents"][:-1])


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": "fast"}, {"lora": {"layout": "diagonal"}}])
def test_train_rejects_invalid_config(tmp_path, bad):
    import yaml

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    _assert_one_line_error(_diffmas("train", "--config", str(config), "--out", str(tmp_path / "o")), "config field")
    assert not (tmp_path / "o").exists()


def test_help_keeps_long_option_names_whole_in_80_columns():
    """Piped or in a narrow terminal, `--help` lists every option name whole (rich's table cut them with '…')."""
    from typer.testing import CliRunner

    from diffmas.cli import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    for name in ("--curriculum-stages", "--thoughts-per-step", "--distill-teacher-weight", "--link-pretrain-steps",
                 "--activation-checkpointing", "--no-activation-checkpointing"):
        assert name in result.output, result.output
    assert "…" not in result.output


def test_a_study_lists_its_plan_without_running_it(tmp_path):
    from typer.testing import CliRunner

    from diffmas.cli import app

    from diffmas.experiments.relay import plan_arms

    # In a narrow terminal (the longest id, 40 characters, and the state just fit) every arm's id is printed
    # whole: they differ only at their ends.
    result = CliRunner().invoke(app, ["study-relay", "--plan", "--out", str(tmp_path / "runs"), "--docs",
                                      str(tmp_path / "docs")], env={"COLUMNS": "60"}, terminal_width=60)
    assert result.exit_code == 0, result.output
    assert all(arm.id in result.output for arm in plan_arms()) and "│ pending │" in result.output
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing claimed


_MAIN_UNDER_A_PROCESS_GROUP = """
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
from diffmas.cli import main
sys.argv = ["diffmas", *sys.argv[2:]]
try:
    main()
except SystemExit as exc:
    print(json.dumps({"code": exc.code, "initialized": dist.is_initialized()}))
"""


@pytest.mark.parametrize("args, clean", [(["--help"], True), (["no-such-command"], False)])
def test_the_command_line_tears_down_its_process_group_only_after_a_clean_finish(tmp_path, args, clean):
    """Under `accelerate launch` the command tears the process group down itself: left to the interpreter's exit,
    gloo's threads abort it now and then (SIGABRT). After a failure it leaves the group (a peer may be waiting)."""
    done = subprocess.run([sys.executable, "-c", _MAIN_UNDER_A_PROCESS_GROUP, str(tmp_path / "rendezvous"), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DIFFMAS_MALLOC": "glibc", "OMP_NUM_THREADS": "1"})
    result = json.loads(done.stdout.splitlines()[-1])
    assert (result["code"] in (0, None)) == clean, done.stderr[-2000:]
    assert result["initialized"] == (not clean)

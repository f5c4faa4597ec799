"""Evaluation under `accelerate launch`: N processes share the batches and end with the 1-process samples and results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from diffmas.eval.samples import RESULTS_FILE, SAMPLES_FILE, SampleLog, merge_rank_logs

ROOT = Path(__file__).resolve().parents[1]
EVAL_ARGS = ["eval", "--systems", "single,latent_mas", "--task", "rg:chain_sum", "--limit", "7", "--seeds", "2",
             "--batch-size", "2", "--max-new-tokens", "6", "--latent-steps", "2", "--no-progress"]


def _env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _without_times(value):
    """Drop wall-time fields and the git state (others edit this checkout meanwhile)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "seconds" not in k and not k.startswith("git_")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _records(out: Path) -> dict[tuple, dict]:
    """Every line of samples.jsonl by its key (a duplicated key fails), wall times dropped."""
    records = [_without_times(json.loads(line)) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    by_key = {(r["system"], r["task"], r["seed"], r["id"]): r for r in records}
    assert len(by_key) == len(records), "a sample is in the log twice"
    return by_key


def test_two_processes_give_the_one_process_samples_and_results(tmp_path, tiny_model_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*EVAL_ARGS, "--model", str(tiny_model_dir)]
    done = subprocess.run([sys.executable, "-m", "diffmas.cli", *args, "--out", str(one)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
           "-m", "diffmas.cli", *args, "--out", str(two)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    assert not list(two.glob("samples.rank*.jsonl"))  # merged, then removed
    ref = _records(one)
    assert len(ref) == 2 * 2 * 7  # systems x seeds x problems
    ours = _records(two)
    assert ours.keys() == ref.keys()  # nothing lost, nothing duplicated
    for key, r in ref.items():  # the same samples
        assert ours[key] == r, (key, {f: (v, ours[key].get(f)) for f, v in r.items() if ours[key].get(f) != v})
    assert _without_times(json.loads((two / RESULTS_FILE).read_text())) == \
        _without_times(json.loads((one / RESULTS_FILE).read_text()))
    assert done.stdout.count("results:") + done.stderr.count("results:") == 1  # only the main process reports


def test_merging_rank_logs_is_idempotent_and_repairs_a_cut_line(tmp_path):
    # A kill can leave rank logs (one with a cut-off last line), or records both merged and still in a rank log.
    def rec(i: int) -> dict:
        return {"system": "single", "task": "t", "seed": 0, "id": str(i), "correct": False}

    (tmp_path / SAMPLES_FILE).write_text("".join(json.dumps(rec(i)) + "\n" for i in (0, 1)))
    (tmp_path / "samples.rank0.jsonl").write_text(json.dumps(rec(1)) + "\n" + json.dumps(rec(2)) + "\n")
    (tmp_path / "samples.rank1.jsonl").write_text(json.dumps(rec(3)) + "\n" + json.dumps(rec(4))[:-5])
    log = merge_rank_logs(tmp_path)
    assert sorted(k[3] for k in log.samples) == ["0", "1", "2", "3"]
    assert not list(tmp_path.glob("samples.rank*.jsonl"))
    lines = (tmp_path / SAMPLES_FILE).read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == ["0", "1", "2", "3"]
    assert merge_rank_logs(tmp_path).samples == SampleLog(tmp_path / SAMPLES_FILE).samples  # nothing left to add

"""Trainer: gradient paths, equivalences, checkpoint/resume, distributed equivalence, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_backbone

from diffmas.adapters import LoraSettings, attach_lora, trainable_parameters
from diffmas.config import TrainConfig, load_config
from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.prompts import load_topology
from diffmas.rollout import RolloutSpec, rollout
from diffmas.train import loop
from diffmas.train.checkpoint import latest_checkpoint

PROMPTS = ["What is 3 + 4?", "Compute 12 - 5 + 1, please, showing nothing but the answer."]
TARGETS = ["Answer: 7", "Answer: 8"]
ROOT = Path(__file__).resolve().parents[1]


def _per_agent(backbone, dropout: float = 0.0):
    topo = load_topology("sequential")
    roles = attach_lora(backbone, LoraSettings(rank=4, dropout=dropout, layout="per-agent"),
                        [a.role for a in topo.agents])
    # B = 0 at init blocks every gradient but B's own; give B values so gradients reach A and upstream.
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    backbone.model.train()
    return RolloutSpec(topo, "latent", latent_steps=2, adapters=roles)


def _grads_by_role(backbone, spec, grad_mode: str, checkpoint: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    backbone.model.zero_grad(set_to_none=True)
    result = rollout(backbone, spec, PROMPTS, targets=TARGETS, grad_mode=grad_mode, checkpoint=checkpoint)
    result.loss.backward()
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in backbone.model.named_parameters():
        if "lora_" in name:
            role = name.split(".")[-2]
            grads.setdefault(role, {})[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return grads


def test_coupled_mode_reaches_every_writer_and_detached_reaches_none():
    backbone = make_backbone()
    spec = _per_agent(backbone)
    coupled = _grads_by_role(backbone, spec, "coupled")
    detached = _grads_by_role(backbone, spec, "detached")
    for agent in spec.topology.writers:
        assert all(g.abs().sum() > 0 for g in coupled[agent.role].values()), agent.role
        assert all(g.abs().sum() == 0 for g in detached[agent.role].values()), agent.role
    for mode in (coupled, detached):
        assert all(g.abs().sum() > 0 for g in mode["judger"].values())


def test_activation_checkpointing_gives_the_same_gradients():
    backbone = make_backbone()
    spec = _per_agent(backbone)
    plain = _grads_by_role(backbone, spec, "coupled")
    ckpt = _grads_by_role(backbone, spec, "coupled", checkpoint=True)
    for role in plain:
        for name in plain[role]:
            torch.testing.assert_close(ckpt[role][name], plain[role][name], rtol=1e-4, atol=1e-6)


def test_untrained_adapter_equals_latent_mas():
    backbone = make_backbone()
    topo = load_topology("sequential")
    cfg = DecodeConfig(max_new_tokens=8)
    base = rollout(backbone, RolloutSpec(topo, "latent", latent_steps=3), PROMPTS, decode_cfg=cfg)
    roles = attach_lora(backbone, LoraSettings(rank=4), [a.role for a in topo.agents])
    backbone.model.eval()
    fresh = rollout(backbone, RolloutSpec(topo, "latent", latent_steps=3, adapters=roles), PROMPTS, decode_cfg=cfg)
    assert fresh.tokens == base.tokens
    assert fresh.nll_sum == base.nll_sum


def test_steps_change_every_trainable_parameter_and_no_base_weight():
    backbone = make_backbone()
    topo = load_topology("sequential")
    roles = attach_lora(backbone, LoraSettings(rank=4, dropout=0.0, layout="per-agent"), [a.role for a in topo.agents])
    backbone.model.train()
    spec = RolloutSpec(topo, "latent", latent_steps=2, adapters=roles)
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable_parameters(backbone), lr=1e-2)
    # Two steps: with LoRA's B = 0 at init, A's gradient is exactly zero in the first step by construction.
    for _ in range(2):
        optimizer.zero_grad()
        rollout(backbone, spec, PROMPTS, targets=TARGETS, grad_mode="coupled").loss.backward()
        optimizer.step()
    for name, p in backbone.model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == ("lora_" in name), name


def _config_file(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    cfg = {"model": {"name": str(model_dir), "device": "cpu"}, "latent_steps": 1, "batch_size": 4, "steps": 6,
           "checkpoint_every": 2, "lr": 5e-3, "lora": {"rank": 4, "dropout": 0.0},
           "data": {"task": "rg:chain_sum", "heldout_examples": 8}}
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffmas.cli", "train", *args]


def _losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def _env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    config = _config_file(tmp_path, tiny_model_dir)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli("--config", str(config), "--out", str(full)), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_cli("--config", str(config), "--out", str(killed)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(killed) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(killed)
    assert ckpt is not None and ckpt.name != "step-000006", "the run must be killed before it finished"
    # Without --resume the existing run is protected.
    again = subprocess.run(_cli("--config", str(config), "--out", str(killed)), env=_env(), capture_output=True,
                           text=True)
    assert again.returncode != 0 and "--resume" in again.stderr
    subprocess.run(_cli("--config", str(config), "--out", str(killed), "--resume"), check=True, env=_env(),
                   capture_output=True)
    assert _losses(killed) == pytest.approx(_losses(full), rel=1e-6)
    assert len(_losses(killed)) == 6


def test_two_processes_follow_the_one_process_loss_curve(tmp_path, tiny_model_dir):
    one = tmp_path / "one"
    two = tmp_path / "two"
    config = _config_file(tmp_path, tiny_model_dir, steps=3, checkpoint_every=3, batch_size=4)
    subprocess.run(_cli("--config", str(config), "--out", str(one)), check=True, env=_env(), capture_output=True)
    # The shipped DDP config: torchrun-style processes, gloo on a machine without GPUs.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
              "-m", "diffmas.cli", "train", "--config", str(config), "--out", str(two), "--batch-size", "2"]
    done = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((two / "metrics.jsonl").read_text().splitlines()[1])["target_tokens"] == \
        json.loads((one / "metrics.jsonl").read_text().splitlines()[1])["target_tokens"]  # same global batch
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)


def test_training_lowers_heldout_loss(tmp_path, tiny_model_dir):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=25, checkpoint_every=25))
    summary = loop.train(cfg, tmp_path / "run")
    assert summary["heldout_loss_end"] < 0.7 * summary["heldout_loss_start"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=6, checkpoint_every=2))
    forward = loop.TrajectoryLoss.forward
    calls = {"n": 0}

    def poisoned(self, plan, n_tokens, n_rows):
        calls["n"] += 1
        loss, ce, distill = forward(self, plan, n_tokens, n_rows)
        return (loss * float("nan"), ce, distill) if calls["n"] == 3 else (loss, ce, distill)

    monkeypatch.setattr(loop.TrajectoryLoss, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(DiffMASError, match="non-finite loss .* step 3"):
        loop.train(cfg, out)
    assert latest_checkpoint(out).name == "step-000002"
    assert len(_losses(out)) == 2


def test_corrupt_checkpoint_is_refused_and_nothing_is_overwritten(tmp_path, tiny_model_dir):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=2, checkpoint_every=2))
    out = tmp_path / "run"
    loop.train(cfg, out)
    ckpt = latest_checkpoint(out)
    (ckpt / "lora.safetensors").write_bytes(b"not a safetensors file")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg_more = load_config(_config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2))
    with pytest.raises(DiffMASError, match="corrupt"):
        loop.train(cfg_more, out, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_invalid_config_names_the_field(tmp_path):
    with pytest.raises(DiffMASError, match="'lr'"):
        load_config(None, {"lr": "fast"})
    with pytest.raises(DiffMASError, match="'lora.layout'"):
        load_config(None, {"lora.layout": "everywhere"})
    with pytest.raises(DiffMASError, match="'grad_mode'"):
        load_config(None, {"grad_mode": "sideways"})
    with pytest.raises(DiffMASError, match="unknown config field"):
        load_config(None, {"data.tsk": "rg:chain_sum"})
    assert isinstance(load_config(None, {"steps": 3}), TrainConfig)

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

from diffmas.adapters import LoraSettings, attach_lora, load_adapters, trainable_parameters
from diffmas.backbone import load_backbone
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


def test_kv_only_reaches_the_writers_through_the_trace_but_not_through_the_fed_back_states():
    from diffmas.latent import PauseEmbedding, get_realigner

    backbone = make_backbone()
    spec = _per_agent(backbone)
    fed = []
    ridge = get_realigner(backbone)
    spy = RolloutSpec(spec.topology, "latent", latent_steps=2, adapters=spec.adapters,
                      latent_map=lambda hidden: fed.append(hidden.requires_grad) or ridge(hidden))
    kv_only = _grads_by_role(backbone, spy, "kv_only")
    assert fed and not any(fed)  # the map never sees a state that carries gradient
    fed.clear()
    coupled = _grads_by_role(backbone, spy, "coupled")
    assert fed and all(fed)
    # A writer's last layer reaches the reader only through the states it feeds back, except for that layer's keys
    # and values (in the trace): its q, o and MLP adapters get no gradient under kv_only, everything else does.
    last = f"layers.{backbone.lm.config.num_hidden_layers - 1}."
    for agent in spec.topology.writers:
        for name, g in kv_only[agent.role].items():
            fed_only = last in name and not any(k in name for k in ("k_proj", "v_proj"))
            assert (g.abs().sum() == 0) == fed_only, name
            assert coupled[agent.role][name].abs().sum() > 0, name
    # Where the map ignores the state (pause), no gradient ever took the fed-back path: the two modes agree.
    pause = RolloutSpec(spec.topology, "latent", latent_steps=2, adapters=spec.adapters,
                        latent_map=PauseEmbedding(backbone.lm.get_input_embeddings().weight[0]))
    both = _grads_by_role(backbone, pause, "coupled"), _grads_by_role(backbone, pause, "kv_only")
    for role in both[0]:
        for name in both[0][role]:
            torch.testing.assert_close(both[1][role][name], both[0][role][name], rtol=0, atol=0)


def test_a_gated_map_starts_as_pause_and_its_gate_opens_the_fed_back_path():
    from diffmas.latent import build_latent_map

    backbone = make_backbone()
    spec = _per_agent(backbone)
    pause, gated = build_latent_map(backbone, "pause"), build_latent_map(backbone, "gated")
    as_pause, as_gated = (RolloutSpec(spec.topology, "latent", latent_steps=2, adapters=spec.adapters, latent_map=m)
                          for m in (pause, gated))
    # Closed (its start): pause exactly, and no gradient takes the fed-back path; but the gate's own gradient is
    # not 0, so the task loss can open it.
    closed = _grads_by_role(backbone, as_gated, "coupled")
    assert gated.gate.grad is not None and float(gated.gate.grad) != 0
    for want in (_grads_by_role(backbone, as_pause, "coupled"), _grads_by_role(backbone, as_gated, "kv_only")):
        for role in closed:
            for name in closed[role]:
                torch.testing.assert_close(closed[role][name], want[role][name], rtol=0, atol=0)
    # Open: a writer's last-layer q, o and MLP adapters learn through the fed-back thought (kv_only cuts exactly that).
    with torch.no_grad():
        gated.gate.fill_(0.5)
    opened, cut = _grads_by_role(backbone, as_gated, "coupled"), _grads_by_role(backbone, as_gated, "kv_only")
    last = f"layers.{backbone.lm.config.num_hidden_layers - 1}."
    for agent in spec.topology.writers:
        fed_only = [n for n in opened[agent.role] if last in n and not any(k in n for k in ("k_proj", "v_proj"))]
        assert fed_only and all(cut[agent.role][n].abs().sum() == 0 < opened[agent.role][n].abs().sum()
                                for n in fed_only)


def test_a_gated_map_saves_and_loads_with_its_gate(tmp_path):
    from diffmas.latent import build_latent_map, load_latent_map, save_latent_map, set_gate

    backbone = make_backbone()
    gated = build_latent_map(backbone, "gated")
    with torch.no_grad():
        gated.gate.fill_(0.25)
        gated.embedding.add_(0.1)
    assert save_latent_map(gated, tmp_path) == "gated"
    loaded = load_latent_map(backbone, "gated", tmp_path)
    assert loaded.gate.item() == 0.25 and torch.equal(loaded.embedding, gated.embedding)
    hidden = torch.randn(3, backbone.lm.config.hidden_size)
    torch.testing.assert_close(loaded(hidden), gated(hidden), rtol=0, atol=0)
    # Closed in the saved folder (the study's evaluation without the thought): the trained embedding alone.
    set_gate(tmp_path, 0.0)
    closed = load_latent_map(backbone, "gated", tmp_path)
    torch.testing.assert_close(closed(hidden), gated.embedding.expand(3, -1), rtol=0, atol=0)
    pause = tmp_path / "pause"
    pause.mkdir()
    save_latent_map(build_latent_map(backbone, "pause"), pause)
    with pytest.raises(DiffMASError, match="no gated latent map"):
        set_gate(pause, 0.0)


def test_activation_checkpointing_gives_the_same_gradients():
    backbone = make_backbone()
    spec = _per_agent(backbone)
    # Count forwards of the first decoder layer (forward pass and backward pass together): checkpointing
    # recomputes every agent call in backward, so it must run exactly twice as often as without.
    layer = next(m for n, m in backbone.model.named_modules() if n.endswith("layers.0"))
    calls = {"n": 0}
    layer.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    plain = _grads_by_role(backbone, spec, "coupled")
    plain_calls, calls["n"] = calls["n"], 0
    ckpt = _grads_by_role(backbone, spec, "coupled", checkpoint=True)
    assert plain_calls > 0 and calls["n"] == 2 * plain_calls
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
    # No weight decay: AdamW's default (0.01) would change every A by decay alone, so only gradients may.
    optimizer = torch.optim.AdamW(trainable_parameters(backbone), lr=1e-2, weight_decay=0.0)
    # Two steps: with LoRA's B = 0 at init, A's gradient is exactly zero in the first step by construction.
    for _ in range(2):
        optimizer.zero_grad()
        rollout(backbone, spec, PROMPTS, targets=TARGETS, grad_mode="coupled").loss.backward()
        optimizer.step()
    for name, p in backbone.model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == ("lora_" in name), name


def test_a_detached_writer_with_its_own_adapter_leaves_training_untrained(tmp_path, tiny_model_dir):
    # The relay study's frozen arm: only the reader learns; the writer must stay the base model (LoRA B = 0).
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=3, checkpoint_every=3, grad_mode="detached",
                                   lora={"rank": 4, "dropout": 0.0, "layout": "per-agent"}))
    loop.train(cfg, tmp_path / "run")
    backbone = load_backbone(str(tiny_model_dir))
    roles = load_adapters(backbone, tmp_path / "run")
    topo = load_topology(cfg.topology)
    moved = {role: sum(float(p.abs().sum()) for n, p in backbone.model.named_parameters()
                       if "lora_B" in n and n.endswith(f".{adapter}.weight")) for role, adapter in roles.items()}
    assert moved[topo.writers[0].role] == 0 and moved[topo.final.role] > 0


def _config_file(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    # duo (two agents) keeps these trainer-mechanics runs short; gradient paths are tested on sequential above.
    cfg = {"model": {"name": str(model_dir), "device": "cpu"}, "topology": "duo", "latent_steps": 1, "batch_size": 4, "steps": 6,
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
    # The demo's LoRA dropout: resuming must restore the dropout RNG, not only the weights and optimizer.
    config = _config_file(tmp_path, tiny_model_dir, lora={"rank": 4, "dropout": 0.05})
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


def test_a_signal_stops_after_its_step_with_a_checkpoint_and_resume_goes_on(tmp_path, tiny_model_dir):
    """SIGTERM (or Ctrl-C) mid-run: the step in progress finishes, a checkpoint is written there although none was
    due (checkpoint_every > steps), the command says how to go on, and --resume ends where an unstopped run ends."""
    config = _config_file(tmp_path, tiny_model_dir, steps=30, checkpoint_every=100)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    subprocess.run(_cli("--config", str(config), "--out", str(full)), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_cli("--config", str(config), "--out", str(stopped)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = stopped / "metrics.jsonl", time.time() + 120
    while (not metrics.exists() or metrics.read_text().count('"loss"') < 2) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpt = latest_checkpoint(stopped)
    assert ckpt is not None and int(ckpt.name[5:]) < 30, "the run must be stopped before it finished"
    assert len(_losses(stopped)) == int(ckpt.name[5:])  # the checkpoint is at the last step logged
    assert ckpt.name in err and "--resume" in err
    subprocess.run(_cli("--config", str(config), "--out", str(stopped), "--resume"), check=True, env=_env(),
                   capture_output=True)
    assert _losses(stopped) == pytest.approx(_losses(full), rel=1e-6)


def test_stop_requests_record_the_first_signal_and_let_the_second_through():
    from diffmas.train.interrupt import StopRequests

    # Python's usual handler, whatever this process inherited (a shell's background job starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequests() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.signum == signal.SIGINT  # recorded, nothing raised: the step goes on
            with pytest.raises(KeyboardInterrupt):  # asked twice: the usual effect, at once
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_train_says_which_arithmetic_it_trained_in(tmp_path, tiny_model_dir, one_thread):
    """`mixed_precision: auto` resolves per machine (bf16 autocast on a CPU with avx512_bf16): the command's last
    line names what the run computed in, as its adapters record it."""
    from typer.testing import CliRunner

    from diffmas.adapters import read_adapter_meta
    from diffmas.cli import app

    config = _config_file(tmp_path, tiny_model_dir, steps=1, checkpoint_every=1)
    for setting in ("no", "auto"):
        out = tmp_path / setting
        result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(out), "--mixed-precision",
                                          setting], terminal_width=300)
        assert result.exit_code == 0, result.output
        resolved = read_adapter_meta(out)["mixed_precision"]
        assert resolved in ("no", "bf16") and (setting == "auto" or resolved == "no")
        name = "float32" if resolved == "no" else "bf16 autocast"
        assert f"trained in {name} (mixed_precision: {setting})" in " ".join(result.output.split())


def _grad_norms(out: Path) -> list[float]:
    return [json.loads(l)["grad_norm"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in l]


def test_two_processes_follow_the_one_process_loss_curve(tmp_path, tiny_model_dir):
    one = tmp_path / "one"
    two = tmp_path / "two"
    config = _config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2, batch_size=4)
    subprocess.run(_cli("--config", str(config), "--out", str(one)), check=True, env=_env(), capture_output=True)

    def launch(out: Path, *extra: str) -> None:
        # The shipped DDP config: torchrun-style processes, gloo on a machine without GPUs.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
               "-m", "diffmas.cli", "train", "--config", str(config), "--out", str(out), "--batch-size", "2", *extra]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    launch(two)
    assert json.loads((two / "metrics.jsonl").read_text().splitlines()[1])["target_tokens"] == \
        json.loads((one / "metrics.jsonl").read_text().splitlines()[1])["target_tokens"]  # same global batch
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    # The gradients too, not only the loss: a process whose gradients were not averaged (or were scaled
    # wrongly) can still report the right loss.
    assert len(_grad_norms(two)) == 4 and _grad_norms(two) == pytest.approx(_grad_norms(one), rel=1e-4)
    # A 1-process checkpoint resumed by 2 processes at the same global batch continues the same curve.
    mixed = _resume_copy(one, tmp_path / "mixed", 2)
    launch(mixed, "--resume")
    assert _losses(mixed) == pytest.approx(_losses(one), rel=1e-4)
    assert _grad_norms(mixed) == pytest.approx(_grad_norms(one), rel=1e-4)


def test_training_lowers_heldout_loss(tmp_path, tiny_model_dir):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=25, checkpoint_every=25))
    summary = loop.train(cfg, tmp_path / "run")
    assert summary["heldout_loss_end"] < 0.7 * summary["heldout_loss_start"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=6, checkpoint_every=2))
    forward = loop.TrajectoryLoss.forward
    calls = {"n": 0}

    def poisoned(self, plan, norm=None, heldout=False):
        if heldout:
            return forward(self, plan, heldout=True)
        calls["n"] += 1
        loss, sums = forward(self, plan, norm)
        return (loss * float("nan"), sums) if calls["n"] == 3 else (loss, sums)

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
    # An unquoted `no` in YAML arrives as False: the error says why, not only that a string was expected.
    (tmp_path / "bf.yaml").write_text("mixed_precision: no\n")
    with pytest.raises(DiffMASError, match="'mixed_precision' must be str, got False .*quote"):
        load_config(tmp_path / "bf.yaml")


def _resume_copy(src: Path, dst: Path, step: int) -> Path:
    """A copy of finished run ``src`` as if it had been killed right after checkpoint ``step``."""
    import shutil

    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dst / name).unlink(missing_ok=True)
    return dst


def test_resume_with_dropout_is_exact_in_process(tmp_path, tiny_model_dir):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2,
                                   lora={"rank": 4, "dropout": 0.05}))
    loop.train(cfg, tmp_path / "full")
    resumed = _resume_copy(tmp_path / "full", tmp_path / "resumed", 2)
    torch.manual_seed(12345)  # whatever the RNG holds before, the checkpoint's state is restored
    loop.train(cfg, resumed, resume=True)
    assert _losses(resumed) == _losses(tmp_path / "full")


def test_resume_keeps_the_global_batch_whatever_its_split(tmp_path, tiny_model_dir):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2))
    loop.train(cfg, tmp_path / "full")
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state == {"step": 2, "data_position": 8, "num_processes": 1, "mixed_precision": "no"}
    # Same global batch (4 = 2 x 2 micro-batches): allowed, and the curve continues (same data order).
    split = _resume_copy(tmp_path / "full", tmp_path / "split", 2)
    loop.train(load_config(_config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2, batch_size=2,
                                        grad_accum=2)), split, resume=True)
    assert _losses(split) == pytest.approx(_losses(tmp_path / "full"), rel=1e-5)
    # A different global batch would silently skip examples: refused in one line, before anything is written.
    other = _resume_copy(tmp_path / "full", tmp_path / "other", 2)
    snapshot = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with pytest.raises(DiffMASError, match=r"global batch of 4 .* this run's is 2") as err:
        loop.train(load_config(_config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2, batch_size=2)),
                   other, resume=True)
    assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == snapshot


def test_resume_refuses_another_precision_than_the_checkpoint_trained_under(tmp_path, tiny_model_dir):
    # mixed_precision 'auto' resolves per machine (bf16 where the CPU has it natively): the same config resumed on
    # another machine would change precision mid-run. Simulated: a checkpoint written under bf16, resumed in fp32.
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2))
    loop.train(cfg, tmp_path / "full")
    other = _resume_copy(tmp_path / "full", tmp_path / "other", 2)
    state_file = other / "checkpoints" / "step-000002" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "mixed_precision": "bf16"}))
    snapshot = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with pytest.raises(DiffMASError, match=r"trained under mixed precision 'bf16', this run would compute under "
                                           r"'no'.*set mixed_precision: bf16") as err:
        loop.train(cfg, other, resume=True)
    assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == snapshot


def test_missing_rng_file_is_an_error_unless_the_process_count_changed(tmp_path, tiny_model_dir):
    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2))
    loop.train(cfg, tmp_path / "full")
    missing = _resume_copy(tmp_path / "full", tmp_path / "missing", 2)
    (missing / "checkpoints" / "step-000002" / "rng-0.pt").unlink()
    with pytest.raises(DiffMASError, match="rng-0.pt"):
        loop.train(cfg, missing, resume=True)
    # Written by 2 processes at batch 2 (the same global batch of 4): resumable, with a loud warning.
    moved = _resume_copy(tmp_path / "full", tmp_path / "moved", 2)
    state_file = moved / "checkpoints" / "step-000002" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "num_processes": 2}))
    (moved / "checkpoints" / "step-000002" / "rng-0.pt").rename(moved / "checkpoints" / "step-000002" / "rng-1.pt")
    with pytest.warns(UserWarning, match="written by 2 process.* this run has 1"):
        loop.train(cfg, moved, resume=True)
    assert _losses(moved) == pytest.approx(_losses(tmp_path / "full"), rel=1e-5)  # dropout 0: same curve


def test_fsdp2_heldout_checkpoint_and_adapters_on_two_cpu_processes(tmp_path):
    """FSDP2 (fully_shard over gloo, 2 CPU processes; accelerate itself offers FSDP only on GPUs): held-out loss
    through the wrapped forward, a step that trains the shards, full tensors in checkpoints and adapters, a
    resharded load, one shared realignment. See tests/fsdp2_worker.py."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp2_worker.py"), str(tmp_path / "out")]
    done = subprocess.run(cmd, env={**_env(), "DIFFMAS_HOME": str(tmp_path / "home")}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("FSDP2 OK") == 2


def test_jsonl_rows_that_are_evaluation_questions_are_dropped(tmp_path, capsys):
    from diffmas.tasks import get_task
    from diffmas.train.data import build_datasets

    leaked = get_task("gsm8k").load()[0].question
    rows = [{"question": f"How many apples are {i} apples plus {i + 2} apples?", "target": f"Answer: {2 * i + 2}"}
            for i in range(6)] + [{"question": "  " + leaked + "\n", "target": "Answer: 18"}]  # whitespace differs
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"data.task": "gsm8k", "data.source": str(source), "data.heldout_examples": 2})
    train, heldout = build_datasets(cfg, 3)  # held-out rows are disjoint from training ones: leave some
    assert len(train) == 3 and len(heldout) == 2
    assert not any(leaked in ex.prompt for ex in train + heldout)
    assert "dropped 1 of 7 rows" in capsys.readouterr().out


def test_demo_reuses_only_adapters_with_the_same_config(tmp_path, monkeypatch):
    from diffmas.experiments import demo
    from diffmas.adapters import META_FILE
    from diffmas.config import save_config

    wanted = demo.DemoConfig().train_config("diffmas")
    out = tmp_path / "diffmas"
    out.mkdir()
    (out / META_FILE).write_text("{}")
    save_config(wanted, out / "config.yaml")
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("must not train again"))
    assert demo.train_once(wanted, out) == out  # same config: reused
    other = demo.DemoConfig(steps=7).train_config("diffmas")
    with pytest.raises(DiffMASError, match="different config.*delete that folder or choose another output"):
        demo.train_once(other, out)


def test_demo_train_config_file_is_the_demo(tmp_path):
    from diffmas.config import to_dict
    from diffmas.experiments.demo import DemoConfig

    shipped = load_config(ROOT / "configs" / "train" / "demo.yaml")
    assert to_dict(shipped) == to_dict(DemoConfig().train_config("diffmas"))  # the file is the demo's one source
    assert shipped.mixed_precision == "auto"
    assert DemoConfig(steps=7).train_config("single_sft").steps == 7


def test_demo_single_sft_trains_without_the_channel_settings(tmp_path, monkeypatch):
    # A demo file with a relay channel (trace scope, bottleneck curriculum) configures diffmas; single_sft, one agent
    # that sees the whole question, trains from the same file without them (anneal would make its config invalid).
    from diffmas.experiments import demo

    relay = tmp_path / "demo.yaml"
    relay.write_text((ROOT / "configs" / "train" / "demo.yaml").read_text()
                     + "trace: latents\nchannel:\n  anneal: 0.3\n")
    monkeypatch.setattr(demo, "DEMO_CONFIG", relay)
    diffmas = demo.DemoConfig().train_config("diffmas")
    assert (diffmas.trace, diffmas.channel.anneal) == ("latents", 0.3)
    single = demo.DemoConfig().train_config("single_sft")
    assert (single.system, single.trace, single.channel.anneal) == ("single_sft", None, 0.0)


@pytest.mark.parametrize("latent_map", ["ridge", "pause", "gated"])
def test_an_exported_checkpoint_is_the_run_as_it_stood_at_that_step(tmp_path, tiny_model_dir, latent_map):
    from safetensors.torch import load_file

    from diffmas.adapters import read_adapter_meta
    from diffmas.backbone import load_backbone
    from diffmas.systems import build_system
    from diffmas.train.export import export_checkpoint

    cfg = load_config(_config_file(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2, latent_map=latent_map))
    run = tmp_path / "run"
    loop.train(cfg, run)
    last, early = export_checkpoint(run, tmp_path / "last"), export_checkpoint(run, tmp_path / "early", step=2)
    weights = {name: load_file(str(folder / "adapter_model.safetensors")) for name, folder in
               (("run", run), ("last", last), ("early", early))}
    assert weights["last"].keys() == weights["run"].keys()
    assert all(torch.equal(weights["last"][k], weights["run"][k]) for k in weights["run"])
    assert any(not torch.equal(weights["early"][k], weights["run"][k]) for k in weights["run"])
    meta = read_adapter_meta(last)
    assert {k: v for k, v in meta.items() if k != "rebuild"} == {
        k: v for k, v in read_adapter_meta(run).items() if k != "rebuild"}
    assert read_adapter_meta(early)["steps"] == 2

    def answers(folder):
        backbone = load_backbone(str(tiny_model_dir), "cpu")
        return build_system("diffmas", backbone, adapter=str(folder)).run(PROMPTS, DecodeConfig(max_new_tokens=6))

    assert [r["answer"] for r in answers(last)] == [r["answer"] for r in answers(run)]
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    if latent_map == "gated":  # the gate's value at every step, moved off 0 by training
        assert len(steps) == 4 and all("gate" in r for r in steps) and steps[-1]["gate"] != 0
    else:
        assert not any("gate" in r for r in steps)
    with pytest.raises(DiffMASError, match="no checkpoint at step 3; it has steps 2, 4"):
        export_checkpoint(run, tmp_path / "none", step=3)

"""One arm of the relay study (:mod:`diffmas.experiments.relay`, which plans them): its training config, its
training and test evaluation, the readings of its channel (linear probes and the logit lens over training, for a
trained latents-only digits arm) and the record ``docs/arms/<id>.json`` that marks it finished."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from diffmas.config import load_config, to_dict
from diffmas.errors import DiffMASError
from diffmas.experiments.presets import machine_description, train_once
from diffmas.experiments.relay import DIGITS, TEXT, Arm, RelayConfig, arm_settings, continued_from
from diffmas.experiments.relay_controls import CONTROLS_RUN, GATE_CLOSED, SHUFFLED_THOUGHT
from diffmas.experiments.workers import code_version
from diffmas.train.resume import INHERITED


def train_config(arm: Arm, cfg: RelayConfig, device: str = "cpu"):
    system, changes = arm_settings(arm.name, cfg)
    steps = changes.pop("latent_steps", arm.latent_steps or cfg.latent_steps)
    overrides = {
        "system": system, "latent_steps": steps, "steps": cfg.max_steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "seed": arm.seed, "checkpoint_every": cfg.eval_every, "eval_every": cfg.eval_every,
        "mixed_precision": cfg.mixed_precision, "model.name": cfg.model, "model.device": device,
        "data.task": arm.task, "data.heldout_examples": cfg.heldout, "stop.enabled": True,
        "stop.min_steps": cfg.min_steps, "lora.rank": 16, "lora.alpha": 32, **changes,
    }
    if system != "diffmas":
        overrides = {k: v for k, v in overrides.items() if k not in ("trace", "latent_steps")}
    return load_config(None, overrides)


def _evaluate(arm: Arm, adapter: Path | None, out: Path, cfg: RelayConfig, device: str, **options) -> dict:
    """The arm's test items (``options``: run_eval's, e.g. a control's ``shuffle_thought``)."""
    from diffmas.eval.runner import run_eval

    system, _ = arm_settings(arm.name, cfg)
    m = arm.latent_steps or cfg.latent_steps
    extra = {}
    if system in TEXT:  # the final agent sees only the writer's message of m (or 4m) tokens
        extra = dict(trace="latents", writer_max_new_tokens=m * (4 if arm.name.endswith("_4m") else 1))
    entry = f"{arm.label}={system}" + (f":{adapter}" if adapter else "")
    return run_eval([entry], [arm.task], out, model=cfg.model, limit=cfg.n_eval, batch_size=cfg.eval_batch_size,
                    max_new_tokens=cfg.max_new_tokens, device=device, show_progress=True, **extra, **options)


def probed(arm: Arm, cfg: RelayConfig) -> bool:
    """Whether an arm's channel is probed: a trained latents-only channel on the digits (the ladder's task)."""
    system, changes = arm_settings(arm.name, cfg)
    m = changes.get("latent_steps", arm.latent_steps or cfg.latent_steps)
    return bool(cfg.probe_items) and arm.task == DIGITS and system == "diffmas" and changes.get("trace") == "latents" \
        and m > 0


def probe_arm(arm: Arm, run: Path, cfg: RelayConfig, docs: Path, device: str) -> None:
    """Probe a trained arm's channel (:mod:`diffmas.eval.probe`) into ``docs/probes/<id>.json``, then read its
    logit lens over training (:mod:`diffmas.eval.lens_curve`) into ``docs/lens/curves/<id>.json`` and a plot."""
    from diffmas.backbone import load_backbone
    from diffmas.eval.lens_curve import chosen_steps, lens_curve, plot_lens_curve
    from diffmas.eval.probe import probe_channel, save_probe
    from diffmas.systems import build_system
    from diffmas.tasks import get_task
    from diffmas.train.checkpoint import checkpoints

    task = get_task(arm.task)
    system = build_system("diffmas", load_backbone(cfg.model, device), adapter=str(run))
    started = time.time()
    probes = probe_channel(system, task, n=cfg.probe_items)
    save_probe(docs / "probes" / f"{arm.id}.json", probes, dict(
        system="diffmas", adapter=str(run), task=arm.task, latent_steps=system.spec.latent_steps, trace="latents",
        model=cfg.model, n=cfg.probe_items, seed=0, seconds=round(time.time() - started)))
    if cfg.lens_items and checkpoints(run):
        curve = docs / "lens" / "curves" / f"{arm.id}.json"
        try:
            read = lens_curve(run, task, curve, chosen_steps(run, cfg.lens_every), n=cfg.lens_items, device=device)
        except DiffMASError as err:  # a reading beside the result: it must not cost the arm its record
            print(f"[study] {arm.id}: no lens curve: {err}", flush=True)
            return
        plot_lens_curve(read, curve.with_suffix(".png"), ("1", "2"), title=f"logit lens over training: {arm.id}")


def gated(arm: Arm, cfg: RelayConfig) -> bool:
    """Whether an arm feeds its latent positions through a gated map (``--latent-map gated``)."""
    return arm_settings(arm.name, cfg)[1].get("latent_map") == "gated"


def thinks(arm: Arm, cfg: RelayConfig) -> bool:
    """Whether a trained latents-only arm's writer feeds its latent positions thoughts (a map of its state: not
    pause's one embedding, and m > 0): the arms whose thoughts the shuffled-thought control can swap."""
    system, changes = arm_settings(arm.name, cfg)
    m = changes.get("latent_steps", arm.latent_steps or cfg.latent_steps)
    return system == "diffmas" and changes.get("trace") == "latents" and changes.get("latent_map") != "pause" \
        and m > 0


def _evaluate_control(arm: Arm, adapter: Path, control: str, cfg: RelayConfig, out: Path, docs: Path,
                      device: str, **options) -> dict:
    """The test items again under a control into ``docs/<control>/<id>.jsonl``; its n, accuracy and stderr."""
    folder = out / "eval" / f"{arm.id}--{control}" / "eval"
    result = _evaluate(arm, adapter, folder, cfg, device, **options)["results"][0]
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    gold = {s["id"]: s["gold"] for s in samples}
    (docs / control).mkdir(parents=True, exist_ok=True)
    (docs / control / f"{arm.id}.jsonl").write_text("".join(json.dumps(
        {**_kept(s), "seconds": s["seconds"], **({"gold": s["gold"], "thought_from": s["thought_from"],
                                                     "thought_gold": gold[s["thought_from"]]}
                                                  if "thought_from" in s else {})}) + "\n" for s in samples))
    return {k: result[k] for k in ("n", "accuracy", "stderr")}


def evaluate_gate_closed(arm: Arm, run: Path, cfg: RelayConfig, out: Path, docs: Path, device: str) -> dict:
    """Evaluate a gated arm's test items again with its gate set to 0 (every position fed pause's trained embedding
    alone; adapters as trained): whether its reader takes the answer from the writer's thought."""
    from diffmas.latent import set_gate

    adapter = out / "eval" / f"{arm.id}--{GATE_CLOSED}" / "adapter"
    if not adapter.is_dir():  # built aside and renamed: a copy whose gate is still open is never evaluated
        building = adapter.with_name("adapter.partial")
        shutil.rmtree(building, ignore_errors=True)
        shutil.copytree(run, building, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
        set_gate(building, 0.0)
        building.rename(adapter)
    return _evaluate_control(arm, adapter, GATE_CLOSED, cfg, out, docs, device)


def evaluate_shuffled_thought(arm: Arm, run: Path, cfg: RelayConfig, out: Path, docs: Path, device: str) -> dict:
    """Evaluate an arm's test items again with each writer prefilling its own item but fed, at its latent steps,
    the thoughts it computed on another item (a seeded derangement): whether the reader answers from the thoughts'
    content (the other item's answer, ``thought_gold``) or from what the latent positions read of the prompt."""
    return _evaluate_control(arm, run, SHUFFLED_THOUGHT, cfg, out, docs, device, shuffle_thought=True)


def channel_seconds(docs: Path, arm_id: str) -> float | None:
    """Seconds spent reading an arm's channel after its evaluation: its probe, its lens curve and its controls'
    evaluations (gate closed, shuffled thought; None: none of them)."""
    probe, curve = docs / "probes" / f"{arm_id}.json", docs / "lens" / "curves" / f"{arm_id}.json"
    spent = [json.loads(probe.read_text())["settings"].get("seconds", 0.0)] if probe.is_file() else []
    if curve.is_file():
        spent.append(sum(point.get("seconds", 0.0) for point in json.loads(curve.read_text())["points"]))
    for control in (docs / c / f"{arm_id}.jsonl" for c in CONTROLS_RUN):
        if control.is_file():
            spent.append(sum(json.loads(line).get("seconds", 0.0) for line in control.read_text().splitlines()))
    return sum(spent) if spent else None


def kv_bytes_per_position(model: str) -> int:
    """Bytes of K and V that one trace position holds over all layers, in float32 (what the reader attends to)."""
    from transformers import AutoConfig

    from diffmas.assets import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * 4


def _kept(sample: dict) -> dict:
    """What the study keeps of an evaluated item: its outcome, and for a text channel the writers' messages (what
    crossed the channel, so a failure can be told apart as the writer's or the reader's)."""
    kept = {k: sample[k] for k in ("id", "correct", "extracted", "trace_tokens")}
    messages = [a["text"] for a in sample["agents"][:-1] if a.get("text") is not None]
    return {**kept, "messages": messages} if messages else kept


def _inherited(metrics: list[dict]) -> dict | None:
    """Which run a run's first steps were copied from, and how many (None: it trained every step itself)."""
    copied = [m for m in metrics if INHERITED in m]
    return {"run": copied[-1][INHERITED], "steps": copied[-1]["step"]} if copied else None


def _precision(run: Path | None) -> str | None:
    """The precision a trained run computed in, as resolved on its machine (saved with its adapters)."""
    from diffmas.adapters import read_adapter_meta

    return None if run is None else read_adapter_meta(run).get("mixed_precision")


def run_arm(arm: Arm, cfg: RelayConfig, out: Path, docs: Path, device: str = "cpu") -> dict:
    """Train (unless a text arm) and evaluate one arm; writes docs/arms/<id>.json, its samples and its curve."""
    system, _ = arm_settings(arm.name, cfg)
    started = time.time()
    tcfg = run = None
    parent = continued_from(arm)
    if system not in TEXT:
        tcfg = train_config(arm, cfg, device)
        run = train_once(tcfg, out / "runs" / arm.id, continue_from=parent and out / "runs" / parent.id)
    train_s = time.time() - started
    adapter = out / "runs" / Arm("skyline", arm.task, arm.seed).id if system == "text_sft" else run
    results = _evaluate(arm, adapter, out / "eval" / arm.id, cfg, device)
    result = results["results"][0]
    samples = [json.loads(line) for line in (out / "eval" / arm.id / "samples.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if run else []
    held = [m for m in metrics if "heldout_loss" in m]
    positions = sum(s["trace_tokens"] for s in samples) / len(samples)
    record = {
        "arm": arm.name, "task": arm.task, "seed": arm.seed, "phase": arm.phase, "system": system,
        "label": arm.label, "latent_steps": arm.latent_steps or cfg.latent_steps, "n": result["n"],
        "accuracy": result["accuracy"], "stderr": result["stderr"], "floor": result.get("floor"),
        "format_failures": result.get("format_failures"), "tokens_mean": result.get("tokens_mean"),
        "positions_passed": positions, "kv_bytes_passed": positions * kv_bytes_per_position(cfg.model),
        "steps_trained": held[-1]["step"] if held else 0,
        "stopped_early": bool(metrics and metrics[-1].get("stopped_early")),
        "heldout_loss_end": held[-1]["heldout_loss"] if held else None,
        "continued_from": _inherited(metrics), "mixed_precision": _precision(run),
        # Summed over the samples, so an evaluation resumed by another process counts the time of every process.
        "train_seconds": round(train_s), "eval_seconds": round(sum(s["seconds"] for s in samples)),
        "config": to_dict(tcfg) if tcfg else results["config"]["systems"][0]["settings"],
        "machine": machine_description(), "date": time.strftime("%Y-%m-%d"), "code": code_version(),
    }
    for sub in ("arms", "curves", "samples"):
        (docs / sub).mkdir(parents=True, exist_ok=True)
    if run:
        (docs / "curves" / f"{arm.id}.jsonl").write_text((run / "metrics.jsonl").read_text())
    (docs / "samples" / f"{arm.id}.jsonl").write_text("".join(json.dumps(_kept(s)) + "\n" for s in samples))
    if run and probed(arm, cfg):  # before the record: a worker killed in between probes again on resume
        probe_arm(arm, run, cfg, docs, device)
    if run and gated(arm, cfg):
        record["gate_closed"] = evaluate_gate_closed(arm, run, cfg, out, docs, device)
    if run and thinks(arm, cfg):
        record["shuffled_thought"] = evaluate_shuffled_thought(arm, run, cfg, out, docs, device)
    (docs / "arms" / f"{arm.id}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record



"""Grounded latent training: curriculum segments, distillation, learned link, pause control, single-agent
latent arm, shuffled-trace control, and the errors a bad method setting gives before any training."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_backbone

from diffmas.adapters import LoraSettings, attach_lora
from diffmas.config import TrainConfig, load_config
from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.eval.runner import run_eval, trace_partners
from diffmas.kv import Trace
from diffmas.latent import LearnedLink, build_latent_map, get_realigner, take_latent_steps
from diffmas.prompts import DUO, SINGLE, render_agent, render_target
from diffmas.agent_call import answer_predictor_index
from diffmas.rollout import RolloutSpec, rollout
from diffmas.systems import build_system
from diffmas.train import loop
from diffmas.train.data import TrainExample, split_worked
from diffmas.train.link import pretrain_link
from diffmas.train.objectives import (StepNorm, base_stage, curriculum_stage, distill_distance, plan_norm, plan_step,
                                      starts_new_stage, step_loss)

PROMPTS = ["What is 3 + 4 + 5?", "Compute 12 - 5 + 1 - 2."]
WORKED = ["3 + 4 = 7\n7 + 5 = 12\nAnswer: 12", "12 - 5 = 7\n7 + 1 = 8\n8 - 2 = 6\nAnswer: 6"]


def _trained(backbone, topology=DUO, layout="shared"):
    roles = attach_lora(backbone, LoraSettings(rank=4, dropout=0.0, layout=layout), [a.role for a in topology.agents])
    with torch.no_grad():  # B = 0 at init would block gradients to A and upstream
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    backbone.model.train()
    return roles


def _curriculum_cfg(**changes) -> TrainConfig:
    base = {"method": "curriculum", "data.target_style": "worked", "latent_steps": 4, "steps": 40,
            "curriculum.stages": 2, "curriculum.thoughts_per_step": 2, "curriculum.stage_steps": 10}
    return load_config(None, {**base, **changes})


@torch.no_grad()
def _reference_segment_loss(backbone, spec, prompt: str, steps: int, text: str, answer: str) -> float:
    """Summed CE of one row, built by hand from the trace primitives, without padding or batching."""
    tok = backbone.tokenizer
    writer, final = spec.topology.agents
    ids = torch.tensor([render_agent(tok, writer, prompt)])
    trace, hidden = Trace.empty(1, "cpu").extend(backbone.body, torch.ones_like(ids), input_ids=ids)
    trace, last, _ = take_latent_steps(backbone, trace, hidden[:, -1], steps, get_realigner(backbone))
    total = 0.0
    if text:
        forced = torch.tensor([render_target(tok, text)])
        trace, fh = trace.extend(backbone.body, torch.ones_like(forced), input_ids=forced)
        pred = torch.cat([last[:, None], fh[:, :-1]], 1)[0]
        total += float(F.cross_entropy(backbone.logits(pred), forced[0], reduction="sum"))
    prompt_ids = render_agent(tok, final, prompt)
    target = render_target(tok, answer)
    ids = torch.tensor([prompt_ids + target])
    _, hidden = trace.extend(backbone.body, torch.ones_like(ids), input_ids=ids)
    pred = hidden[0, len(prompt_ids) - 1: -1]
    return total + float(F.cross_entropy(backbone.logits(pred), torch.tensor(target), reduction="sum"))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_curriculum_stage_segment_holds_s_times_c_latents_then_the_remaining_steps(stage):
    cfg = _curriculum_cfg()
    backbone = make_backbone()
    roles = _trained(backbone)
    spec = RolloutSpec(DUO, "latent", latent_steps=4, adapters=roles)
    examples = [TrainExample(p, w) for p, w in zip(PROMPTS, WORKED)]
    plan = plan_step(cfg, stage * 10, examples, DUO)  # mixin draws may pick an earlier stage: pin it
    plan = plan.__class__(plan.prompts, plan.targets,
                          ["\n".join(ex.steps[stage:]) if stage < 2 else "" for ex in examples], stage * 2, stage)
    backbone.model.eval()
    with torch.no_grad():
        result = rollout(backbone, spec, plan.prompts, targets=plan.targets, thinker_texts=plan.thinker_texts,
                         thinker_latent_steps=plan.thinker_latent_steps)
    tok = backbone.tokenizer
    writer = result.agents[0]
    assert writer.latent_steps == stage * 2
    for row, ex in enumerate(examples):
        text = "\n".join(ex.steps[stage:]) if stage < 2 else ""
        written = len(render_target(tok, text)) if text else 0
        assert result.trace_tokens[row] == writer.prompt_tokens[row] + stage * 2 + written
    # The loss covers the remaining steps and the answer, nothing else, and matches a hand-built row.
    expected_tokens = sum(len(render_target(tok, t)) for t in plan.thinker_texts if t) + \
        sum(len(render_target(tok, a)) for a in plan.targets)
    assert result.target_tokens == expected_tokens
    reference = sum(_reference_segment_loss(backbone, spec, p, stage * 2, t, a)
                    for p, t, a in zip(plan.prompts, plan.thinker_texts, plan.targets))
    assert float(result.loss) * result.target_tokens == pytest.approx(reference, rel=1e-4)


def test_curriculum_schedule_mixin_and_optimizer_reset_points():
    cfg = _curriculum_cfg(**{"curriculum.mixin": 0.5})
    assert [base_stage(s, cfg) for s in (0, 9, 10, 19, 20, 39)] == [0, 0, 1, 1, 2, 2]
    stages = [curriculum_stage(s, cfg) for s in range(40)]
    assert stages == [curriculum_stage(s, cfg) for s in range(40)]  # seeded: a resumed run replays them
    assert all(st <= base_stage(s, cfg) for s, st in enumerate(stages))
    assert any(st < base_stage(s, cfg) for s, st in enumerate(stages))  # earlier stages are mixed in
    assert stages[:10] == [0] * 10
    assert [s for s in range(40) if starts_new_stage(s, cfg)] == [10, 20]
    plan = plan_step(_curriculum_cfg(**{"curriculum.mixin": 0.0}), 25,
                     [TrainExample(p, w) for p, w in zip(PROMPTS, WORKED)], DUO)
    assert plan.stage == 2 and plan.thinker_latent_steps == 4 and plan.thinker_texts == ["", ""]
    assert plan.targets == ["Answer: 12", "Answer: 6"]


def test_split_worked():
    assert split_worked(WORKED[0]) == (("3 + 4 = 7", "7 + 5 = 12"), "Answer: 12")
    assert split_worked("Answer: 5") == ((), "Answer: 5")


def test_distillation_term_is_zero_when_states_agree_and_its_gradient_follows_the_grad_mode():
    states = tuple(torch.randn(2, 8) for _ in range(3))
    assert torch.all(distill_distance(states, states, ()) == 0)
    assert torch.all(distill_distance(tuple(s + 1 for s in states), states, ()) > 0)
    with pytest.raises(DiffMASError, match="distill.layers"):
        distill_distance(states, states, (7,))
    cfg = load_config(None, {"method": "distill", "data.target_style": "worked", "latent_steps": 2,
                             "distill.weight": 1.0, "distill.teacher_weight": 0.0})
    examples = [TrainExample(p, w) for p, w in zip(PROMPTS, WORKED)]
    plan = plan_step(cfg, 0, examples, DUO)
    assert plan.teacher_texts == ["3 + 4 = 7\n7 + 5 = 12", "12 - 5 = 7\n7 + 1 = 8\n8 - 2 = 6"]
    for mode in ("coupled", "detached"):
        backbone = make_backbone()
        topo = DUO
        roles = _trained(backbone, topo, layout="per-agent")
        spec = RolloutSpec(topo, "latent", latent_steps=2, adapters=roles)
        # Only the distillation term: zero CE weight is reached by dividing the CE by a huge token count.
        loss, sums = step_loss(backbone, spec, replace(cfg, grad_mode=mode), plan, StepNorm(10**12, 2))
        assert float(sums[1]) > 0
        loss.backward()
        writer = [p.grad for n, p in backbone.model.named_parameters() if "lora_" in n and ".reasoner." in n]
        reaches = any(g is not None and g.abs().sum() > 0 for g in writer)
        assert reaches == (mode == "coupled"), mode


def test_distillation_trains_the_teacher_on_its_own_worked_text_and_answer():
    """CODI's teacher CE: with it, the teacher pass (worked text, no latent steps) is trained on its own target;
    without it, nothing anchors the teacher (the study's first distillation arm collapsed)."""
    examples = [TrainExample(p, w) for p, w in zip(PROMPTS, WORKED)]
    grads = {}
    for alpha in (0.0, 1.0):
        cfg = load_config(None, {"method": "distill", "data.target_style": "worked", "latent_steps": 2,
                                 "distill.weight": 0.0, "distill.teacher_weight": alpha})
        plan = plan_step(cfg, 0, examples, DUO)
        backbone = make_backbone()
        roles = _trained(backbone, DUO, layout="per-agent")
        spec = RolloutSpec(DUO, "latent", latent_steps=2, adapters=roles)
        norm = plan_norm(backbone, spec, plan)
        # The teacher's CE covers the writer's worked text and the final agent's answer.
        assert norm.teacher_tokens == sum(len(render_target(backbone.tokenizer, t)) for t in plan.teacher_texts) + \
            sum(len(render_target(backbone.tokenizer, t)) for t in plan.targets)
        loss, sums = step_loss(backbone, spec, cfg, plan, replace(norm, tokens=10**12))  # student CE weight ~0
        assert float(sums[2]) > 0
        loss.backward()
        grads[alpha] = {role: sum(float(p.grad.abs().sum()) for n, p in backbone.model.named_parameters()
                                  if "lora_" in n and f".{role}." in n and p.grad is not None)
                        for role in ("reasoner", DUO.final.role)}
    assert all(g < 1e-6 for g in grads[0.0].values()), grads
    assert all(g > 1e-3 for g in grads[1.0].values()), grads


def test_answer_predictor_index_points_at_the_colon():
    tok = make_backbone().tokenizer
    text = "7 + 5 = 12\nAnswer: 12"
    ids = render_target(tok, text)
    index = answer_predictor_index(tok, text)
    assert tok.decode(ids[: index + 1]).endswith("Answer:")
    with pytest.raises(DiffMASError, match="Answer:"):
        answer_predictor_index(tok, "12")


def test_pause_control_fills_the_same_positions_without_thought_content():
    backbone = make_backbone()
    pause = build_latent_map(backbone, "pause")
    cfg = DecodeConfig(max_new_tokens=4)
    latent = rollout(backbone, RolloutSpec(DUO, "latent", latent_steps=3), PROMPTS, decode_cfg=cfg)
    paused = rollout(backbone, RolloutSpec(DUO, "latent", latent_steps=3, latent_map=pause), PROMPTS, decode_cfg=cfg)
    assert paused.trace_tokens == latent.trace_tokens
    h = torch.randn(2, backbone.lm.config.hidden_size)
    assert torch.equal(pause(h), pause(torch.randn_like(h)))  # no content from the hidden state
    assert pause(h).norm(dim=-1).allclose(torch.tensor(get_realigner(backbone).target_norm))


def test_untrained_link_is_the_ridge_map_and_pretraining_lowers_its_loss():
    backbone = make_backbone()
    link = build_latent_map(backbone, "link")
    assert isinstance(link, LearnedLink)
    h = torch.randn(4, backbone.lm.config.hidden_size)
    torch.testing.assert_close(link(h), get_realigner(backbone)(h))
    losses = pretrain_link(backbone, link, ["3 + 4 = 7\nAnswer: 7", "12 - 5 = 7\n7 + 1 = 8"] * 4, steps=30,
                           lr=1e-2, batch_size=4, show_progress=False)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_single_latent_final_agent_thinks_then_answers_and_is_batch_invariant():
    backbone = make_backbone(dtype=torch.float64)
    spec = RolloutSpec(SINGLE, "latent", latent_steps=0, final_latent_steps=3)
    cfg = DecodeConfig(max_new_tokens=5)
    full = rollout(backbone, spec, PROMPTS, decode_cfg=cfg)
    assert full.agents[-1].latent_steps == 3
    for i, prompt in enumerate(PROMPTS):
        alone = rollout(backbone, spec, [prompt], decode_cfg=cfg)
        assert alone.tokens[0] == full.tokens[i]
        assert alone.nll_sum[0] == pytest.approx(full.nll_sum[i], abs=1e-9)
    none = rollout(backbone, RolloutSpec(SINGLE, "latent", latent_steps=0), PROMPTS, decode_cfg=cfg)
    assert none.nll_sum != full.nll_sum  # the latent steps are in the final agent's context


def test_shuffled_trace_pairs_each_question_with_another_questions_trace(tmp_path, tiny_model_dir):
    partners = trace_partners(7, seed=3)
    assert sorted(partners) == list(range(7)) and all(p != i for i, p in enumerate(partners))
    backbone = make_backbone()
    system = build_system("latent_mas", backbone, topology="duo", latent_steps=2)
    cfg = DecodeConfig(max_new_tokens=6)
    swapped = system.run(PROMPTS, cfg, writer_prompts=PROMPTS[::-1])
    for i in range(2):  # question i, answered with the trace the writers wrote for the other question
        direct = rollout(backbone, system.spec, [PROMPTS[i]], decode_cfg=cfg, writer_prompts=[PROMPTS[1 - i]])
        assert swapped[i]["answer"] == direct.texts[0]
        assert swapped[i]["agents"][0]["prompt_tokens"] == len(render_agent(backbone.tokenizer, DUO.writers[0],
                                                                            PROMPTS[1 - i]))
    results = run_eval(["latent_mas"], ["rg:chain_sum"], tmp_path / "eval", model=str(tiny_model_dir), limit=4,
                       max_new_tokens=3, topology="duo", latent_steps=1, device="cpu", show_progress=False,
                       shuffle_trace=True)
    samples = [json.loads(l) for l in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert results["config"]["shuffle_trace"] is True
    assert all(s["trace_from"] != s["id"] for s in samples)
    assert sorted(s["trace_from"] for s in samples) == sorted(s["id"] for s in samples)


def _write_config(tmp_path: Path, model_dir: Path, **overrides) -> TrainConfig:
    cfg = {"model": {"name": str(model_dir), "device": "cpu"}, "topology": "duo", "latent_steps": 2,
           "batch_size": 2, "steps": 4, "checkpoint_every": 2, "lr": 5e-3, "lora": {"rank": 4, "dropout": 0.05},
           "data": {"task": "rg:chain_sum", "heldout_examples": 4, "target_style": "worked"}}
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_curriculum_with_learned_link_trains_resumes_exactly_and_reloads(tmp_path, tiny_model_dir):
    cfg = _write_config(tmp_path, tiny_model_dir, method="curriculum", latent_map="link", steps=4,
                        **{"curriculum.stages": 1, "curriculum.thoughts_per_step": 2, "curriculum.stage_steps": 2, "curriculum.mixin": 0.0,
                           "link.pretrain_steps": 3})
    loop.train(cfg, tmp_path / "full")
    metrics = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("stage") for m in metrics[1:]] == [0, 0, 1, 1]
    short = _write_config(tmp_path, tiny_model_dir, method="curriculum", latent_map="link", steps=4,
                          **{"curriculum.stages": 1, "curriculum.thoughts_per_step": 2, "curriculum.stage_steps": 2, "curriculum.mixin": 0.0,
                             "link.pretrain_steps": 3})
    # Interrupt after the step-2 checkpoint by training a copy of the same run to 2 steps, then resume to 4.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for extra in ("checkpoints/step-000004", "adapter_model.safetensors", "diffmas_adapters.json",
                  "latent_map.safetensors"):
        target = tmp_path / "resumed" / extra
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "resumed" / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    loop.train(short, tmp_path / "resumed", resume=True)
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6)
    meta = json.loads((tmp_path / "full" / "diffmas_adapters.json").read_text())
    assert meta["method"] == "curriculum" and meta["latent_map"] == "link" and meta["latent_steps"] == 2
    from diffmas.backbone import load_backbone

    system = build_system("diffmas", load_backbone(str(tiny_model_dir), "cpu"), adapter=str(tmp_path / "full"))
    assert isinstance(system.spec.latent_map, LearnedLink) and system.spec.latent_steps == 2
    fresh = build_latent_map(system.backbone, "link")  # the trained link differs from a fresh (ridge-equal) one
    assert not torch.equal(system.spec.latent_map.down.weight, fresh.down.weight)


def test_single_latent_distillation_and_pause_runs_train(tmp_path, tiny_model_dir):
    loop.train(_write_config(tmp_path, tiny_model_dir, system="single_latent", method="distill", steps=2),
               tmp_path / "sl")
    metrics = [json.loads(l) for l in (tmp_path / "sl" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["distill"] > 0 and metrics[1]["ce"] > 0
    loop.train(_write_config(tmp_path, tiny_model_dir, latent_map="pause", steps=2), tmp_path / "pause")
    from diffmas.backbone import load_backbone

    system = build_system("diffmas", load_backbone(str(tiny_model_dir), "cpu"), adapter=str(tmp_path / "pause"))
    assert system.spec.latent_map.__class__.__name__ == "PauseEmbedding"
    single = build_system("single_latent", load_backbone(str(tiny_model_dir), "cpu"), adapter=str(tmp_path / "sl"))
    assert single.spec.final_latent_steps == 2 and not single.spec.topology.writers


def test_bad_method_settings_fail_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(DiffMASError, match="'method' must be one of"):
        load_config(None, {"method": "telepathy"})
    with pytest.raises(DiffMASError, match="target_style: worked"):
        load_config(None, {"method": "curriculum", "latent_steps": 6, "steps": 200})
    with pytest.raises(DiffMASError, match="single_latent"):
        load_config(None, {"method": "distill", "system": "single_sft", "data.target_style": "worked"})
    # products has no worked solutions: the error comes before the (missing) model is even looked for.
    cfg = load_config(None, {"method": "distill", "data.target_style": "worked", "data.task": "rg:products",
                             "model.name": str(tmp_path / "no-such-model"), "model.device": "cpu", "steps": 2,
                             "batch_size": 2, "data.heldout_examples": 2})
    with pytest.warns(UserWarning), pytest.raises(DiffMASError, match="needs worked solutions"):
        loop.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_one_process_trains_runs_with_different_mixed_precision(tmp_path, tiny_model_dir):
    # The demo and the study train several runs in one process; accelerate's state must not leak between them.
    loop.train(_write_config(tmp_path, tiny_model_dir, steps=1, mixed_precision="bf16"), tmp_path / "bf16")
    loop.train(_write_config(tmp_path, tiny_model_dir, steps=1, mixed_precision="no"), tmp_path / "fp32")
    assert (tmp_path / "fp32" / "diffmas_adapters.json").is_file()

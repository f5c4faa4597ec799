"""Engine details that depend on the model or the chat template (issue 9): thinking switch, Gemma's embedding
scale, model-specific logits, the position limit, trace keep/drop, text writers' sampling, realignment precision,
and the CLI flags that expose them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHATML, VOCAB, make_backbone, make_tokenizer, tiny_config
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaForCausalLM,
)
from typer.testing import CliRunner

from diffmas.backbone import Backbone
from diffmas.cli import app
from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.latent import LearnedLink, get_realigner
from diffmas.prompts import DUO, SINGLE, Agent, Topology, render_agent
from diffmas.rollout import RolloutSpec, rollout
from diffmas.systems import build_system

QUESTIONS = ["What is 2 + 2?", "Name a prime number larger than ten."]
TWO = Topology("two", (Agent("writer", "You write.", "Think."), Agent("reader", "You read.", "Answer.")))

# Qwen3's switch: enable_thinking=False pre-fills an empty thinking block; left undefined, the model thinks.
THINKING_TEMPLATE = CHATML + (
    "{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
)


def _thinking_backbone() -> Backbone:
    bb = make_backbone()
    bb.tokenizer.chat_template = THINKING_TEMPLATE
    return bb


# 1. thinking mode


def test_render_agent_switches_thinking_off_by_default():
    tok = make_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    off = tok.decode(render_agent(tok, SINGLE.final, "Q"))
    on = tok.decode(render_agent(tok, SINGLE.final, "Q", think=True))
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    plain = make_tokenizer()  # a template without the switch renders the same either way
    assert render_agent(plain, SINGLE.final, "Q", think=True) == render_agent(plain, SINGLE.final, "Q")


def test_rollout_spec_think_reaches_every_agent():
    bb = _thinking_backbone()
    cfg = DecodeConfig(max_new_tokens=2)
    off = rollout(bb, RolloutSpec(TWO, "latent", 1), QUESTIONS[:1], decode_cfg=cfg)
    on = rollout(bb, RolloutSpec(TWO, "latent", 1, think=True), QUESTIONS[:1], decode_cfg=cfg)
    block = len("<think>\n\n</think>\n\n")  # one byte-level token per character
    assert [a.prompt_tokens[0] - b.prompt_tokens[0] for a, b in zip(off.agents, on.agents)] == [block, block]


def test_trained_adapter_renders_prompts_as_it_was_trained(tmp_path):
    from diffmas.adapters import LoraSettings, attach_lora, save_adapters

    bb = make_backbone()
    settings = LoraSettings(rank=2)
    attach_lora(bb, settings, ["solver"])
    save_adapters(bb, tmp_path, {"solver": "default"}, settings, extra={"system": "single_sft", "think": True})
    assert build_system("single_sft", make_backbone(), adapter=str(tmp_path)).spec.think is True
    assert build_system("single", make_backbone(), think=False).spec.think is False


# 2. Gemma's embedding scale


def test_latent_inputs_get_gemma_scaled_embedding_norm():
    bb = make_backbone("gemma3")
    embed = bb.lm.get_input_embeddings()
    produced = embed(torch.arange(VOCAB)).norm(dim=-1).mean()
    raw = embed.weight.norm(dim=-1).mean()
    assert torch.isclose(produced, raw * 64 ** 0.5, rtol=1e-3)  # Gemma scales token embeddings by sqrt(hidden)
    realigner = get_realigner(bb)
    assert realigner.target_norm == pytest.approx(float(produced.detach()), rel=1e-5)
    out = realigner(torch.randn(3, 64))
    assert torch.allclose(out.norm(dim=-1), produced.expand(3), rtol=1e-4)
    # The body does not scale inputs_embeds again: feeding the module's output equals feeding the ids.
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        by_ids = bb.body(input_ids=ids).last_hidden_state
        by_embeds = bb.body(inputs_embeds=embed(ids)).last_hidden_state
    assert torch.allclose(by_ids, by_embeds, atol=1e-5)


# 3. model-specific logits


def _tiny(model_cls, config_cls, **extra) -> Backbone:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, eos_token_id=256, pad_token_id=257,
                  initializer_range=0.3)
    torch.manual_seed(0)
    return Backbone(model_cls(config_cls(**common, **extra)).eval(), make_tokenizer(), "tiny")


@pytest.mark.parametrize("name", ["gemma2", "granite", "cohere"])
def test_logits_equal_the_models_own_forward(name):
    if name == "gemma2":  # a small cap, so the soft-capping visibly bends the logits
        bb = _tiny(Gemma2ForCausalLM, Gemma2Config, head_dim=16, query_pre_attn_scalar=16, sliding_window=256,
                   final_logit_softcapping=0.5)
    elif name == "granite":
        bb = _tiny(GraniteForCausalLM, GraniteConfig, logits_scaling=4.0, embedding_multiplier=3.0)
    else:
        bb = _tiny(CohereForCausalLM, CohereConfig, logit_scale=0.25)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        ref = bb.lm(input_ids=ids).logits
        ours = bb.logits(bb.body(input_ids=ids).last_hidden_state)
        head_only = bb.lm.get_output_embeddings()(bb.body(input_ids=ids).last_hidden_state)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(head_only, ref, atol=1e-3)  # the check is not vacuous


# 4. position limit


def _short_backbone(max_positions: int) -> Backbone:
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.max_position_embeddings = max_positions
    return Backbone(LlamaForCausalLM(config).eval(), make_tokenizer(), "tiny-short")


def test_a_segment_past_max_positions_is_a_clear_error(monkeypatch):
    bb = _short_backbone(200)
    writer_len = len(render_agent(bb.tokenizer, TWO.writers[0], QUESTIONS[0]))
    reader_len = len(render_agent(bb.tokenizer, TWO.final, QUESTIONS[0]))
    assert writer_len + 2 + reader_len < 200
    spec = RolloutSpec(TWO, "latent", 2)
    rollout(bb, spec, QUESTIONS[:1], decode_cfg=DecodeConfig(max_new_tokens=1))  # fits
    with pytest.raises(DiffMASError, match=r"agent 'writer'.*max_position_embeddings \(200\)"):
        rollout(bb, RolloutSpec(TWO, "latent", 200 - writer_len + 1), QUESTIONS[:1],
                decode_cfg=DecodeConfig(max_new_tokens=1))
    # Decoding: the reader's answer would pass the limit at one precise token, and not one token earlier (the
    # last chosen token is not run through the model, so room + 1 tokens fit).
    monkeypatch.setattr(Backbone, "eos_ids", property(lambda self: set()))
    room = 200 - writer_len - 2 - reader_len
    ok = rollout(bb, spec, QUESTIONS[:1], decode_cfg=DecodeConfig(max_new_tokens=room + 1))
    assert len(ok.tokens[0]) == room + 1
    with pytest.raises(DiffMASError, match=r"^agent 'reader': .*would need 201 positions, more than the model's "
                                           r"max_position_embeddings \(200\)$"):
        rollout(bb, spec, QUESTIONS[:1], decode_cfg=DecodeConfig(max_new_tokens=room + 2))


# 5. trace keep | drop


def test_trace_drop_leaves_out_writers_without_latent_steps(backbone):
    cfg = DecodeConfig(max_new_tokens=4)
    keep = rollout(backbone, RolloutSpec(TWO, "latent", 0), QUESTIONS, decode_cfg=cfg)
    drop = rollout(backbone, RolloutSpec(TWO, "latent", 0, trace="drop"), QUESTIONS, decode_cfg=cfg)
    alone = rollout(backbone, RolloutSpec(Topology("one", (TWO.final,)), "latent", 0), QUESTIONS, decode_cfg=cfg)
    assert keep.trace_tokens == [len(render_agent(backbone.tokenizer, TWO.writers[0], q)) for q in QUESTIONS]
    assert drop.trace_tokens == [0, 0]
    assert drop.tokens == alone.tokens and drop.nll_sum == pytest.approx(alone.nll_sum, abs=1e-6)
    assert keep.nll_sum != pytest.approx(drop.nll_sum)
    assert drop.agents[0].prompt_tokens == [0, 0] and drop.agents[0].latent_steps == 0
    # With latent steps both modes are the same computation.
    a = rollout(backbone, RolloutSpec(TWO, "latent", 2), QUESTIONS, decode_cfg=cfg)
    b = rollout(backbone, RolloutSpec(TWO, "latent", 2, trace="drop"), QUESTIONS, decode_cfg=cfg)
    assert a.tokens == b.tokens and a.trace_tokens == b.trace_tokens and a.nll_sum == b.nll_sum
    with pytest.raises(DiffMASError, match="trace must be one of"):
        RolloutSpec(TWO, trace="nope")


# 6. text writers decode with the evaluation's sampling settings


def test_text_writers_sample_with_the_evaluation_settings(backbone):
    spec = RolloutSpec(DUO, "text", writer_max_new_tokens=12)

    def writer_text(cfg: DecodeConfig) -> str:
        return rollout(backbone, spec, QUESTIONS[:1], decode_cfg=cfg).agents[0].texts[0]

    greedy = writer_text(DecodeConfig(max_new_tokens=2))
    assert writer_text(DecodeConfig(max_new_tokens=2, seed=5)) == greedy  # greedy: the seed changes nothing
    sampled = {seed: writer_text(DecodeConfig(max_new_tokens=2, temperature=1.5, seed=seed)) for seed in range(3)}
    assert writer_text(DecodeConfig(max_new_tokens=2, temperature=1.5, seed=0)) == sampled[0]  # reproducible
    assert len(set(sampled.values())) > 1 and greedy not in sampled.values()
    # Two text writers get different random streams (same prompt, same sampling settings).
    twin = Topology("twin", (Agent("a", "S.", "I.", reads_trace=False), Agent("b", "S.", "I.", reads_trace=False),
                             Agent("c", "S.", "Answer.")))
    out = rollout(backbone, RolloutSpec(twin, "text", writer_max_new_tokens=12), QUESTIONS[:1],
                  decode_cfg=DecodeConfig(max_new_tokens=2, temperature=1.5, seed=0))
    assert out.agents[0].texts != out.agents[1].texts


# 7. realignment precision


def test_realignment_runs_in_float32_under_autocast():
    bb = make_backbone(tied=False)
    realigner = get_realigner(bb)
    link = LearnedLink(realigner, 64)
    torch.nn.init.normal_(link.down.weight, std=0.1)
    torch.manual_seed(3)
    for hidden in (torch.randn(4, 64) * 5, (torch.randn(4, 64) * 5).bfloat16()):
        for latent_map in (realigner, link):
            with torch.no_grad():
                expected = latent_map(hidden.float()).to(hidden.dtype)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    got = latent_map(hidden)
            assert got.dtype == hidden.dtype
            assert torch.equal(got, expected)


# 8. command-line flags


@pytest.mark.parametrize("command", ["run", "eval"])
def test_cli_flags_in_help(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0
    text = result.output
    assert "--no-no-realign" not in text
    for flag in ("--realign", "--no-realign", "--think", "--no-think", "--trace"):
        assert flag in text, flag
    assert "token budget" in text  # why thinking is off by default


def test_eval_cli_records_the_engine_settings(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--systems", "latent_mas", "--task", "rg:chain_sum", "--limit", "2", "--max-new-tokens", "2",
            "--latent-steps", "0", "--topology", "duo", "--device", "cpu", "--no-progress", "--model",
            str(tiny_model_dir), "--out", str(out), "--no-realign", "--think", "--trace", "drop"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["realign"], config["think"], config["trace"]) == (False, True, "drop")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["trace_tokens"] for s in samples] == [0, 0]
    # Resuming with another engine setting is refused.
    again = CliRunner().invoke(app, args[:-1] + ["keep"])
    assert again.exit_code == 2 and "'trace': 'drop'" in again.output and "'trace': 'keep'" in again.output


def test_eval_folders_from_before_the_settings_resume(tiny_model_dir, tmp_path):
    from diffmas.eval.runner import run_eval

    def legacy_run(model_dir, out):
        kw = dict(model=str(model_dir), limit=2, max_new_tokens=2, topology="duo", latent_steps=1, device="cpu",
                  show_progress=False)
        run_eval(["latent_mas"], ["rg:chain_sum"], out, **kw)
        path = out / "results.json"
        results = json.loads(path.read_text())
        for key in ("realign", "think", "trace"):  # a folder written before these were recorded
            del results["config"][key]
        path.write_text(json.dumps(results))
        return lambda: run_eval(["latent_mas"], ["rg:chain_sum"], out, **kw)

    resume = legacy_run(tiny_model_dir, tmp_path / "plain")
    assert resume()["config"]["think"] is False  # no thinking switch in the template: same prompts, resumes
    thinking_dir = tmp_path / "thinking-model"
    bb = make_backbone()
    bb.lm.save_pretrained(thinking_dir)
    bb.tokenizer.chat_template = THINKING_TEMPLATE
    bb.tokenizer.save_pretrained(thinking_dir)
    resume = legacy_run(thinking_dir, tmp_path / "thinking")
    with pytest.raises(DiffMASError, match="think: None -> False"):  # prompts were rendered thinking: no resume
        resume()

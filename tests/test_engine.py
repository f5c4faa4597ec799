"""Correctness core of the inference engine, on tiny random models built from configs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_backbone

from diffmas.adapters import LoraSettings, attach_lora
from diffmas.decode import DecodeConfig, decode
from diffmas.kv import Trace
from diffmas.positions import left_pad
from diffmas.latent import get_realigner, solve_realignment
from diffmas.prompts import SINGLE, Agent, Topology, load_topology, render_agent
from diffmas.rollout import RolloutSpec, rollout
from diffmas.systems import SYSTEMS

QUESTIONS = [
    "What is 2 + 2?",
    "A much longer question: a farmer has 17 cows, 3 dogs and 12 chickens; how many legs are on the farm in total?",
    "Hi",
    "Sort these numbers: 5, 3, 9, 1.",
]
ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


def _randomize_lora(backbone, seed: int = 1) -> None:
    # LoRA B starts at zero (a no-op); give it values so adapters actually change the computation.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def generated(ref: list[int], eos: set[int]) -> list[int]:
    """What ``generate`` produced for one row: everything up to and including its first end token (the
    padding after it is not output), so a decode that stopped early or late does not match."""
    for i, tok in enumerate(ref):
        if tok in eos:
            return ref[: i + 1]
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_matches_generate(arch):
    bb = make_backbone(arch)
    seqs = [render_agent(bb.tokenizer, SINGLE.final, q) for q in QUESTIONS]
    ids, mask = left_pad(seqs, bb.pad_id, bb.device)
    with torch.no_grad():
        trace, hidden = Trace.empty(len(seqs), bb.device).extend(bb.body, mask, input_ids=ids)
        ours = decode(bb, trace, hidden[:, -1], DecodeConfig(max_new_tokens=12))
        ref = bb.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             eos_token_id=256, pad_token_id=257)
    for row, tokens in enumerate(ours.tokens):
        assert tokens == generated(ref[row, ids.shape[1]:].tolist(), {256})


def _spec_for(system: str, topology: str, backbone) -> RolloutSpec:
    kind = SYSTEMS[system]
    topo = load_topology(topology) if kind.multi_agent else SINGLE
    adapters = None
    if kind.trained:
        roles = attach_lora(backbone, LoraSettings(rank=4, layout="per-agent"), [a.role for a in topo.agents])
        _randomize_lora(backbone)
        adapters = roles
    return RolloutSpec(topo, kind.writer_mode, 3 if kind.multi_agent else 0, writer_max_new_tokens=6,
                       adapters=adapters)


@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("topology", ["sequential", "hierarchical"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batch_size_one_equals_batch_size_n(system, topology, arch):
    # float64: latent steps iterate a map that amplifies float32 rounding (1e-7 -> 1e-3 after a few agents with
    # strong random adapters), which would force a loose tolerance; in float64 padding must change nothing.
    bb = make_backbone(arch, dtype=torch.float64)
    spec = _spec_for(system, topology, bb)
    cfg = DecodeConfig(max_new_tokens=8)
    full = rollout(bb, spec, QUESTIONS, decode_cfg=cfg)
    for i, q in enumerate(QUESTIONS):
        alone = rollout(bb, spec, [q], decode_cfg=cfg)
        assert alone.tokens[0] == full.tokens[i]
        assert alone.trace_tokens[0] == full.trace_tokens[i]
        # NLL of the chosen tokens is sensitive to every logit, not just the argmax.
        assert alone.nll_sum[0] == pytest.approx(full.nll_sum[i], rel=1e-9, abs=1e-9)
    assert len({tuple(t) for t in full.tokens}) > 1 or arch == "gemma3"  # the check is not vacuous


def test_latent_steps_zero_keeps_the_trace(backbone):
    topo = Topology("two", (Agent("writer", "You write.", "Think."), Agent("reader", "You read.", "Answer.")))
    spec = RolloutSpec(topo, "latent", latent_steps=0)
    result = rollout(backbone, spec, QUESTIONS[:2], decode_cfg=DecodeConfig(max_new_tokens=4))
    writer_prompt = [len(render_agent(backbone.tokenizer, topo.writers[0], q)) for q in QUESTIONS[:2]]
    assert result.trace_tokens == writer_prompt

    # The reader really attends to that KV: changing only the writer's prompt changes the reader's output.
    other = Topology("two", (Agent("writer", "You are someone else entirely.", "Think."), topo.final))
    changed = rollout(backbone, RolloutSpec(other, "latent", latent_steps=0), QUESTIONS[:2],
                      decode_cfg=DecodeConfig(max_new_tokens=4))
    single = rollout(backbone, RolloutSpec(Topology("one", (topo.final,)), "latent", 0), QUESTIONS[:2],
                     decode_cfg=DecodeConfig(max_new_tokens=4))
    assert changed.nll_sum != pytest.approx(result.nll_sum)
    assert single.nll_sum != pytest.approx(result.nll_sum)


def test_hierarchical_workers_do_not_see_each_other(backbone):
    topo = load_topology("hierarchical")
    cfg = DecodeConfig(max_new_tokens=2)
    full = rollout(backbone, RolloutSpec(topo, "latent", latent_steps=2), QUESTIONS[:1], decode_cfg=cfg)
    sizes = [len(render_agent(backbone.tokenizer, a, QUESTIONS[0])) + 2 for a in topo.writers]
    assert full.trace_tokens == [sum(sizes)]

    def code_segment(math_system: str, code_reads_trace: bool) -> list[torch.Tensor]:
        # Same-length text keeps every position identical, so any difference can only come from attention.
        math = Agent("math", math_system, topo.agents[0].instruction, reads_trace=False)
        code = Agent("code", topo.agents[2].system, topo.agents[2].instruction, reads_trace=code_reads_trace)
        team = Topology("t", (math, topo.agents[1], code, topo.final))
        out = rollout(backbone, RolloutSpec(team, "latent", latent_steps=2), QUESTIONS[:1], decode_cfg=cfg,
                      keep_trace=True)
        return [v[..., -sizes[2]:, :] for v in out.trace.values]

    original = topo.agents[0].system
    other = "Z" * len(original)
    for a, b in zip(code_segment(original, False), code_segment(other, False)):
        assert torch.equal(a, b)
    changed = [not torch.equal(a, b) for a, b in zip(code_segment(original, True), code_segment(other, True))]
    assert changed[-1]  # a worker that reads the trace does see the math worker


def test_realignment_normal_equations_and_tied_identity():
    torch.manual_seed(0)
    w_out, w_in = torch.randn(300, 32), torch.randn(300, 32)
    ridge = 1e-3
    w_a = solve_realignment(w_out, w_in, ridge).float()
    lhs = (w_out.T @ w_out + ridge * torch.eye(32)) @ w_a
    assert torch.allclose(lhs, w_out.T @ w_in, atol=1e-3)
    tied = solve_realignment(w_in, w_in, 1e-5)
    assert torch.allclose(tied, torch.eye(32, dtype=tied.dtype), atol=1e-4)
    assert not torch.allclose(w_a, torch.eye(32), atol=1e-1)


def test_realigner_rescales_to_embedding_norm_and_is_cached(backbone, tmp_path):
    realigner = get_realigner(backbone)
    assert get_realigner(backbone) is realigner
    hidden = torch.randn(3, backbone.lm.config.hidden_size, device=backbone.device) * 50
    out = realigner(hidden)
    target = backbone.lm.get_input_embeddings().weight.norm(dim=-1).mean()
    assert torch.allclose(out.norm(dim=-1), target.expand(3), rtol=1e-4)
    cached = list((tmp_path / "home" / "realign").glob("*.pt"))
    assert len(cached) == 1
    off = get_realigner(backbone, enabled=False)
    assert off.matrix is None and torch.allclose(off(hidden).norm(dim=-1), target.expand(3), rtol=1e-4)


def test_text_writers_put_their_reply_in_the_trace(backbone):
    topo = load_topology("sequential")
    spec = RolloutSpec(topo, "text", writer_max_new_tokens=5)
    result = rollout(backbone, spec, QUESTIONS[:2], decode_cfg=DecodeConfig(max_new_tokens=3))
    for i, q in enumerate(QUESTIONS[:2]):
        prompts = sum(len(render_agent(backbone.tokenizer, a, q)) for a in topo.writers)
        generated = sum(rec.generated_tokens[i] for rec in result.agents[:-1])
        assert 0 < generated <= 15
        assert result.trace_tokens[i] == prompts + generated


def test_sampling_is_seeded(backbone):
    spec = RolloutSpec(SINGLE, "latent", 0)
    cfg = DecodeConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    a = rollout(backbone, spec, QUESTIONS[:2], decode_cfg=cfg)
    b = rollout(backbone, spec, QUESTIONS[:2], decode_cfg=cfg)
    # Only the seed differs: a sampler that ignored it (or a fixed generator) would give c == a.
    c = rollout(backbone, spec, QUESTIONS[:2], decode_cfg=replace(cfg, seed=4))
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_strings_cut_the_reply(backbone):
    spec = RolloutSpec(SINGLE, "latent", 0)
    free = rollout(backbone, spec, QUESTIONS[:1], decode_cfg=DecodeConfig(max_new_tokens=10))
    stop = free.texts[0][3:5]
    assert stop
    cut = rollout(backbone, spec, QUESTIONS[:1], decode_cfg=DecodeConfig(max_new_tokens=10, stop=(stop,)))
    assert stop not in cut.texts[0] and free.texts[0].startswith(cut.texts[0])
    assert len(cut.tokens[0]) < len(free.tokens[0])


def test_every_cache_api_use_lives_in_kv():
    """The transformers Cache API (cache classes, cache_utils, past_key_values, cache=/use_cache=/cache_position
    arguments) is used only in the diffmas/kv package, so a transformers upgrade has one place to check."""
    import re
    from pathlib import Path

    import diffmas

    pattern = re.compile(r"\b(\w+Cache|\w+Layer\b(?=.*cache)|cache_utils|past_key_values?|use_cache|cache_position)\b"
                         r"|\bCache\s*[(\[),:=|]|import .*\bCache\b|\bcache\s*=(?!=)")
    root = Path(diffmas.__file__).parent
    files = sorted(root.rglob("*.py"))
    offenders = [f"{path.relative_to(root.parent)}:{lineno}: {line.strip()}"
                 for path in files if root / "kv" not in path.parents
                 for lineno, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
    assert all(pattern.search((root / "kv" / f).read_text()) for f in ("cache.py", "attention.py", "trace.py"))
    assert len(files) > 10

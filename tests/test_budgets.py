"""Per-role budgets (latent steps and token budgets per agent in the topology), text_mas's context limit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone

from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.prompts import Agent, Topology, load_topology, render_agent
from diffmas.rollout import RolloutSpec, rollout

QUESTIONS = ["What is 2 + 2?", "A longer question: a farmer has 17 cows and 3 dogs; how many legs?", "Hi"]


def _team(first: dict, second: dict, final: dict) -> Topology:
    return Topology("team", (Agent("a", "You are A.", "Think.", **first), Agent("b", "You are B.", "Check.", **second),
                             Agent("c", "You are C.", "Answer.", **final)))


def test_topology_yaml_takes_per_agent_budgets(tmp_path):
    path = tmp_path / "team.yaml"
    path.write_text("name: team\nagents:\n"
                    "  - {role: a, system: A, instruction: Think., latent_steps: 2, max_new_tokens: 7}\n"
                    "  - {role: b, system: B, instruction: Answer., max_new_tokens: 5}\n")
    topo = load_topology(str(path))
    assert (topo.agents[0].latent_steps, topo.agents[0].max_new_tokens) == (2, 7)
    assert (topo.final.latent_steps, topo.final.max_new_tokens) == (None, 5)
    assert load_topology(topo.to_dict()) == topo
    assert "latent_steps" not in load_topology("sequential").to_dict()["agents"][0]  # defaults stay implicit
    for bad in ("latent_steps: -1", "max_new_tokens: 0", "latent_steps: two"):
        path.write_text(f"agents:\n  - {{role: a, system: A, instruction: Go., {bad}}}\n")
        with pytest.raises(DiffMASError, match="agent 'a'"):
            load_topology(str(path))


def test_per_agent_latent_steps_override_the_default(backbone):
    tok = backbone.tokenizer
    topo = _team({"latent_steps": 1}, {}, {"latent_steps": 2})
    result = rollout(backbone, RolloutSpec(topo, "latent", latent_steps=3), QUESTIONS,
                     decode_cfg=DecodeConfig(max_new_tokens=3))
    assert [a.latent_steps for a in result.agents] == [1, 3, 2]
    for i, q in enumerate(QUESTIONS):
        prompts = [len(render_agent(tok, a, q)) for a in topo.writers]
        assert result.trace_tokens[i] == prompts[0] + 1 + prompts[1] + 3
    # only per-agent steps, with a default of 0: the realigner is still set up
    zero = rollout(backbone, RolloutSpec(_team({"latent_steps": 2}, {}, {}), "latent", latent_steps=0),
                   QUESTIONS[:1], decode_cfg=DecodeConfig(max_new_tokens=2))
    assert [a.latent_steps for a in zero.agents] == [2, 0, 0]


def test_per_agent_token_budgets_for_text_writers_and_the_final_agent(backbone):
    topo = _team({"max_new_tokens": 2}, {}, {"max_new_tokens": 3})
    result = rollout(backbone, RolloutSpec(topo, "text", writer_max_new_tokens=6), QUESTIONS,
                     decode_cfg=DecodeConfig(max_new_tokens=20))
    a, b, c = result.agents
    assert (a.max_new_tokens, b.max_new_tokens, c.max_new_tokens) == (2, 6, 3)
    assert max(a.generated_tokens) == 2 and max(b.generated_tokens) == 6  # the random model never stops early
    assert all(len(t) <= 3 for t in result.tokens) and max(len(t) for t in result.tokens) == 3
    assert [r["agents"][0]["max_new_tokens"] for r in result.per_question()] == [2] * len(QUESTIONS)


def test_text_context_limit_caps_the_trace_and_stays_batch_invariant():
    bb = make_backbone(dtype=torch.float64)
    topo = load_topology("sequential")
    tok = bb.tokenizer
    free = rollout(bb, RolloutSpec(topo, "text", writer_max_new_tokens=6), QUESTIONS,
                   decode_cfg=DecodeConfig(max_new_tokens=4))
    # A limit between the first writer's prompt + reply and the full trace: later replies get cut, per question.
    first = [len(render_agent(tok, topo.writers[0], q)) for q in QUESTIONS]
    second = [len(render_agent(tok, topo.writers[1], q)) for q in QUESTIONS]
    midway = _check_limit(bb, topo, free, min(first) + 3)
    row = first.index(min(first))
    assert midway.agents[0].generated_tokens[row] == 3 < free.agents[0].generated_tokens[row]  # cut midway
    _check_limit(bb, topo, free, min(f + s for f, s in zip(first, second)) + 3)
    with pytest.raises(DiffMASError):
        RolloutSpec(topo, "text", text_context_limit=0)


def _check_limit(bb, topo, free, limit):
    tok = bb.tokenizer
    spec = RolloutSpec(topo, "text", writer_max_new_tokens=6, text_context_limit=limit)
    capped = rollout(bb, spec, QUESTIONS, decode_cfg=DecodeConfig(max_new_tokens=4))
    for i in range(len(QUESTIONS)):
        prompts = sum(len(render_agent(tok, a, QUESTIONS[i])) for a in topo.writers)
        replies = sum(a.generated_tokens[i] for a in capped.agents[:-1])
        assert capped.trace_tokens[i] == prompts + replies
        used = 0
        for agent, record in zip(topo.writers, capped.agents):  # each reply fits what was left (prompts are not cut)
            used += len(render_agent(tok, agent, QUESTIONS[i]))
            assert record.generated_tokens[i] <= max(0, limit - used)
            used += record.generated_tokens[i]
        assert capped.trace_tokens[i] < free.trace_tokens[i]
        assert capped.agents[0].texts[i] == free.agents[0].texts[i][: len(capped.agents[0].texts[i])]
    assert capped.agents[0].generated_tokens != free.agents[0].generated_tokens or \
        capped.agents[1].generated_tokens != free.agents[1].generated_tokens
    for i, q in enumerate(QUESTIONS):
        alone = rollout(bb, spec, [q], decode_cfg=DecodeConfig(max_new_tokens=4))
        assert alone.tokens[0] == capped.tokens[i]
        assert alone.trace_tokens[0] == capped.trace_tokens[i]
        assert alone.nll_sum[0] == pytest.approx(capped.nll_sum[i], rel=1e-9, abs=1e-9)
    return capped

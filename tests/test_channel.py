"""Communication the reader needs: agent views, the ``latents`` trace scope, and the bottleneck's training options.

On tiny random models (float64 where equalities are asserted): a latents-only trace is exactly the trace rebuilt
from the writers' latent columns alone, positions continue after the writers' real positions, hiding columns
equals dropping them, batch 1 equals batch N, and a final agent that sees none of the problem can learn it only
through the channel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone

from diffmas.adapters import LoraSettings, attach_lora
from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.kv import Trace
from diffmas.prompts import RELAY, SPLIT, Agent, Topology, load_topology, render_agent, view_text
from diffmas import rollout as rollout_module
from diffmas.forced import gold_nll
from diffmas.rollout import RolloutSpec, rollout

VIEWS = [
    {"question": "What is 12 + 30?", "none": "Answer with a number.", "part:a": "12", "part:b": "+ 30"},
    {"question": "A longer one: what is 5 - 9 + 14 - 2?", "none": "Answer with a number.", "part:a": "5 - 9",
     "part:b": "+ 14 - 2"},
    {"question": "Hi", "none": "Answer with a number.", "part:a": "1", "part:b": "+ 1"},
]
TARGETS = ["Answer: 42", "Answer: 8", "Answer: 2"]
M = 3


def _trained(backbone, topology: Topology, seed: int = 1) -> dict[str, str]:
    roles = attach_lora(backbone, LoraSettings(rank=4, layout="per-agent"), [a.role for a in topology.agents])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return roles


def _writer_width(backbone, agent: Agent, views: list[dict]) -> int:
    return max(len(render_agent(backbone.tokenizer, agent, view_text(agent, v))) for v in views)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_latents_only_trace_equals_one_rebuilt_from_the_latent_columns_alone(arch):
    bb = make_backbone(arch, dtype=torch.float64)
    roles = _trained(bb, RELAY)
    keep = RolloutSpec(RELAY, "latent", M, adapters=roles, trace="keep")
    latents = RolloutSpec(RELAY, "latent", M, adapters=roles, trace="latents")
    cfg = DecodeConfig(max_new_tokens=5)
    full = rollout(bb, keep, VIEWS, decode_cfg=cfg, keep_trace=True)
    ours = rollout(bb, latents, VIEWS, decode_cfg=cfg, keep_trace=True, gold_targets=TARGETS)
    # Rebuilt by hand from the open trace: only the last M columns (the latent steps), positions as written.
    prompt = _writer_width(bb, RELAY.writers[0], VIEWS)
    t = full.trace
    rebuilt = Trace(tuple(k[:, :, prompt:] for k in t.keys), tuple(v[:, :, prompt:] for v in t.values),
                    t.mask[:, prompt:], t.positions[:, prompt:], t.next_positions)
    assert ours.trace.length == M and ours.trace_tokens == [M] * len(VIEWS)
    assert torch.equal(ours.trace.positions, rebuilt.positions)
    # The final agent continues after the writer's real positions (prompt + latents), not after what it sees.
    assert torch.equal(ours.trace.next_positions, full.trace.next_positions)
    assert ours.trace.next_positions.tolist() == [int(full.trace.mask[i].sum()) for i in range(len(VIEWS))]
    for a, b in zip(ours.trace.keys + ours.trace.values, rebuilt.keys + rebuilt.values):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    expected = gold_nll(bb, latents, rebuilt, VIEWS, TARGETS)
    for (nll, n), (ref, n_ref) in zip(ours.gold, expected):
        assert n == n_ref and nll == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # Dropping the prompt changes what the final agent computes (the check is not vacuous).
    open_gold = gold_nll(bb, keep, full.trace, VIEWS, TARGETS)
    assert [g[0] for g in open_gold] != pytest.approx([g[0] for g in expected])


@pytest.mark.parametrize("topology", [RELAY, SPLIT], ids=["relay", "split"])
@pytest.mark.parametrize("scope", ["latents", "keep"])
def test_views_and_scopes_batch_one_equals_batch_n(topology, scope):
    bb = make_backbone(dtype=torch.float64)
    spec = RolloutSpec(topology, "latent", M, adapters=_trained(bb, topology), trace=scope)
    cfg = DecodeConfig(max_new_tokens=6)
    full = rollout(bb, spec, VIEWS, decode_cfg=cfg, gold_targets=TARGETS)
    for i, v in enumerate(VIEWS):
        alone = rollout(bb, spec, [v], decode_cfg=cfg, gold_targets=[TARGETS[i]])
        assert alone.tokens[0] == full.tokens[i] and alone.trace_tokens[0] == full.trace_tokens[i]
        assert alone.nll_sum[0] == pytest.approx(full.nll_sum[i], rel=1e-9, abs=1e-9)
        assert alone.gold[0][0] == pytest.approx(full.gold[i][0], rel=1e-9, abs=1e-9)
    if scope == "latents":
        assert full.trace_tokens == [M * len(topology.writers)] * len(VIEWS)
    record = full.per_question()[0]  # what every sample records of each agent's view
    assert [a["sees"] for a in record["agents"]] == [a.sees for a in topology.agents]


def test_hiding_the_prompt_columns_equals_dropping_them_in_training():
    """The bottleneck curriculum hides prompt columns through the mask; at visibility ~0 every one is hidden, and
    the loss and its gradients equal those of the dropped (latents-only) trace: positions do not follow the mask."""
    bb = make_backbone(dtype=torch.float64)
    spec = RolloutSpec(RELAY, "latent", M, adapters=_trained(bb, RELAY), trace="latents")
    bb.model.eval()  # no LoRA dropout: the two runs must draw nothing at random but the hidden columns
    runs = []
    for reveal in (0.0, 1e-12):
        bb.model.zero_grad(set_to_none=True)
        out = rollout(bb, spec, VIEWS, targets=TARGETS, reveal=reveal, reveal_seed=3)
        out.loss.backward()
        grads = [p.grad.clone() for n, p in bb.model.named_parameters() if "lora_" in n and p.grad is not None]
        runs.append((out.loss.item(), grads))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-10)
    assert len(runs[0][1]) == len(runs[1][1]) > 0
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # With everything revealed, the final agent reads the prompt again: a different loss.
    seen = rollout(bb, spec, VIEWS, targets=TARGETS, reveal=1.0, reveal_seed=3)
    assert seen.loss.item() != pytest.approx(runs[0][0])
    with pytest.raises(DiffMASError, match="reveal applies"):
        rollout(bb, RolloutSpec(RELAY, "latent", M, trace="keep"), VIEWS, targets=TARGETS, reveal=0.5)


@pytest.mark.parametrize("mode", ["coupled", "detached"])
def test_the_final_agent_learns_the_problem_only_through_the_latent_columns(mode):
    """Scope latents: with no latent steps the final agent's loss cannot depend on the question (it sees none of
    it); with latent steps it does, and the gradient reaches the writer's adapter only in coupled mode."""
    bb = make_backbone(dtype=torch.float64)
    roles = _trained(bb, RELAY)
    other = [{**v, "question": v["question"].replace("1", "7")} for v in VIEWS]
    for steps in (0, M):
        spec = RolloutSpec(RELAY, "latent", steps, adapters=roles, trace="latents")
        with torch.no_grad():
            a = rollout(bb, spec, VIEWS, targets=TARGETS, grad_mode=mode).loss
            b = rollout(bb, spec, other, targets=TARGETS, grad_mode=mode).loss
        assert (float(a) == pytest.approx(float(b), rel=1e-12)) == (steps == 0), steps
    bb.model.zero_grad(set_to_none=True)
    rollout(bb, RolloutSpec(RELAY, "latent", M, adapters=roles, trace="latents"), VIEWS, targets=TARGETS,
            grad_mode=mode).loss.backward()
    writer = [p.grad for n, p in bb.model.named_parameters() if "lora_" in n and ".reasoner." in n]
    assert any(g is not None and g.abs().sum() > 0 for g in writer) == (mode == "coupled")


def test_a_text_writer_under_scope_latents_passes_only_its_reply():
    bb = make_backbone(dtype=torch.float64)
    spec = RolloutSpec(RELAY, "text", writer_max_new_tokens=4, trace="latents")
    out = rollout(bb, spec, VIEWS, decode_cfg=DecodeConfig(max_new_tokens=2), keep_trace=True)
    replies = out.agents[0].generated_tokens
    assert out.trace_tokens == replies and out.trace.length == max(replies)
    prompt = [len(render_agent(bb.tokenizer, RELAY.writers[0], v["question"])) for v in VIEWS]
    assert out.trace.next_positions.tolist() == [p + r for p, r in zip(prompt, replies)]


def test_views_render_only_what_an_agent_sees():
    reader = RELAY.final
    assert view_text(reader, VIEWS[0]) == "Answer with a number."
    assert view_text(reader, "What is 2 + 2?") == ""  # a plain question has nothing for it but the instruction
    assert view_text(SPLIT.writers[1], VIEWS[1]) == "+ 14 - 2"
    with pytest.raises(DiffMASError, match="offer only"):
        view_text(Agent("x", "s", "i", sees="part:c"), VIEWS[0])
    with pytest.raises(DiffMASError, match="no parts"):
        view_text(SPLIT.writers[0], "What is 2 + 2?")
    with pytest.raises(DiffMASError, match="sees must be"):
        Agent("x", "s", "i", sees="everything")
    with pytest.raises(DiffMASError, match="no agent sees"):
        Topology("blind", (Agent("a", "s", "i", sees="none"), Agent("b", "s", "i", sees="none")))
    with pytest.raises(DiffMASError, match="trace must be one of"):
        Topology("t", RELAY.agents, trace="sometimes")
    # A topology's views and scope survive the YAML/dict round trip; defaults stay out of it.
    data = Topology("relay2", RELAY.agents, trace="latents").to_dict()
    assert data["trace"] == "latents" and data["agents"][1]["sees"] == "none" and "sees" not in data["agents"][0]
    assert load_topology(data) == Topology("relay2", RELAY.agents, trace="latents")
    bb = make_backbone()
    ids = render_agent(bb.tokenizer, reader, view_text(reader, VIEWS[0]))
    assert "12 + 30" not in bb.tokenizer.decode(ids)


def test_the_topology_scope_applies_unless_the_run_sets_one():
    topo = Topology("t", RELAY.agents, trace="latents")
    assert RolloutSpec(topo).scope == "latents"
    assert RolloutSpec(topo, trace="keep").scope == "keep"
    assert RolloutSpec(RELAY).scope == "keep"


@pytest.mark.parametrize("topology, scope", [(RELAY, "latents"), (load_topology("sequential"), "keep")],
                         ids=["relay-latents", "sequential-keep"])
def test_prefilling_the_shared_prompt_prefix_once_changes_no_loss_or_gradient(topology, scope, monkeypatch):
    """Training prefills the first writer's shared prompt prefix once for the batch: the loss and every gradient
    equal those of prefilling each row's whole prompt. (To 1e-6, not 1e-12: the models' RMSNorm computes in
    float32 even in a float64 model, so the last-bit differences of another matmul shape flip float32 roundings.
    A wrong position or mask moves them by orders of magnitude more.)"""
    bb = make_backbone(dtype=torch.float64)
    spec = RolloutSpec(topology, "latent", M, adapters=_trained(bb, topology), trace=scope)
    bb.model.eval()  # no LoRA dropout
    prompts = VIEWS if topology is RELAY else [v["question"] for v in VIEWS]
    lora = [p for n, p in bb.model.named_parameters() if "lora_" in n]

    def run() -> tuple[float, list[torch.Tensor]]:
        bb.model.zero_grad(set_to_none=True)
        out = rollout(bb, spec, prompts, targets=TARGETS)
        out.loss.backward()
        return out.loss.item(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in lora]

    loss, grads = run()
    monkeypatch.setattr(rollout_module, "_shared_prefix", lambda seqs: 0)
    whole_loss, whole_grads = run()
    assert loss == pytest.approx(whole_loss, rel=1e-9)
    assert any(g.abs().sum() > 0 for g in grads)
    for g, ref in zip(grads, whole_grads):
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_the_first_writers_shared_prompt_prefix_is_prefilled_once(training):
    bb = make_backbone(dtype=torch.float64)
    spec = RolloutSpec(RELAY, "latent", M, adapters=_trained(bb, RELAY), trace="latents")
    shapes = []
    bb.body.get_input_embeddings().register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    rollout(bb, spec, VIEWS, targets=TARGETS if training else None, decode_cfg=DecodeConfig(max_new_tokens=2))
    seqs = [render_agent(bb.tokenizer, RELAY.writers[0], view_text(RELAY.writers[0], v)) for v in VIEWS]
    shared = next(i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1)
    assert shared > 10  # the chat template and the writer's instructions
    widest = max(map(len, seqs))
    segments = [shape for shape in shapes if len(shape) == 2]  # token segments (the realigner embeds the vocabulary)
    assert segments[:2] == [(1, shared), (len(VIEWS), widest - shared)]  # once for the batch, then each row's own


@pytest.mark.parametrize("topology, mode", [(RELAY, "latent"), (load_topology("sequential"), "text")],
                         ids=["relay-latent", "sequential-text"])
def test_inference_with_the_shared_prompt_prefix_answers_as_whole_prompts(topology, mode, monkeypatch):
    bb = make_backbone(dtype=torch.float64)
    spec = RolloutSpec(topology, mode, M, adapters=_trained(bb, topology), trace="latents", writer_max_new_tokens=4)
    prompts = VIEWS if topology is RELAY else [v["question"] for v in VIEWS]
    cfg = DecodeConfig(max_new_tokens=6)
    ours = rollout(bb, spec, prompts, decode_cfg=cfg, gold_targets=TARGETS)
    monkeypatch.setattr(rollout_module, "_shared_prefix", lambda seqs: 0)
    whole = rollout(bb, spec, prompts, decode_cfg=cfg, gold_targets=TARGETS)
    assert ours.tokens == whole.tokens and ours.trace_tokens == whole.trace_tokens
    assert ours.nll_sum == pytest.approx(whole.nll_sum, rel=1e-9, abs=1e-9)
    assert [g for g, _ in ours.gold] == pytest.approx([g for g, _ in whole.gold], rel=1e-9)

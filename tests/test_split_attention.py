"""Single-token steps attend to the trace without copying it: the same numbers as the joined cache, and autograd
keeps one past per layer instead of one per latent step."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone

from diffmas.adapters import LoraSettings, attach_lora
from diffmas.kv import Trace, joined_attention
from diffmas.positions import left_pad
from diffmas.latent import get_realigner, take_latent_steps
from diffmas.prompts import DUO
from diffmas.rollout import RolloutSpec, rollout

QUESTIONS = ["What is 3 + 4 + 5?", "Compute 12 - 5 + 1 - 2 and then double it, please."]
TARGETS = ["Answer: 12", "Answer: 12"]


def _trained(arch: str, dtype=torch.float64):
    bb = make_backbone(arch, dtype=dtype)
    roles = attach_lora(bb, LoraSettings(rank=4, dropout=0.0, layout="per-agent"), [a.role for a in DUO.agents])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    bb.model.train()
    return bb, RolloutSpec(DUO, "latent", latent_steps=5, adapters=roles)


def _step(bb, spec):
    bb.model.zero_grad(set_to_none=True)
    result = rollout(bb, spec, QUESTIONS, targets=TARGETS, grad_mode="coupled")
    result.loss.backward()
    grads = {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}
    return float(result.loss.detach()), grads


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_split_path_gives_the_joined_path_loss_and_gradients(arch):
    bb, spec = _trained(arch)
    loss, grads = _step(bb, spec)
    with joined_attention():
        ref_loss, ref_grads = _step(bb, spec)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert grads.keys() == ref_grads.keys() and any(".reasoner." in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def _saved_bytes(bb, steps: int) -> int:
    """Bytes of distinct storages autograd saves for backward over ``steps`` latent steps on a long prompt."""
    seqs = [[5 + (i * 7 + j) % 200 for j in range(300 + 40 * i)] for i in range(2)]
    ids, mask = left_pad(seqs, bb.pad_id, bb.device)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    trace, hidden = Trace.empty(2, bb.device).extend(bb.body, mask, input_ids=ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        take_latent_steps(bb, trace, hidden[:, -1], steps, get_realigner(bb))
    return sum(storages.values())


def test_latent_steps_do_not_save_a_copy_of_the_trace_per_step():
    bb = make_backbone("llama")
    bb.model.train()
    per_step = (_saved_bytes(bb, 8) - _saved_bytes(bb, 2)) / 6
    with joined_attention():
        joined_per_step = (_saved_bytes(bb, 8) - _saved_bytes(bb, 2)) / 6
    layers = bb.model.config.num_hidden_layers
    kv_bytes = 2 * layers * bb.model.config.num_key_value_heads * 2 * 340 * \
        (bb.model.config.hidden_size // bb.model.config.num_attention_heads) * 4
    assert joined_per_step > 0.9 * kv_bytes  # the old path keeps (at least) one K/V copy per step
    assert per_step < 0.25 * joined_per_step, (per_step, joined_per_step)


def test_a_model_whose_attention_reads_another_config_keeps_the_joined_path():
    """The split path is switched on through body.config; attention reading another config must not take it
    (it would attend to the recent keys alone)."""
    import copy

    bb, spec = _trained("llama")
    own = copy.copy(bb.body.config)
    for module in bb.body.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "config"):
            module.config = own
    loss, _ = _step(bb, spec)
    with joined_attention():
        ref_loss, _ = _step(bb, spec)
    assert loss == pytest.approx(ref_loss, rel=1e-12)


def _per_head_kv_saved(bb, trace, ids, mask) -> int:
    """How many [B, heads, T, head_dim] tensors (key/value heads repeated per query head) autograd saves."""
    cfg = bb.model.config
    shape = (ids.shape[0], cfg.num_attention_heads, trace.length + ids.shape[1], cfg.hidden_size // cfg.num_attention_heads)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trace.extend(bb.body, mask, input_ids=ids)
    return shapes.count(shape)


def test_a_wide_segment_over_a_trace_saves_no_per_head_copies_of_it():
    bb = make_backbone("llama")
    if bb.device.type != "cpu":
        pytest.skip("grouped SDPA with a mask is the CPU path; CUDA keeps transformers' (kv.attention.grouped_wide)")
    bb.model.train()
    assert bb.model.config.num_key_value_heads < bb.model.config.num_attention_heads  # grouped heads: the case
    first = left_pad([[5 + j % 200 for j in range(60 + 20 * i)] for i in range(2)], bb.pad_id, bb.device)
    trace, _ = Trace.empty(2, bb.device).extend(bb.body, first[1], input_ids=first[0])
    ids, mask = left_pad([[7 + j % 100 for j in range(30 + 9 * i)] for i in range(2)], bb.pad_id, bb.device)
    with joined_attention():  # transformers' SDPA path repeats K/V per query head, and backward keeps the copies
        assert _per_head_kv_saved(bb, trace, ids, mask) == 2 * bb.model.config.num_hidden_layers
    assert _per_head_kv_saved(bb, trace, ids, mask) == 0

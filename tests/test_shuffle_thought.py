"""The shuffled-thought control: each writer prefills its own question, but its latent steps are fed the inputs it
computed on another question (does the reader take the answer from the thoughts, or from what the latent positions
read of the writer's own prompt?)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.eval.runner import gold_target, run_eval
from diffmas.latent import PauseEmbedding, get_realigner
from diffmas.rollout import rollout
from diffmas.systems import build_system
from diffmas.tasks import get_task

from conftest import make_backbone

CFG = DecodeConfig(max_new_tokens=3)


def _items(n: int = 4):
    task = get_task("relay:digits")
    examples = task.load(n)
    return [task.views(ex) for ex in examples], [gold_target(ex) for ex in examples]


def _relay(backbone, m: int):
    return build_system("latent_mas", backbone, latent_steps=m, trace="latents", default_topology="relay")


def _nll(result) -> list[float]:
    return [nll for nll, _ in result.gold]


def test_at_one_step_the_shuffled_thought_is_the_partner_rows_mapped_state():
    """At m = 1 a writer's only thought is the map of its prompt's last state: feeding the partner's equals mapping
    the partner row's state in the same batch (the by-hand check of docs/study-relay/checks/gated-closed)."""
    backbone = make_backbone()
    spec = _relay(backbone, 1).spec
    views, golds = _items(2)
    shuffled = rollout(backbone, spec, views, decode_cfg=CFG, thought_prompts=views[::-1], gold_targets=golds)
    realign = get_realigner(backbone)
    rolled = rollout(backbone, replace(spec, latent_map=lambda hidden: realign(hidden.flip(0))), views,
                     decode_cfg=CFG, gold_targets=golds)
    own = rollout(backbone, spec, views, decode_cfg=CFG, gold_targets=golds)
    assert _nll(shuffled) == pytest.approx(_nll(rolled), abs=5e-4)
    assert shuffled.tokens == rolled.tokens
    # The control moves the reader (random weights: by >= 1 nat here), so the equality is not two no-ops.
    assert all(abs(a - b) > 5e-3 for a, b in zip(_nll(shuffled), _nll(own)))


def test_a_shuffled_thought_does_not_depend_on_the_batch_and_is_neither_the_own_nor_the_partners_trace():
    backbone = make_backbone()
    system = _relay(backbone, 3)
    views, golds = _items(4)
    partners = [1, 2, 3, 0]
    thoughts = [views[p] for p in partners]
    together = system.run(views, CFG, batch_size=4, targets=golds, thought_prompts=thoughts)
    for i in range(4):
        alone = rollout(backbone, system.spec, [views[i]], decode_cfg=CFG, thought_prompts=[thoughts[i]],
                        gold_targets=[golds[i]])
        # fp32: batch 4 against batch 1 moves these sums (~100 nats) by <= 2e-4 with or without the control; the
        # control moves them by >= 2e-2 (random weights).
        assert together[i]["gold_nll_sum"] == pytest.approx(_nll(alone)[0], abs=5e-4)
        assert together[i]["answer"] == alone.texts[0]
        own = rollout(backbone, system.spec, [views[i]], decode_cfg=CFG, gold_targets=[golds[i]])
        partner = rollout(backbone, system.spec, [views[i]], decode_cfg=CFG, writer_prompts=[thoughts[i]],
                          gold_targets=[golds[i]])
        # The writer's own prompt with the partner's thoughts: neither its own trace nor the partner's whole one.
        assert abs(_nll(alone)[0] - _nll(own)[0]) > 5e-3 and abs(_nll(alone)[0] - _nll(partner)[0]) > 5e-3
    # A writer fed the thoughts it computes on its own question runs exactly as without the control.
    same = rollout(backbone, system.spec, views, decode_cfg=CFG, thought_prompts=views, gold_targets=golds)
    plain = rollout(backbone, system.spec, views, decode_cfg=CFG, gold_targets=golds)
    assert _nll(same) == _nll(plain) and same.tokens == plain.tokens


def test_a_writers_time_counts_its_pass_on_the_thoughts_question_too(monkeypatch):
    """What the control costs is on the record: a clock that ticks once per reading makes each pass one tick."""
    backbone = make_backbone()
    spec = _relay(backbone, 2).spec
    views, _ = _items(2)
    ticks = iter(range(10_000))
    monkeypatch.setattr("diffmas.rollout.time.perf_counter", lambda: float(next(ticks)))
    plain = rollout(backbone, spec, views, decode_cfg=CFG)
    shuffled = rollout(backbone, spec, views, decode_cfg=CFG, thought_prompts=views[::-1])
    assert shuffled.agents[0].seconds == 2 * plain.agents[0].seconds > 0


def test_a_pause_channel_has_no_thought_to_shuffle():
    """Pause feeds one learned embedding whatever the state: the control leaves it as it is."""
    backbone = make_backbone()
    spec = replace(_relay(backbone, 2).spec, latent_map=PauseEmbedding(torch.randn(backbone.lm.config.hidden_size)))
    views, golds = _items(3)
    shuffled = rollout(backbone, spec, views, decode_cfg=CFG, thought_prompts=views[1:] + views[:1],
                       gold_targets=golds)
    plain = rollout(backbone, spec, views, decode_cfg=CFG, gold_targets=golds)
    assert _nll(shuffled) == _nll(plain)


def test_the_control_is_an_evaluation_of_latent_writers(tmp_path, tiny_model_dir):
    backbone = make_backbone()
    views, golds = _items(2)
    with pytest.raises(DiffMASError, match="thought_prompts is an evaluation option"):
        rollout(backbone, _relay(backbone, 1).spec, views, targets=golds, thought_prompts=views[::-1])
    text = build_system("text_mas", backbone, default_topology="relay")
    with pytest.raises(DiffMASError, match="thought_prompts is an evaluation option"):
        rollout(backbone, text.spec, views, decode_cfg=CFG, thought_prompts=views[::-1])
    common = dict(model=str(tiny_model_dir), limit=4, max_new_tokens=2, latent_steps=1, trace="latents",
                  device="cpu", show_progress=False)
    with pytest.raises(DiffMASError, match="single has no writer that takes latent steps"):
        run_eval(["single"], ["relay:digits"], tmp_path / "single", shuffle_thought=True, **common)
    with pytest.raises(DiffMASError, match="give one of"):
        run_eval(["latent_mas"], ["relay:digits"], tmp_path / "both", shuffle_thought=True, shuffle_trace=True,
                 **common)
    results = run_eval(["latent_mas"], ["relay:digits"], tmp_path / "eval", shuffle_thought=True, **common)
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert results["config"]["shuffle_thought"] is True
    assert all(s["thought_from"] != s["id"] and "trace_from" not in s for s in samples)
    assert sorted(s["thought_from"] for s in samples) == sorted(s["id"] for s in samples)

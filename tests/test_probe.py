"""Linear probes on the channel: the features are exactly the columns the final agent sees, the same per row
whatever shares the batch; the ridge probe finds a planted label (at the layer that holds it) and not a shuffled
one; an open trace, whose width differs between rows, is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone

from diffmas.decode import DecodeConfig
from diffmas.eval.probe import ProbeError, answer_labels, channel_features, probe_channel, probe_label, probe_table
from diffmas.rollout import rollout
from diffmas.systems import build_system
from diffmas.tasks import get_task

M = 3
QUESTIONS = [{"question": q, "none": "Answer with a number."} for q in
             ("Remember this number: 7.", "Remember this number: 123456. What is it?", "Hi", "Number 42, please.")]


def _system(trace: str = "latents"):
    return build_system("latent_mas", make_backbone(dtype=torch.float64), topology="relay", latent_steps=M,
                        trace=trace)


def test_features_are_the_latent_columns_the_reader_sees_and_do_not_depend_on_the_batch():
    system = _system()
    x, layers = channel_features(system, QUESTIONS, batch_size=4, show_progress=False)
    heads, head_dim = system.backbone.lm.config.num_key_value_heads, system.backbone.lm.config.head_dim
    assert layers == [0, 1] and x.shape == (4, 2, M * heads * 2 * head_dim)
    # By hand: the rollout's trace, the M visible columns of row 1, keys then values per head.
    trace = rollout(system.backbone, system.spec, QUESTIONS, decode_cfg=DecodeConfig(max_new_tokens=1),
                    keep_trace=True).trace
    cols = trace.mask[1].bool()
    assert int(cols.sum()) == M
    k, v = trace.keys[1][1][:, cols], trace.values[1][1][:, cols]  # [heads, M, head_dim]
    assert torch.allclose(x[1, 1], torch.cat([k, v], -1).transpose(0, 1).flatten().float())
    one_by_one = torch.cat([channel_features(system, [q], batch_size=1, show_progress=False)[0] for q in QUESTIONS])
    assert torch.allclose(one_by_one, x, atol=1e-5)


def test_an_open_trace_whose_width_differs_between_rows_is_refused():
    with pytest.raises(ProbeError, match="--trace latents"):
        channel_features(_system("keep"), QUESTIONS, show_progress=False)


def test_answer_labels_are_the_length_and_each_place():
    labels = answer_labels(["7", "42", "105"])
    assert labels["length"] == [0, 1, 2]
    assert labels["1"] == [2, 1, 0] and labels["2"] == [-1, 1, 0] and labels["3"] == [-1, -1, 0]


def test_the_probe_reads_a_planted_label_at_its_layer_and_not_a_shuffled_one():
    gen = torch.Generator().manual_seed(0)
    n, classes = 300, 4
    y = torch.randint(classes, (n,), generator=gen)
    x = torch.randn(n, 3, 16, generator=gen)
    x[:, 1, :classes] += 5 * torch.nn.functional.one_hot(y, classes)  # layer 1 holds the label; 0 and 2 do not
    order = torch.randperm(n, generator=gen)
    probe = probe_label(x, y, order[:200], order[200:], [0, 5, 9], "1", gen)
    assert probe.layer == 5 and probe.accuracy > 0.95 and probe.per_layer[0] < 0.5 and probe.per_layer[9] < 0.5
    assert probe.shuffled < 0.5 and probe.constant == pytest.approx(
        float(torch.bincount(y[order[200:]]).max()) / 100)
    assert "| place 1 | 200 / 100 |" in probe_table({"1": probe})[2]


def test_probe_channel_probes_the_digits_relay_end_to_end():
    probes = probe_channel(_system(), get_task("relay:digits"), n=90, show_progress=False)
    assert "length" in probes and "1" in probes
    assert all(p.n_fit + p.n_scored <= 90 and p.n_scored >= 20 for p in probes.values())
    assert probes["length"].n_scored == 30 and probes["length"].classes == 6
    with pytest.raises(ProbeError, match="at least 60"):
        probe_channel(_system(), get_task("relay:digits"), n=10)


def test_the_cli_writes_the_probes_and_refuses_an_open_trace_in_one_line(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    def probe(*args):
        return subprocess.run([sys.executable, "-m", "diffmas.cli", "probe", "--system", "latent_mas", "--model",
                               str(tiny_model_dir), "--n", "60", "--latent-steps", "2", *args], capture_output=True,
                              text=True, timeout=300)

    done = probe("--out", str(tmp_path / "probe.json"))
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["settings"]["topology"] == "relay" and saved["settings"]["latent_steps"] == 2
    assert saved["labels"]["length"]["n_scored"] == 20 and "| length | 40 / 20 |" in done.stdout
    refused = probe("--trace", "keep")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")]


def test_where_the_features_hold_nothing_the_probe_falls_back_to_the_most_common_class():
    gen = torch.Generator().manual_seed(1)
    n = 300
    y = (torch.rand(n, generator=gen) < 0.2).long()  # 80% class 0
    x = torch.randn(n, 2, 32, generator=gen)
    order = torch.randperm(n, generator=gen)
    probe = probe_label(x, y, order[:200], order[200:], [0, 1], "length", gen)
    assert probe.accuracy >= probe.constant - 0.02 and probe.constant > 0.7

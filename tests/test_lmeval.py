"""The lm-evaluation-harness model ``diffmas``: offline tasks over a local json file, both request types."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

# Offline: no hub lookups (they would wait on network timeouts); set before lm_eval imports huggingface_hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'diffmas[lmeval]')")

ROWS = [
    {"question": "2 + 2", "choices": ["4", "5", "22"], "label": 0, "answer": "4"},
    {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green"], "label": 0,
     "answer": "blue"},
    {"question": "3 x 3", "choices": ["6", "9", "33", "0"], "label": 1, "answer": "9"},
    {"question": "Capital of France, in one word", "choices": ["Paris", "Rome", "Berlin"], "label": 0,
     "answer": "Paris"},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmeval-tasks")
    data = folder / "data.json"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


_MANAGERS: dict = {}


def _evaluate(model: str, model_args: str, tasks: list[str], task_dir, batch_size: int = 4) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import diffmas.lmeval  # noqa: F401  (registers the model)

    if task_dir not in _MANAGERS:  # only the local tasks: indexing lm-eval's thousands of built-in ones is slow
        _MANAGERS[task_dir] = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=batch_size,
                                   device="cpu", task_manager=_MANAGERS[task_dir], log_samples=True,
                                   bootstrap_iters=0)


def _loglikelihoods(results: dict, task: str) -> list[tuple[float, bool]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [(float(r[0][0]), bool(r[0][1])) for s in samples for r in s["resps"]]


def test_single_raw_context_matches_lm_eval_hf(task_dir, tiny_model_dir):
    hf = _loglikelihoods(_evaluate("hf", f"pretrained={tiny_model_dir},dtype=float32", ["tiny_mc"], task_dir),
                         "tiny_mc")
    ours = _evaluate("diffmas", f"system=single,chat=false,model={tiny_model_dir},dtype=float32", ["tiny_mc"],
                     task_dir)
    mine = _loglikelihoods(ours, "tiny_mc")
    assert len(mine) == len(hf) == sum(len(r["choices"]) for r in ROWS)
    for (a, greedy_a), (b, greedy_b) in zip(mine, hf):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4), (mine, hf)
        assert greedy_a == greedy_b
    assert 0.0 <= ours["results"]["tiny_mc"]["acc,none"] <= 1.0


def test_latent_mas_both_request_types_batch_invariant(task_dir, tiny_model_dir):
    args = f"system=latent_mas,topology=duo,latent_steps=2,model={tiny_model_dir},dtype=float32"
    one = _evaluate("diffmas", args, ["tiny_mc", "tiny_gen"], task_dir, batch_size=1)
    many = _evaluate("diffmas", args, ["tiny_mc", "tiny_gen"], task_dir, batch_size=4)
    a, b = _loglikelihoods(one, "tiny_mc"), _loglikelihoods(many, "tiny_mc")
    assert len(a) == len(b) == 12 and all(math.isfinite(x) and x < 0 for x, _ in a)
    for (x, gx), (y, gy) in zip(a, b):  # float32 latent steps: rounding, not different numbers
        assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-3) and gx == gy
    gen_one = [s["resps"][0][0] for s in sorted(one["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    gen_many = [s["resps"][0][0] for s in sorted(many["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    assert gen_one == gen_many and len(gen_one) == len(ROWS)
    assert all(isinstance(t, str) and "\n" not in t for t in gen_one)
    assert "exact_match,none" in many["results"]["tiny_gen"]


def test_generate_until_is_the_system_rollout(tiny_model_dir):
    from lm_eval.api.instance import Instance

    from diffmas.decode import DecodeConfig
    from diffmas.lmeval import DiffMASLM

    lm = DiffMASLM(system="latent_mas", topology="duo", latent_steps=2, model=str(tiny_model_dir), device="cpu",
                   batch_size=2)
    contexts = ["Q: 1 + 1\nA:", "Q: why?\nA:", "Q: name a colour\nA:"]
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    reqs = [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]
    got = lm.generate_until(reqs)
    eos = lm.tokenizer.eos_token
    want = [r["answer"] for r in lm.system.run(contexts, DecodeConfig(max_new_tokens=6, stop=("\n", eos)))]
    assert got == want


def test_lm_eval_cli_finds_the_model(task_dir, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """``python -m diffmas.lmeval ARGS`` is lm-eval's own command line with the model registered (run in-process,
    with lm-eval's built-in task index left out: building it takes a minute on a small machine)."""
    import functools

    import lm_eval.tasks

    from diffmas.lmeval import main

    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    out = tmp_path / "out"
    main(["--model", "diffmas", "--model_args", f"system=single,model={tiny_model_dir}", "--device", "cpu",
          "--tasks", "tiny_gen", "--include_path", str(task_dir), "--limit", "2", "--output_path", str(out)])
    assert "tiny_gen" in capsys.readouterr().out
    assert list(out.rglob("results_*.json"))



def test_raw_context_generation_matches_model_generate(tiny_model_dir):
    from lm_eval.api.instance import Instance

    from diffmas.lmeval import DiffMASLM

    lm = DiffMASLM(system="single", chat="false", model=str(tiny_model_dir), device="cpu", batch_size=3)
    contexts = ["Q: 1 + 1\nA:", "Q: a longer question here\nA:", "Q: x\nA:"]
    reqs = [Instance("generate_until", {}, (c, {"max_gen_toks": 5, "until": []}), i) for i, c in enumerate(contexts)]
    got = lm.generate_until(reqs)
    for context, text in zip(contexts, got):
        ids = torch.tensor([lm.tok_encode(context)])
        with torch.no_grad():
            out = lm.backbone.lm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=lm.backbone.pad_id)
        want = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(lm.tokenizer.eos_token)[0]
        assert text == want

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


def test_loglikelihood_is_the_rollouts_gold_target_score(tiny_model_dir):
    """One computation scores a final agent: lm-eval's log-likelihood of a request equals the gold-target NLL the
    evaluation harness gets from the rollout (diffmas.forced.gold_nll) for the same context and target."""
    from lm_eval.api.instance import Instance

    from diffmas.decode import DecodeConfig
    from diffmas.lmeval import DiffMASLM
    from diffmas.forced import gold_nll
    from diffmas.rollout import rollout

    lm = DiffMASLM(system="latent_mas", topology="duo", latent_steps=2, model=str(tiny_model_dir), device="cpu",
                   batch_size=2)
    questions, targets = ["What is 2 + 3?", "Name a colour."], ["Answer: 5", "Answer: blue"]
    eos = lm.tokenizer.eos_token  # render_target ends a target with the end of the turn
    reqs = [Instance("loglikelihood", {}, (q, t + eos), i) for i, (q, t) in enumerate(zip(questions, targets))]
    got = [ll for ll, _ in lm.loglikelihood(reqs)]
    trace = rollout(lm.backbone, lm.system.spec, questions, decode_cfg=DecodeConfig(max_new_tokens=1),
                    keep_trace=True).trace
    want = gold_nll(lm.backbone, lm.system.spec, trace, questions, targets)
    for ll, (nll, _) in zip(got, want):
        assert math.isclose(-ll, nll, rel_tol=1e-5, abs_tol=1e-5)


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_device_falls_back_to_the_cpu_with_a_warning(tiny_model_dir, caplog):
    """lm-eval passes cuda:0 unless told otherwise; like its own hf model, ours then runs on the CPU and says so."""
    from diffmas.lmeval import DiffMASLM

    with caplog.at_level("WARNING", logger="diffmas.lmeval"):
        lm = DiffMASLM(system="single", model=str(tiny_model_dir), device="cuda:0")
    assert lm.device.type == "cpu"
    assert any("CUDA is not available" in r.getMessage() for r in caplog.records)


def test_offline_tasks_run_end_to_end_through_the_cli_without_network(tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """`python -m diffmas.lmeval --tasks diffmas_arc_easy,diffmas_gsm8k` as a new user runs it (no --device, so
    lm-eval's default cuda:0; no --include_path): lm-eval's own prompts and metrics over the packaged files, with
    every connection to another host refused."""
    import functools
    import socket

    import lm_eval.tasks

    from diffmas.lmeval import main

    connect = socket.socket.connect

    def local_only(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test: no network ({address})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",  # lm-eval's built-in index takes a minute to build here
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    out = tmp_path / "out"
    main(["--model", "diffmas", "--model_args", f"system=latent_mas,topology=duo,latent_steps=1,max_gen_toks=4,"
          f"model={tiny_model_dir}", "--tasks", "diffmas_arc_easy,diffmas_gsm8k", "--num_fewshot", "0", "--limit", "2",
          "--output_path", str(out), "--log_samples"])
    assert "diffmas_arc_easy" in capsys.readouterr().out
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert set(results) == {"diffmas_arc_easy", "diffmas_gsm8k"}
    assert "acc,none" in results["diffmas_arc_easy"] and "exact_match,strict-match" in results["diffmas_gsm8k"]
    arc = [json.loads(line) for line in next(out.rglob("samples_diffmas_arc_easy_*.jsonl")).read_text().splitlines()]
    first = arc[0]  # lm-eval's arc_easy prompt and target over the offline test split
    assert first["arguments"]["gen_args_0"]["arg_0"] == f"Question: {first['doc']['question']}\nAnswer:"
    assert first["target"] == str("ABCD".index(first["doc"]["answerKey"]))
    gsm = json.loads(next(out.rglob("samples_diffmas_gsm8k_*.jsonl")).read_text().splitlines()[0])
    assert gsm["doc"]["answer"].endswith("#### 18") and gsm["arguments"]["gen_args_0"]["arg_1"]["until"][0] == \
        "Question:"


def test_offline_task_data_is_the_packaged_benchmark():
    from diffmas.lmeval_tasks import arc_easy, commonsense_qa, gsm8k
    from diffmas.tasks import get_task

    assert len(arc_easy()["test"]) == 2376 and len(gsm8k()["test"]) == 1319
    assert len(commonsense_qa()["validation"]) == 1221
    example = get_task("arc_easy").load(limit=1)[0]
    doc = arc_easy()["test"][0]
    assert doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])] == \
        example.meta["choices"]["ABCDE".index(example.answer)]

"""lm-evaluation-harness model ``diffmas``: any lm-eval task on any DiffMAS system.

    pip install 'diffmas[lmeval]'
    python -m diffmas.lmeval --model diffmas \\
        --model_args system=latent_mas,topology=sequential,latent_steps=10,model=smollm2-135m-instruct \\
        --tasks diffmas_arc_easy --limit 100
    python -m diffmas.lmeval --model diffmas --model_args system=diffmas,adapter=runs/dm --tasks diffmas_gsm8k

The ``diffmas_*`` tasks are lm-eval's own over the benchmark files installed with the project (offline; see
:mod:`diffmas.lmeval_tasks`); ``python -m diffmas.lmeval`` makes lm-eval's task index include them.

lm-eval (0.4.x) finds models only in its own registry and has no plugin entry point for models, so the model is
registered when this module is imported: ``python -m diffmas.lmeval ARGS`` is ``lm_eval ARGS`` with the model
registered (in Python: ``import diffmas.lmeval`` before ``lm_eval.simple_evaluate(model="diffmas", ...)``).

Requests:

- ``generate_until``: the system's rollout (:meth:`diffmas.systems.System.run`): the writers fill the trace
  with the context as their question, the final agent answers; ``until`` strings stop decoding.
- ``loglikelihood``: the writers' trace for the context, then the final agent's segment followed by the
  continuation, teacher-forced: summed log-probability of the continuation's tokens and whether each one is the
  greedy choice. Batched; padding and the trace's mask keep the numbers independent of the batch.
- ``loglikelihood_rolling``: the text's rolling windows on the final agent, raw tokens (the writers get an
  empty question).

Model arguments: ``system`` (default ``latent_mas``), ``model`` (alias, folder or hub id), ``topology``,
``latent_steps``, ``adapter`` (trained systems), ``chat`` (default true: the final agent's segment is its chat
turn with the context as the question; ``chat=false`` feeds the raw context, tokenized as lm-eval's ``hf`` model
does, which makes ``system=single`` score exactly like ``--model hf``), ``realign``, ``writer_max_new_tokens``,
``max_gen_toks`` (default 256), ``batch_size``, ``device`` (a CUDA device on a machine without CUDA: the CPU, with
a warning, as lm-eval's ``hf`` model does), ``dtype``.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from torch import Tensor

from diffmas.adapters import activate
from diffmas.assets import DEFAULT_MODEL
from diffmas.backbone import load_backbone
from diffmas.decode import DecodeConfig, decode
from diffmas.errors import DiffMASError
from diffmas.kv import Trace
from diffmas.positions import left_pad
from diffmas.latent import get_realigner, take_latent_steps
from diffmas.prompts import render_agent
from diffmas.forced import score_forced
from diffmas.systems import System, build_system

__all__ = ["DiffMASLM", "score_continuations", "main"]

logger = logging.getLogger(__name__)


def _flag(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise DiffMASError(f"expected true or false, got '{value}'")
        return value.lower() in ("true", "1", "yes")
    return bool(value)


def _final_prefix(system: System, trace: Trace, prompts: list[list[int]]) -> tuple[Trace, Tensor]:
    """Prefill the final agent's prompt segment on ``trace`` and take its latent steps (``single_latent``);
    returns the trace and the hidden state that predicts the next token."""
    backbone, spec = system.backbone, system.spec
    activate(backbone, (spec.adapters or {}).get(spec.topology.final.role))
    ids, mask = left_pad(prompts, backbone.pad_id, backbone.device)
    trace, hidden = trace.extend(backbone.body, mask, input_ids=ids)
    last = hidden[:, -1]
    if spec.final_latent_steps:
        latent_map = spec.latent_map or get_realigner(backbone, spec.realign)
        trace, last, _ = take_latent_steps(backbone, trace, last, spec.final_latent_steps, latent_map)
    return trace, last


@torch.no_grad()
def score_continuations(system: System, questions: list[str], prompts: list[list[int]],
                        continuations: list[list[int]]) -> list[tuple[float, bool]]:
    """Per row: the writers work on ``questions[i]``, the final agent reads their trace, then its segment
    ``prompts[i]`` followed by ``continuations[i]`` (teacher-forced, through the rollout's own final-agent path,
    :func:`diffmas.forced.score_forced`). Returns (summed log-probability of the continuation, whether every
    continuation token is the argmax)."""
    backbone = system.backbone
    unique = list(dict.fromkeys(questions))  # the writers' trace is computed once per distinct question
    rows = torch.tensor([unique.index(q) for q in questions], device=backbone.device)
    trace = system.writers_trace(unique).select(rows)
    return [(-nll, missed == 0) for nll, missed in score_forced(backbone, system.spec, trace, prompts, continuations)]


@register_model("diffmas")
class DiffMASLM(TemplateLM):
    """A DiffMAS system as an lm-eval model (see the module docstring for the arguments)."""

    def __init__(self, system: str = "latent_mas", model: str = DEFAULT_MODEL, topology: str | None = None,
                 latent_steps: int | None = None, adapter: str | None = None, chat=True, realign=True,
                 writer_max_new_tokens: int = 128, max_gen_toks: int = 256, batch_size: int | str | None = 8,
                 device: str | None = "auto", dtype: str = "float32", max_length: int | None = None,
                 **unused) -> None:
        super().__init__()
        if unused:
            raise DiffMASError(f"unknown diffmas model argument(s): {', '.join(sorted(unused))}")
        device = device or "auto"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes cuda:0 unless told otherwise; its own hf model then falls back to the CPU too.
            logger.warning("device '%s' requested but CUDA is not available: running on the CPU", device)
            device = "cpu"
        self.backbone = load_backbone(str(model), device, dtype)
        self.tokenizer = self.backbone.tokenizer
        self.system = build_system(system, self.backbone, topology=topology,
                                   latent_steps=None if latent_steps is None else int(latent_steps),
                                   adapter=None if adapter is None else str(adapter), realign=_flag(realign),
                                   writer_max_new_tokens=int(writer_max_new_tokens))
        self.chat = _flag(chat)
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        config_len = getattr(self.backbone.lm.config, "max_position_embeddings", None)
        self._max_length = int(max_length or config_len or 2048)
        self._device = self.backbone.device

    # --- tokenization, as lm-eval's hf model does it (so chat=false scores like --model hf) ---
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        prefix = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and prefix and string.startswith(prefix):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    def _final_prompt(self, context: str, context_enc: list[int]) -> list[int]:
        if self.chat:
            return render_agent(self.tokenizer, self.system.spec.topology.final, context)
        return context_enc

    def _score(self, items: list[tuple[str, list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(writers' question, final agent's prompt tokens, continuation tokens) -> (log-prob, is_greedy)."""
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][1]) + len(items[i][2])))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo: lo + self.batch_size]
            scores = score_continuations(self.system, [items[i][0] for i in idx], [items[i][1] for i in idx],
                                         [items[i][2] for i in idx])
            for i, s in zip(idx, scores):
                out[i] = s
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        items = []
        for (context, _), context_enc, continuation_enc in requests:
            context = context or ""
            items.append((context, self._final_prompt(context, context_enc), list(continuation_enc)))
        results = self._score(items)
        for ((context, continuation), _, _), res in zip(requests, results):
            if context is not None:
                self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        items, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            for ctx, cont in windows:
                items.append(("", list(ctx), list(cont)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._score(items)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos = self.tokenizer.decode(self.eot_token_id)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            cfg = DecodeConfig(max_new_tokens=int(kwargs["max_gen_toks"]), temperature=temperature,
                               stop=tuple(s for s in until if s))
            contexts = [requests[i].args[0] for i in indices]
            texts = self._generate(contexts, cfg)
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def _generate(self, contexts: list[str], cfg: DecodeConfig) -> list[str]:
        if self.chat:  # the system's own rollout
            return [r["answer"] for r in self.system.run(contexts, cfg, self.batch_size)]
        texts: list[str | None] = [None] * len(contexts)
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo: lo + self.batch_size]
            with torch.no_grad():
                trace = self.system.writers_trace([contexts[i] for i in idx])
                trace, last = _final_prefix(self.system, trace, [self.tok_encode(contexts[i]) for i in idx])
                reply = decode(self.backbone, trace, last, cfg)
            for i, text in zip(idx, reply.texts):
                texts[i] = text
        return texts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """``lm_eval`` with the ``diffmas`` model registered and the offline tasks (``diffmas_arc_easy``, ...: see
    :mod:`diffmas.lmeval_tasks`) known: ``python -m diffmas.lmeval --model diffmas ...``."""
    import lm_eval.tasks
    from lm_eval.__main__ import cli_evaluate

    from diffmas.lmeval_tasks import with_offline_tasks

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # lm-eval's --include_path takes one folder, which may be the user's own: the offline tasks' folder is added to
    # every task manager the command line builds instead (it imports TaskManager from lm_eval.tasks when it runs).
    manager = lm_eval.tasks.TaskManager

    def with_offline(*args, include_path=None, **kwargs):
        return manager(*args, include_path=with_offline_tasks(include_path), **kwargs)

    lm_eval.tasks.TaskManager = with_offline
    try:
        cli_evaluate()
    finally:
        lm_eval.tasks.TaskManager = manager


if __name__ == "__main__":  # pragma: no cover
    main()

"""Load a causal LM and its tokenizer, and expose the few pieces the rollout needs.

The rollout never calls the model's top-level forward: it runs the decoder body (hidden states only) and
applies the LM head to the positions that need logits. Over a 49k vocabulary the head is a large share of a
small model's cost, so computing it only where a token is sampled or a loss is taken matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from diffmas.assets import DEFAULT_MODEL, resolve_model
from diffmas.errors import DiffMASError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffMASError(f"device '{device}' requested but CUDA is not available")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: any CUDA GPU, or a CPU with avx512_bf16 / amx_bf16. Elsewhere
    bf16 autocast is emulated: a training step at the demo's settings took 13x longer than in fp32 on an avx2-only
    AMD EPYC (docs/benchmarks.md, P9), while with native support it is 1.4x faster (shared/CALIBRATION.md)."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes it natively (:func:`native_bf16`), else ``no``."""
    if mixed_precision == "auto":
        return "bf16" if native_bf16(device) else "no"
    return mixed_precision


def precision_name(mixed_precision: str, dtype: str) -> str:
    """How a run names the arithmetic it trained in: the weights' ``dtype``, or the autocast that ``mixed_precision``
    resolved to (:func:`resolve_precision`)."""
    return dtype if mixed_precision == "no" else f"{mixed_precision} autocast"


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise DiffMASError(f"unknown dtype '{dtype}'; choose one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


@dataclass
class Backbone:
    """A model (possibly wrapped by peft) with its tokenizer and the name it was loaded from."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str = DEFAULT_MODEL
    cache: dict = field(default_factory=dict)  # per-model derived tensors (realignment), computed once

    @property
    def lm(self) -> PreTrainedModel:
        """The underlying causal LM, with any LoRA layers injected in place."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

    @property
    def body(self) -> torch.nn.Module:
        """Decoder without LM head: returns last-layer (final-normed) hidden states."""
        return self.lm.base_model

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a reply: the tokenizer's EOS and the model's generation EOS ids."""
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.lm.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return ids

    def embed(self, ids: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """LM head on the given hidden states only (callers pass just the positions they need), followed by what
        the model's own forward applies after its head: Granite's ``logits_scaling`` (a division), Cohere's
        ``logit_scale`` (a multiplication), Gemma 2/3's ``final_logit_softcapping`` (cap * tanh(logits / cap))."""
        logits = self.lm.get_output_embeddings()(hidden)
        logits = logits.float() if logits.element_size() < 4 else logits
        config = self.lm.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "logits_scaling", None):
            logits = logits / config.logits_scaling
        if isinstance(getattr(config, "logit_scale", None), (int, float)):
            logits = logits * config.logit_scale
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def load_backbone(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32") -> Backbone:
    """Load ``model`` (embedded alias, local folder, or hub id) onto ``device`` in ``dtype``."""
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    path = resolve_model(model)
    hf_logging.set_verbosity_error()  # silence load-time chatter; our own errors say what went wrong
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffMASError(f"could not load model '{model}': {first}") from exc
    lm.to(torch_device).eval()
    return Backbone(model=lm, tokenizer=tokenizer, name=model)

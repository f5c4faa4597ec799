"""Fixtures: tiny random models built from configs, and a byte-level tokenizer with a ChatML template."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from diffmas.backbone import Backbone

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: every byte is a token, plus ChatML specials (<|im_end|>=256, <|pad|>=257, <|im_start|>=258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


VOCAB = 272  # 256 bytes + specials, rounded up

# DIFFMAS_TEST_DEVICE=cuda puts the tiny models on a GPU: the equivalence tests (batch invariance, cached decode,
# split vs joined attention, decode compaction) then check the CUDA kernels; CI runs them on CPU.
TEST_DEVICE = torch.device(os.environ.get("DIFFMAS_TEST_DEVICE", "cpu"))


def tiny_config(arch: str = "llama", tied: bool = True):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=tied,
                  eos_token_id=256, pad_token_id=257, initializer_range=0.3)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=16, sliding_window=4096, query_pre_attn_scalar=16, **common)
    raise ValueError(arch)


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM,
                 "gemma3": Gemma3ForCausalLM}


def make_backbone(arch: str = "llama", tied: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> Backbone:
    torch.manual_seed(seed)
    model = MODEL_CLASSES[arch](tiny_config(arch, tied)).to(device=TEST_DEVICE, dtype=dtype).eval()
    model.generation_config.eos_token_id = 256
    model.generation_config.pad_token_id = 257
    return Backbone(model=model, tokenizer=make_tokenizer(), name=f"tiny-{arch}")


class MoreEos(Backbone):
    """The tiny model with some ordinary tokens declared end-of-sequence, so rows end at ragged times."""

    extra_eos: tuple[int, ...] = ()

    @property
    def eos_ids(self) -> set[int]:  # type: ignore[override]
        return {*super().eos_ids, *self.extra_eos}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama and its tokenizer saved as an ordinary model folder (loadable by path, like a user's)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    backbone = make_backbone()
    backbone.lm.save_pretrained(path)
    backbone.tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def backbone() -> Backbone:
    return make_backbone()


@pytest.fixture
def one_thread():
    """Evaluation tests run many tiny forwards: one thread is faster than two fighting over a small model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    # Realignment matrices and converted models are cached under DIFFMAS_HOME: keep tests off the user's cache,
    # except the embedded model, whose one-time conversion is worth sharing between runs.
    monkeypatch.setenv("DIFFMAS_HOME", str(tmp_path / "home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

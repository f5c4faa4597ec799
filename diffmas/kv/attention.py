"""diffmas' own attention functions, registered in transformers' AttentionInterface: single tokens over a
trace's past without joining it (split), and wide segments with grouped key/value heads (no repeat_kv copies)."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, DynamicCache

from diffmas.errors import DiffMASError
from diffmas.positions import MASKABLE_ATTENTION


_SPLIT_ATTENTION = "diffmas_split"
_SPLIT_CACHE: ContextVar[DynamicCache | None] = ContextVar("diffmas_split_cache", default=None)
_SPLIT_UNSUPPORTED = ("s_aux", "sinks")
_SPLIT_ENABLED: ContextVar[bool] = ContextVar("diffmas_split_enabled", default=True)


@contextmanager
def joined_attention():
    """Within this block single-token steps join the cache as transformers does (a copy of the past per step):
    the reference the split path is tested and benchmarked against."""
    token = _SPLIT_ENABLED.set(False)
    try:
        yield
    finally:
        _SPLIT_ENABLED.reset(token)


def _split_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                     dropout: float = 0.0, scaling: float | None = None, softcap: float | None = None, **kwargs
                     ) -> tuple[Tensor, None]:
    """Attention of new queries to a layer's past and its recent keys (``key``/``value``), without joining them
    (an inference trace's layer already holds both in one preallocated storage: then one view of it is read).

    The same arithmetic as eager attention (one softmax, at least in float32, over all columns), with the
    key/value heads shared by their query groups without copies. ``attention_mask`` is boolean
    ``[B, 1, S, past + recent]``.
    """
    bad = [k for k in _SPLIT_UNSUPPORTED if kwargs.get(k) is not None]
    if bad:
        raise DiffMASError(f"split attention does not support {bad}; this model needs the joined-cache path")
    layer = _SPLIT_CACHE.get().layers[module.layer_idx]
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(b, kv_heads, groups * s, d)  # a query head h reads key head h // groups
    # An inference trace's layer keeps past and new columns in one preallocated storage: one view covers both,
    # so each step runs two matmuls instead of four and a cat (on a GPU every kernel launch counts).
    whole = getattr(layer, "contiguous_kv", None)
    if whole is not None:
        scores = q @ whole[0].transpose(-1, -2)
    else:
        past_k, past_v = layer.past
        scores = torch.cat([q @ past_k.transpose(-1, -2), q @ key.transpose(-1, -2)], dim=-1)
    scores = scores * (scaling if scaling is not None else d ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = attention_mask[:, :, None].expand(b, 1, groups, s, scores.shape[-1]).reshape(b, 1, groups * s, -1)
    scores = torch.where(visible, scores, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    if whole is not None:
        out = probs @ whole[1]
    else:
        past = past_k.shape[-2]
        out = probs[..., :past] @ past_v + probs[..., past:] @ value  # [B, kv_heads, groups * S, D]
    return out.reshape(b, heads, s, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(_SPLIT_ATTENTION, _split_attention)


_SHARED_CONFIG: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def splittable(body: torch.nn.Module) -> bool:
    """Whether single-token segments may take the split path: attention that takes a prepared boolean mask
    (eager, sdpa) over full or sliding layers; other kernels join the cache as transformers does.

    The split path is switched on through ``body.config``, so every attention module must read that very config
    (a module reading another one would get only the recent keys from the cache and attend to them alone).
    """
    config = body.config
    layer_types = set(getattr(config, "layer_types", None) or ())
    if not (_SPLIT_ENABLED.get() and getattr(config, "_attn_implementation", None) in MASKABLE_ATTENTION
            and layer_types <= {"full_attention", "sliding_attention"}):
        return False
    if body not in _SHARED_CONFIG:
        _SHARED_CONFIG[body] = all(m.config is config for m in body.modules()
                                   if hasattr(m, "layer_idx") and hasattr(m, "config"))
    return _SHARED_CONFIG[body]


GQA_SDPA = "diffmas_gqa_sdpa"


def _gqa_sdpa_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                        dropout: float = 0.0, scaling: float | None = None, softcap: float | None = None, **kwargs
                        ) -> tuple[Tensor, None]:
    """SDPA with key/value heads shared by their query groups (``enable_gqa``) instead of transformers'
    ``repeat_kv`` copies, which backward would keep (x groups the K/V of every wide segment)."""
    bad = [k for k in _SPLIT_UNSUPPORTED if kwargs.get(k) is not None] + (["softcap"] if softcap is not None else [])
    if bad:
        raise DiffMASError(f"grouped SDPA does not support {bad}; this model needs transformers' own attention")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, _gqa_sdpa_attention)


def grouped_wide(body: torch.nn.Module, device: torch.device) -> bool:
    """Whether a multi-token segment may take :func:`_gqa_sdpa_attention`: an sdpa model with grouped key/value
    heads, on CPU, whose fused kernel takes a mask with GQA (CUDA's would fall back to the math kernel, which
    keeps the whole attention matrix: worse than the copies)."""
    config = body.config
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", None)
    return (device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"
            and kv_heads is not None and kv_heads < heads and splittable(body))


@contextmanager
def attention_as(config, implementation: str):
    original = config._attn_implementation_internal
    config._attn_implementation_internal = implementation
    try:
        yield
    finally:
        config._attn_implementation_internal = original


@contextmanager
def split_call(config, cache: DynamicCache):
    """Route this forward's attention through :func:`_split_attention` and its cache updates to ``recent``."""
    token = _SPLIT_CACHE.set(cache)
    for layer in cache.layers:
        layer.split = True
    try:
        with attention_as(config, _SPLIT_ATTENTION):
            yield
    finally:
        for layer in cache.layers:
            layer.split = False
        _SPLIT_CACHE.reset(token)

"""The shared KV trace, and the only module that touches transformers' Cache API.

A :class:`Trace` is an immutable value: per-layer key/value tensors ``[B, H_kv, T, D]``, a ``[B, T]`` mask of
real (1) versus padding (0) positions, and the position of each row's first token. Extending it returns a new
Trace and never mutates the old one, which is what makes traces safe to branch (text vs latent writers,
independent hierarchical workers), safe to recompute under activation checkpointing, and safe to keep in an
autograd graph (``copy.deepcopy`` of a live Cache is not).

Batch invariance comes from three rules applied here once: every segment is left-padded, one mask is carried
over the whole trace, and position ids are derived from the cumulative mask, so a row's real tokens see the
same positions and the same real keys whatever else shares the batch.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer

from diffmas.errors import DiffMASError
from diffmas.positions import MASKABLE_ATTENTION, attention_masks, left_pad, segment_positions

__all__ = ["Trace", "TraceBuilder", "TraceTooLong", "joined_attention", "left_pad", "segment_positions"]


class TraceTooLong(DiffMASError):
    """A segment would put real tokens past the model's ``max_position_embeddings``."""


class _SplitLayer(DynamicLayer):
    """A full-attention cache layer that can take single tokens without copying its past.

    A plain layer concatenates the whole past with every new token, and the attention saves that fresh copy for
    backward: m latent steps over a trace of T positions keep O(m x T) K/V per layer alive. In a split call
    (``split`` set by :class:`TraceBuilder`) the new keys go to a small ``recent`` part and :func:`_split_attention`
    attends to the untouched past and to ``recent`` separately, so every step's backward refers to the same past
    tensor. The parts are joined once, when the layer is read (:meth:`materialize`) or a wider segment arrives.
    """

    split = False

    def adopt(self, keys: Tensor, values: Tensor) -> None:
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values  # as they are: no copy of the trace
        self.recent_keys = self.recent_values = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.adopt(key_states[..., :0, :], value_states[..., :0, :])
        if self.split:
            if self.recent_keys is None:
                self.recent_keys, self.recent_values = key_states, value_states
            else:
                self.recent_keys = torch.cat([self.recent_keys, key_states], dim=-2)
                self.recent_values = torch.cat([self.recent_values, value_states], dim=-2)
            return self.recent_keys, self.recent_values
        keys, values = self.materialize()
        self.keys = torch.cat([keys, key_states], dim=-2)
        self.values = torch.cat([values, value_states], dim=-2)
        return self.keys, self.values

    def materialize(self) -> tuple[Tensor, Tensor]:
        """Past and recent joined (one copy), and adopted as the new past."""
        if getattr(self, "recent_keys", None) is not None:
            self.keys = torch.cat([self.keys, self.recent_keys], dim=-2)
            self.values = torch.cat([self.values, self.recent_values], dim=-2)
            self.recent_keys = self.recent_values = None
        return self.keys, self.values

    @property
    def past(self) -> tuple[Tensor, Tensor]:
        """What a split call's new tokens attend to besides themselves."""
        return self.keys, self.values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        recent = 0 if self.recent_keys is None else self.recent_keys.shape[-2]
        return self.keys.shape[-2] + recent


def _as_cache(keys: tuple[Tensor, ...], values: tuple[Tensor, ...]) -> DynamicCache:
    # Plain full-attention layers for every model: the trace must keep every position it was given.
    # The layers adopt the tensors as they are; DynamicCache(ddp_cache_data=...) would copy the whole
    # trace once more on every call (a cat onto an empty tensor), which shows up in per-token decoding.
    cache = DynamicCache()
    cache.layer_class_to_replicate = _SplitLayer
    for k, v in zip(keys, values):
        layer = _SplitLayer()
        layer.adopt(k, v)
        cache.layers.append(layer)
    return cache


def _cache_tensors(cache: DynamicCache) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    joined = [layer.materialize() for layer in cache.layers]
    return tuple(k for k, _ in joined), tuple(v for _, v in joined)


class _Arena:
    """Preallocated per-layer K/V storage that an inference trace grows into without copying its past.

    Columns below ``frontier`` are never written again, so every Trace holding views of them stays valid while
    the trace that ends at the frontier (the tip) grows in place; any other extension copies as usual. Inference
    only: autograd may not see in-place writes into tensors it saved, so under grad every builder copies.
    A layer whose storage fills up moves to one 1.5x larger (the old storage lives on only in views).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[Tensor | None] = []  # per layer [B, H_kv, capacity, D], allocated at its first write
        self.values: list[Tensor | None] = []
        self.frontier = 0

    def is_tip(self, length: int) -> bool:
        return self.frontier == length and not torch.is_grad_enabled()

    def write(self, layer: int, keys: Tensor, values: Tensor, at: int) -> tuple[Tensor, Tensor]:
        """Store a layer's new K/V at column ``at``; returns views of that layer's columns up to them."""
        end = at + keys.shape[-2]
        if layer == len(self.keys):
            self.keys.append(None)
            self.values.append(None)
        stored = self.keys[layer]
        if stored is None or stored.shape[-2] < end:
            size = max(self.capacity, end) if stored is None else max(end, stored.shape[-2] * 3 // 2)
            for part, new in ((self.keys, keys), (self.values, values)):
                grown = new.new_empty((*new.shape[:2], size, new.shape[-1]))
                if part[layer] is not None:
                    grown[:, :, :at] = part[layer][:, :, :at]
                part[layer] = grown
        self.keys[layer][:, :, at:end] = keys
        self.values[layer][:, :, at:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def views(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return (tuple(k[:, :, :self.frontier] for k in self.keys),
                tuple(v[:, :, :self.frontier] for v in self.values))

    def select(self, rows: Tensor) -> "_Arena":
        """A new arena holding only ``rows``. This one is retired (nothing grows in it again) and lets go of its
        storage layer by layer, so unless a Trace still holds views of it, one layer's rows are copied at a time."""
        new = _Arena(self.capacity)
        for part, into in ((self.keys, new.keys), (self.values, new.values)):
            for layer, stored in enumerate(part):
                kept = stored.new_empty((len(rows), *stored.shape[1:]))
                kept[:, :, :self.frontier] = stored[:, :, :self.frontier].index_select(0, rows)
                into.append(kept)
                part[layer] = None
        new.frontier, self.frontier = self.frontier, -1
        return new


class _ArenaLayer(DynamicLayer):
    """A cache layer whose K/V live in an :class:`_Arena` (written in place). A split call (single tokens over a
    non-empty past, see :class:`_SplitLayer`) gets back only the new token and attends to ``past`` besides it."""

    split = False

    def __init__(self, arena: _Arena, index: int) -> None:
        super().__init__()
        self.arena, self.index, self.length = arena, index, 0
        if index < len(arena.keys):
            self.lazy_initialization(arena.keys[index], arena.values[index])
            self.length = arena.frontier
            self.keys = arena.keys[index][:, :, :self.length]
            self.values = arena.values[index][:, :, :self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.arena.write(self.index, key_states, value_states, self.length)
        self.past = keys[:, :, :self.length], values[:, :, :self.length]
        self.keys, self.values, self.length = keys, values, keys.shape[-2]
        return (key_states, value_states) if self.split else (keys, values)

    def get_seq_length(self) -> int:
        return self.length


def _arena_cache(arena: _Arena) -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: _ArenaLayer(arena, len(cache.layers))
    cache.layers.extend(_ArenaLayer(arena, i) for i in range(len(arena.keys)))
    return cache


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
    """Attention of new queries to a layer's past and its recent keys (``key``/``value``), without joining them.

    The same arithmetic as eager attention (one softmax, at least in float32, over all columns), with the
    key/value heads shared by their query groups without copies. ``attention_mask`` is boolean
    ``[B, 1, S, past + recent]``.
    """
    bad = [k for k in _SPLIT_UNSUPPORTED if kwargs.get(k) is not None]
    if bad:
        raise DiffMASError(f"split attention does not support {bad}; this model needs the joined-cache path")
    past_k, past_v = _SPLIT_CACHE.get().layers[module.layer_idx].past
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(b, kv_heads, groups * s, d)  # a query head h reads key head h // groups
    scores = torch.cat([q @ past_k.transpose(-1, -2), q @ key.transpose(-1, -2)], dim=-1)
    scores = scores * (scaling if scaling is not None else d ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = attention_mask[:, :, None].expand(b, 1, groups, s, scores.shape[-1]).reshape(b, 1, groups * s, -1)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    past = past_k.shape[-2]
    out = probs[..., :past] @ past_v + probs[..., past:] @ value  # [B, kv_heads, groups * S, D]
    return out.reshape(b, heads, s, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(_SPLIT_ATTENTION, _split_attention)


_SHARED_CONFIG: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def _splittable(body: torch.nn.Module) -> bool:
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


_GQA_SDPA = "diffmas_gqa_sdpa"


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


AttentionInterface.register(_GQA_SDPA, _gqa_sdpa_attention)


def _grouped_wide(body: torch.nn.Module, device: torch.device) -> bool:
    """Whether a multi-token segment may take :func:`_gqa_sdpa_attention`: an sdpa model with grouped key/value
    heads, on CPU, whose fused kernel takes a mask with GQA (CUDA's would fall back to the math kernel, which
    keeps the whole attention matrix: worse than the copies)."""
    config = body.config
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", None)
    return (device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"
            and kv_heads is not None and kv_heads < heads and _splittable(body))


@contextmanager
def _attention_as(config, implementation: str):
    original = config._attn_implementation_internal
    config._attn_implementation_internal = implementation
    try:
        yield
    finally:
        config._attn_implementation_internal = original


@contextmanager
def _split_call(config, cache: DynamicCache):
    """Route this forward's attention through :func:`_split_attention` and its cache updates to ``recent``."""
    token = _SPLIT_CACHE.set(cache)
    for layer in cache.layers:
        layer.split = True
    try:
        with _attention_as(config, _SPLIT_ATTENTION):
            yield
    finally:
        for layer in cache.layers:
            layer.split = False
        _SPLIT_CACHE.reset(token)


@dataclass(frozen=True)
class Trace:
    """Shared KV trace of a batch of multi-agent conversations (see module docstring)."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor  # [B, T], 1 = real position
    start: Tensor  # [B], position id of each row's first token
    arena: _Arena | None = field(default=None, compare=False, repr=False)
    """Inference: the storage ``keys``/``values`` are views of, which the trace grows into while it is the tip."""

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str, start: Tensor | None = None,
              capacity: int | None = None) -> "Trace":
        """A trace with no tokens; ``start`` offsets positions (an independent branch continues a parent's).

        ``capacity`` (inference): preallocate that many columns per layer, so that extending the trace and its
        extensions under no_grad writes in place instead of copying the past (one live copy of the trace).
        """
        if start is None:
            start = torch.zeros(batch_size, dtype=torch.long, device=device)
        arena = _Arena(capacity) if capacity else None
        return cls((), (), torch.zeros(batch_size, 0, dtype=torch.long, device=device), start, arena)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """Padded length T (columns, real or not)."""
        return self.mask.shape[1]

    @property
    def real_lengths(self) -> Tensor:
        """Number of real positions per row, [B]."""
        return self.mask.sum(1)

    @property
    def next_positions(self) -> Tensor:
        """Position id the next real token of each row gets, [B]."""
        return self.start + self.real_lengths

    def extend(
        self,
        body: torch.nn.Module,
        seg_mask: Tensor,
        *,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        all_layers: bool = False,
    ) -> tuple["Trace", Tensor]:
        """Run ``body`` (a decoder without LM head) on one segment on top of this trace.

        Returns the extended trace and the segment's last-layer hidden states ``[B, S, D]`` (with
        ``all_layers``: a tuple, the embeddings' output, then every layer's, the last one final-normed).
        """
        builder = TraceBuilder(self)
        hidden = builder.extend(body, seg_mask, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                all_layers=all_layers)
        return builder.freeze(), hidden

    def concat(self, other: "Trace") -> "Trace":
        """Append a trace that was built independently, starting at this trace's ``next_positions``."""
        mask = torch.cat([self.mask, other.mask], 1)
        if self.arena is not None and self.arena.is_tip(self.length) and other.keys:
            for layer, (k, v) in enumerate(zip(other.keys, other.values)):
                self.arena.write(layer, k, v, self.length)
            self.arena.frontier = mask.shape[1]
            return Trace(*self.arena.views(), mask, self.start, self.arena)
        if not self.keys:
            return Trace(other.keys, other.values, torch.cat([self.mask, other.mask], 1), self.start)
        if not other.keys:
            return Trace(self.keys, self.values, torch.cat([self.mask, other.mask], 1), self.start)
        keys = tuple(torch.cat([a, b], dim=2) for a, b in zip(self.keys, other.keys))
        values = tuple(torch.cat([a, b], dim=2) for a, b in zip(self.values, other.values))
        return Trace(keys, values, torch.cat([self.mask, other.mask], 1), self.start)

    def reclaim(self) -> None:
        """Make this trace its arena's tip again, so that the columns written after it are reused. Every trace
        extended from it since becomes invalid: only the code that made those traces, and dropped them, may call
        this. A trace without an arena (or whose arena moved on to fewer rows) is left as it is."""
        if self.arena is not None and self.arena.frontier >= self.length:
            self.arena.frontier = self.length

    def detach(self) -> "Trace":
        """Same trace, cut from the autograd graph (Stage I in ``detached`` gradient mode)."""
        return Trace(
            tuple(k.detach() for k in self.keys), tuple(v.detach() for v in self.values), self.mask, self.start
        )

    def flatten(self) -> list:
        """The trace as a flat list (inputs of a checkpointed function): its tensors, then its arena or None."""
        return [*self.keys, *self.values, self.mask, self.start, self.arena]

    @classmethod
    def unflatten(cls, parts: list | tuple) -> "Trace":
        """Inverse of :meth:`flatten`."""
        n = (len(parts) - 3) // 2
        return cls(tuple(parts[:n]), tuple(parts[n : 2 * n]), parts[-3], parts[-2], parts[-1])

    def select(self, rows: Tensor) -> "Trace":
        """The trace of some rows of the batch only (``rows``: indices, in the order wanted)."""
        return Trace(tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values), self.mask[rows],
                     self.start[rows])

    @classmethod
    def assemble(cls, parts: list[tuple[Tensor, "Trace"]], batch_size: int) -> "Trace":
        """Inverse of :meth:`select` for traces that grew apart: ``parts`` are ``(rows, trace)`` pairs covering
        every row once, each trace a continuation of the same prefix (rows that stopped early have fewer columns).

        Shorter parts are right-padded with masked zero K/V, which is the layout a lockstep loop produces (a row
        that stopped keeps receiving padding), so what a later segment computes on it does not change.
        """
        width = max(t.length for _, t in parts)
        rows = torch.cat([r for r, _ in parts])

        def gather(tensors: list[Tensor], dim: int | None) -> Tensor:
            if dim is not None:  # right-pad the time dimension with zeros (masked positions)
                tensors = [x if x.shape[dim] == width else torch.cat(
                    [x, x.new_zeros((*x.shape[:dim], width - x.shape[dim], *x.shape[dim + 1:]))], dim)
                    for x in tensors]
            stacked = torch.cat(tensors)
            return stacked.new_empty(stacked.shape).index_copy(0, rows, stacked)  # back to the original row order

        n = max(len(t.keys) for _, t in parts)
        keys = tuple(gather([t.keys[i] for _, t in parts], 2) for i in range(n))
        values = tuple(gather([t.values[i] for _, t in parts], 2) for i in range(n))
        return cls(keys, values, gather([t.mask for _, t in parts], 1), gather([t.start for _, t in parts], None))


class TraceBuilder:
    """A trace extended in place by a token-by-token loop (latent steps, decoding).

    One cache is updated step after step. Single-token steps take the split path (:class:`_SplitLayer`): they
    never copy the past, so neither the loop nor autograd holds a copy of the trace per step; the past and the
    new tokens are joined once, when the trace is read (:meth:`freeze`) or a wider segment follows. The Trace it
    started from is not modified. Gradients flow through it as usual.
    """

    def __init__(self, trace: Trace) -> None:
        # The tip of an inference trace grows in place in its arena; anything else copies (see _Arena).
        self._arena = trace.arena if trace.arena is not None and trace.arena.is_tip(trace.length) else None
        self._cache = _as_cache(trace.keys, trace.values) if self._arena is None else _arena_cache(self._arena)
        self._mask = trace.mask
        self._start = trace.start
        self._bound: int | None = None  # an upper bound on every row's next position (checked lazily, no sync)

    def _check_length(self, body: torch.nn.Module, seg_mask: Tensor) -> None:
        limit = getattr(getattr(body, "config", None), "max_position_embeddings", None)
        if not isinstance(limit, int):
            return
        if self._bound is None:
            self._bound = int((self._start + self._mask.sum(1)).max())
        if self._bound + seg_mask.shape[1] > limit:  # only then compute the exact per-row need (a device sync)
            before = self._start + self._mask.sum(1)
            need = before + seg_mask.sum(1)
            row = int(need.argmax())
            if int(need[row]) > limit:
                raise TraceTooLong(f"a segment of {int(seg_mask[row].sum())} positions after the trace's "
                                   f"{int(before[row])} would need {int(need[row])} positions, more than the model's "
                                   f"max_position_embeddings ({limit})")
            self._bound = int(need.max())
            return
        self._bound += seg_mask.shape[1]

    def extend(
        self,
        body: torch.nn.Module,
        seg_mask: Tensor,
        *,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        all_layers: bool = False,
    ) -> Tensor:
        """Append one segment; returns its last-layer hidden states ``[B, S, D]`` (every layer's with
        ``all_layers``). Raises :class:`TraceTooLong` when a row would pass ``max_position_embeddings``."""
        self._check_length(body, seg_mask)
        if self._arena is not None and not self._arena.is_tip(self._mask.shape[1]):  # grown from elsewhere meanwhile
            layers = self._cache.layers
            self._cache, self._arena = _as_cache(tuple(la.keys for la in layers), tuple(la.values for la in layers)), None
        mask = torch.cat([self._mask, seg_mask.to(self._mask.dtype)], dim=1)
        dtype = inputs_embeds.dtype if inputs_embeds is not None else body.get_input_embeddings().weight.dtype
        # One token over a non-empty trace (latent steps, decoding) attends to the past without copying it.
        split = seg_mask.shape[1] == 1 and bool(self._cache.layers) and _splittable(body)
        grouped = not split and _grouped_wide(body, mask.device)  # wide segments: no repeat_kv copies of K/V
        windowed = attention_masks(body.config, mask, self._start, seg_mask.shape[1], dtype, split=split or grouped)
        with _split_call(body.config, self._cache) if split else \
                _attention_as(body.config, _GQA_SDPA) if grouped else nullcontext():
            out = body(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=mask if windowed is None else windowed,
                position_ids=segment_positions(self._start + self._mask.sum(1), seg_mask),
                cache=self._cache,
                use_cache=True,
                output_hidden_states=all_layers,
            )
        self._mask = mask
        if self._arena is not None:
            self._arena.frontier = mask.shape[1]
        return out.hidden_states if all_layers else out.last_hidden_state

    def freeze(self) -> Trace:
        """The trace as it stands now."""
        if self._arena is not None:
            return Trace(*self._arena.views(), self._mask, self._start, self._arena)
        keys, values = _cache_tensors(self._cache)
        return Trace(keys, values, self._mask, self._start)

    def select(self, rows: Tensor) -> None:
        """Keep only ``rows`` of the batch from now on (decoding drops the rows that finished)."""
        if self._arena is not None:
            self._cache = None  # its views would keep every layer's old storage alive during the copy
            self._arena = self._arena.select(rows)
            self._cache = _arena_cache(self._arena)
        else:
            trace = self.freeze().select(rows)
            self._cache = _as_cache(trace.keys, trace.values)
        self._mask, self._start = self._mask[rows], self._start[rows]

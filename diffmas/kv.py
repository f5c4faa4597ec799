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
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer

from diffmas.errors import DiffMASError


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
    past_k, past_v = (layer := _SPLIT_CACHE.get().layers[module.layer_idx]).keys, layer.values
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
    if not (_SPLIT_ENABLED.get() and getattr(config, "_attn_implementation", None) in _MASKABLE_ATTENTION
            and layer_types <= {"full_attention", "sliding_attention"}):
        return False
    if body not in _SHARED_CONFIG:
        _SHARED_CONFIG[body] = all(m.config is config for m in body.modules()
                                   if hasattr(m, "layer_idx") and hasattr(m, "config"))
    return _SHARED_CONFIG[body]


@contextmanager
def _split_call(config, cache: DynamicCache):
    """Route this forward's attention through :func:`_split_attention` and its cache updates to ``recent``."""
    original = config._attn_implementation_internal
    config._attn_implementation_internal = _SPLIT_ATTENTION
    token = _SPLIT_CACHE.set(cache)
    for layer in cache.layers:
        layer.split = True
    try:
        yield
    finally:
        for layer in cache.layers:
            layer.split = False
        _SPLIT_CACHE.reset(token)
        config._attn_implementation_internal = original


def segment_positions(start: Tensor, seg_mask: Tensor) -> Tensor:
    """Position ids of a left-padded segment whose first real token sits at ``start`` (per row).

    Padding positions get the position of the next real token; they are masked out as keys, so any value works.
    """
    return start[:, None] + (seg_mask.cumsum(1) - 1).clamp(min=0)


_MASKABLE_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take a prepared 4D mask (flash kernels take only a 2D padding mask)."""


def attention_masks(config, mask: Tensor, start: Tensor, q_len: int, dtype: torch.dtype, split: bool = False
                    ) -> Tensor | dict | None:
    """4D attention masks that count real positions, not cache columns, or None where the 2D mask is exact.

    transformers' sliding-window mask keeps the last ``sliding_window`` *columns*; on a trace whose segments are
    left-padded, padding columns in the middle would eat into the window (a row would see less context at batch
    N than at batch 1, and less than on one unpadded sequence). Here a query at position p sees a key at
    position k iff the key is real, comes no later (column order) and, on sliding layers,
    ``p - k < sliding_window``: exactly what the model computes on one unpadded sequence. A padding query also
    sees its own column, so no row is fully masked: eager attention turns a fully masked row into NaN, and NaN
    keys at padding columns would then poison every real query of the next layer (0 x NaN), so eager always
    gets these masks.

    Returns one tensor when every layer takes the same mask (no sliding layers, every layer slides as in
    Mistral, or a trace no longer than the window), a dict per layer type when full and sliding layers differ
    (Gemma 2/3 and other models with ``config.layer_types`` take such a dict), and None where transformers'
    own mask from the 2D one is exact (sdpa without a binding window) or where a 4D mask cannot be used
    (attention implementations other than eager and sdpa, layer types other than full and sliding).
    ``split``: always boolean masks, for :func:`_split_attention`.
    """
    implementation = "sdpa" if split else getattr(config, "_attn_implementation", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if implementation not in _MASKABLE_ATTENTION or not layer_types <= {"full_attention", "sliding_attention"}:
        return None
    window = getattr(config, "sliding_window", None)
    total = mask.shape[1]
    slides = bool(window) and total > window and (not layer_types or "sliding_attention" in layer_types)
    if implementation == "sdpa" and not slides and not split:
        return None
    cols = torch.arange(total, device=mask.device)
    q_cols = cols[total - q_len:]
    diag = (cols[None, :] == q_cols[:, None])[None]  # [1, S, T]
    full = ((cols[None, :] <= q_cols[:, None])[None] & mask.bool()[:, None, :]) | diag  # [B, S, T]

    def as_mask(visible: Tensor) -> Tensor:
        visible = visible[:, None]  # [B, 1, S, T]
        if implementation == "sdpa":
            return visible
        return torch.zeros(visible.shape, dtype=dtype, device=mask.device).masked_fill(~visible,
                                                                                        torch.finfo(dtype).min)

    if not slides:
        return as_mask(full)
    pos = start[:, None] + mask.cumsum(1) - 1  # position of every real column
    sliding = (full & (pos[:, -q_len:, None] - pos[:, None, :] < window)) | diag
    if "full_attention" not in layer_types:
        return as_mask(sliding)
    return {"full_attention": as_mask(full), "sliding_attention": as_mask(sliding)}


@dataclass(frozen=True)
class Trace:
    """Shared KV trace of a batch of multi-agent conversations (see module docstring)."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor  # [B, T], 1 = real position
    start: Tensor  # [B], position id of each row's first token

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str, start: Tensor | None = None) -> "Trace":
        """A trace with no tokens; ``start`` offsets positions (an independent branch continues a parent's)."""
        if start is None:
            start = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls((), (), torch.zeros(batch_size, 0, dtype=torch.long, device=device), start)

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
        if not self.keys:
            return Trace(other.keys, other.values, torch.cat([self.mask, other.mask], 1), self.start)
        if not other.keys:
            return Trace(self.keys, self.values, torch.cat([self.mask, other.mask], 1), self.start)
        keys = tuple(torch.cat([a, b], dim=2) for a, b in zip(self.keys, other.keys))
        values = tuple(torch.cat([a, b], dim=2) for a, b in zip(self.values, other.values))
        return Trace(keys, values, torch.cat([self.mask, other.mask], 1), self.start)

    def detach(self) -> "Trace":
        """Same trace, cut from the autograd graph (Stage I in ``detached`` gradient mode)."""
        return Trace(
            tuple(k.detach() for k in self.keys), tuple(v.detach() for v in self.values), self.mask, self.start
        )

    def flatten(self) -> list[Tensor]:
        """Tensors of the trace as a flat list (inputs of a checkpointed function)."""
        return [*self.keys, *self.values, self.mask, self.start]

    @classmethod
    def unflatten(cls, tensors: list[Tensor] | tuple[Tensor, ...]) -> "Trace":
        """Inverse of :meth:`flatten`."""
        n = (len(tensors) - 2) // 2
        return cls(tuple(tensors[:n]), tuple(tensors[n : 2 * n]), tensors[-2], tensors[-1])

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
        self._cache = _as_cache(trace.keys, trace.values)
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
        mask = torch.cat([self._mask, seg_mask.to(self._mask.dtype)], dim=1)
        dtype = inputs_embeds.dtype if inputs_embeds is not None else body.get_input_embeddings().weight.dtype
        # One token over a non-empty trace (latent steps, decoding) attends to the past without copying it.
        split = seg_mask.shape[1] == 1 and bool(self._cache.layers) and _splittable(body)
        windowed = attention_masks(body.config, mask, self._start, seg_mask.shape[1], dtype, split=split)
        with _split_call(body.config, self._cache) if split else nullcontext():
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
        return out.hidden_states if all_layers else out.last_hidden_state

    def freeze(self) -> Trace:
        """The trace as it stands now."""
        keys, values = _cache_tensors(self._cache)
        return Trace(keys, values, self._mask, self._start)

    def select(self, rows: Tensor) -> None:
        """Keep only ``rows`` of the batch from now on (decoding drops the rows that finished)."""
        trace = self.freeze().select(rows)
        self._cache = _as_cache(trace.keys, trace.values)
        self._mask, self._start = trace.mask, trace.start


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str,
             allow_empty: bool = False) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into ``(ids [B, S], mask [B, S])``.

    Every row must be non-empty unless ``allow_empty`` (a teacher-forced continuation that some rows lack:
    such a row is all padding, so it adds no real position to the trace).
    """
    if not allow_empty and any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pad an empty segment: every agent segment needs at least one token")
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)

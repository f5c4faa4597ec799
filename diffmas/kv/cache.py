"""Cache layers of a trace: the split layer (single tokens without copying the past) and the arena that
inference traces grow into in place. With :mod:`diffmas.kv.attention` and :mod:`diffmas.kv.trace`, the only code
that touches transformers' Cache API."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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


def as_cache(keys: tuple[Tensor, ...], values: tuple[Tensor, ...]) -> DynamicCache:
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


def cache_tensors(cache: DynamicCache) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    joined = [layer.materialize() for layer in cache.layers]
    return tuple(k for k, _ in joined), tuple(v for _, v in joined)


class Arena:
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

    def move(self, src: int, dst: int) -> None:
        """Move the columns from ``src`` to the frontier down to ``dst`` (< ``src``), and the frontier with them:
        the columns in between are gone (a trace dropping a writer's prompt after its latent steps)."""
        n = self.frontier - src
        for part in (self.keys, self.values):
            for stored in part:
                stored[:, :, dst:dst + n] = stored[:, :, src:src + n].clone()  # the ranges may overlap
        self.frontier = dst + n

    def views(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return (tuple(k[:, :, :self.frontier] for k in self.keys),
                tuple(v[:, :, :self.frontier] for v in self.values))

    def select(self, rows: Tensor) -> "Arena":
        """A new arena holding only ``rows``. This one is retired (nothing grows in it again) and lets go of its
        storage layer by layer, so unless a Trace still holds views of it, one layer's rows are copied at a time."""
        new = Arena(self.capacity)
        for part, into in ((self.keys, new.keys), (self.values, new.values)):
            for layer, stored in enumerate(part):
                kept = stored.new_empty((len(rows), *stored.shape[1:]))
                kept[:, :, :self.frontier] = stored[:, :, :self.frontier].index_select(0, rows)
                into.append(kept)
                part[layer] = None
        new.frontier, self.frontier = self.frontier, -1
        return new


class _ArenaLayer(DynamicLayer):
    """A cache layer whose K/V live in an :class:`Arena` (written in place). A split call (single tokens over a
    non-empty past, see :class:`_SplitLayer`) gets back only the new token and attends to :attr:`contiguous_kv`."""

    split = False

    def __init__(self, arena: Arena, index: int) -> None:
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
        self.keys, self.values, self.length = keys, values, keys.shape[-2]
        return (key_states, value_states) if self.split else (keys, values)

    @property
    def contiguous_kv(self) -> tuple[Tensor, Tensor]:
        """Past and new columns as one view (they share the arena's storage): what a split call attends to."""
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def arena_cache(arena: Arena) -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: _ArenaLayer(arena, len(cache.layers))
    cache.layers.extend(_ArenaLayer(arena, i) for i in range(len(arena.keys)))
    return cache

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

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _as_cache(keys: tuple[Tensor, ...], values: tuple[Tensor, ...]) -> DynamicCache:
    # Plain full-attention layers for every model: the trace must keep every position it was given.
    # The layers adopt the tensors as they are; DynamicCache(ddp_cache_data=...) would copy the whole
    # trace once more on every call (a cat onto an empty tensor), which shows up in per-token decoding.
    cache = DynamicCache()
    for k, v in zip(keys, values):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def _cache_tensors(cache: DynamicCache) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    return tuple(layer.keys for layer in cache.layers), tuple(layer.values for layer in cache.layers)


def segment_positions(start: Tensor, seg_mask: Tensor) -> Tensor:
    """Position ids of a left-padded segment whose first real token sits at ``start`` (per row).

    Padding positions get the position of the next real token; they are masked out as keys, so any value works.
    """
    return start[:, None] + (seg_mask.cumsum(1) - 1).clamp(min=0)


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


class TraceBuilder:
    """A trace extended in place by a token-by-token loop (latent steps, decoding).

    One DynamicCache is updated step after step, so each step concatenates once per layer and the previous
    layer tensors are freed at once; extending an immutable Trace step by step would hold two full copies of
    the trace during every forward and rebuild the cache object each time. The Trace it started from is not
    modified (the cache's first update concatenates into new tensors). Gradients flow through it as usual.
    """

    def __init__(self, trace: Trace) -> None:
        self._cache = _as_cache(trace.keys, trace.values)
        self._mask = trace.mask
        self._start = trace.start

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
        ``all_layers``)."""
        mask = torch.cat([self._mask, seg_mask.to(self._mask.dtype)], dim=1)
        out = body(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
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

"""The shared KV trace: an immutable value, and the builder that extends it segment by segment.

A :class:`Trace` is an immutable value: per-layer key/value tensors ``[B, H_kv, T, D]``, a ``[B, T]`` mask of
real (1) versus padding (0) positions, and the position of each row's first token. Extending it returns a new
Trace and never mutates the old one, which is what makes traces safe to branch (text vs latent writers,
independent hierarchical workers), safe to recompute under activation checkpointing, and safe to keep in an
autograd graph (``copy.deepcopy`` of a live Cache is not).

Batch invariance comes from three rules applied here once: every segment is left-padded, one mask is carried
over the whole trace, and a segment's position ids continue from each row's next position counting only its real
tokens, so a row's real tokens see the same positions and the same real keys whatever else shares the batch.

Visibility and position are separate things. ``mask`` says which columns later tokens may attend to; ``positions``
holds the position id every column's key was rotated at, and ``next_positions`` where each row goes on. Hiding
columns (:meth:`Trace.hide`) or dropping them (:meth:`Trace.drop`) changes what is seen, never where the next
token sits: a reader that may see only some of the trace still continues after everything that was written.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffmas.errors import DiffMASError
from diffmas.kv.attention import GQA_SDPA, attention_as, grouped_wide, split_call, splittable
from diffmas.kv.cache import Arena, arena_cache, as_cache, cache_tensors
from diffmas.positions import attention_masks, segment_positions


class TraceTooLong(DiffMASError):
    """A segment would put real tokens past the model's ``max_position_embeddings``."""


@dataclass(frozen=True)
class Trace:
    """Shared KV trace of a batch of multi-agent conversations (see module docstring)."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor  # [B, T], 1 = a real position later tokens may attend to
    positions: Tensor  # [B, T], the position id of every column (padding columns: any value, never seen)
    next_positions: Tensor  # [B], the position id the next real token of each row gets
    arena: Arena | None = field(default=None, compare=False, repr=False)
    """Inference: the storage ``keys``/``values`` are views of, which the trace grows into while it is the tip."""

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str, start: Tensor | None = None,
              capacity: int | None = None) -> "Trace":
        """A trace with no tokens whose first token gets position ``start`` (default 0; an independent branch
        continues a parent's ``next_positions``).

        ``capacity`` (inference): preallocate that many columns per layer, so that extending the trace and its
        extensions under no_grad writes in place instead of copying the past (one live copy of the trace).
        """
        if start is None:
            start = torch.zeros(batch_size, dtype=torch.long, device=device)
        arena = Arena(capacity) if capacity else None
        none = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return cls((), (), none, none, start, arena)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """Padded length T (columns, real or not)."""
        return self.mask.shape[1]

    @property
    def real_lengths(self) -> Tensor:
        """Number of visible real positions per row, [B]."""
        return self.mask.sum(1)

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
        hidden = builder.append(body, seg_mask, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                all_layers=all_layers)
        return builder.freeze(), hidden

    def concat(self, other: "Trace") -> "Trace":
        """Append a trace that was built independently, starting at this trace's ``next_positions``."""
        mask = torch.cat([self.mask, other.mask], 1)
        positions = torch.cat([self.positions, other.positions], 1)
        if self.arena is not None and self.arena.is_tip(self.length) and other.keys:
            for layer, (k, v) in enumerate(zip(other.keys, other.values)):
                self.arena.write(layer, k, v, self.length)
            self.arena.frontier = mask.shape[1]
            return Trace(*self.arena.views(), mask, positions, other.next_positions, self.arena)
        if not self.keys or not other.keys:
            keys, values = (other.keys, other.values) if not self.keys else (self.keys, self.values)
            return Trace(keys, values, mask, positions, other.next_positions)
        keys = tuple(torch.cat([a, b], dim=2) for a, b in zip(self.keys, other.keys))
        values = tuple(torch.cat([a, b], dim=2) for a, b in zip(self.values, other.values))
        return Trace(keys, values, mask, positions, other.next_positions)

    def hide(self, columns: Tensor) -> "Trace":
        """The same trace with ``columns`` ([B, T] bool) invisible to every later token; positions unchanged."""
        return Trace(self.keys, self.values, self.mask * (~columns).to(self.mask.dtype), self.positions,
                     self.next_positions, self.arena)

    def drop(self, lo: int, hi: int) -> "Trace":
        """The trace without columns ``lo..hi-1``: what :meth:`hide` on them computes, without their memory or
        attention cost. Later tokens still continue at ``next_positions``. The tip of an inference trace moves its
        later columns down in place (traces extended from this one since become invalid); anything else copies."""
        keep = lambda x: torch.cat([x[..., :lo], x[..., hi:]], -1)  # noqa: E731  (columns are the last dim here)
        mask, positions = keep(self.mask), keep(self.positions)
        if self.arena is not None and self.arena.is_tip(self.length):
            self.arena.move(hi, lo)
            return Trace(*self.arena.views(), mask, positions, self.next_positions, self.arena)
        cut = lambda x: torch.cat([x[:, :, :lo], x[:, :, hi:]], 2)  # noqa: E731
        return Trace(tuple(cut(k) for k in self.keys), tuple(cut(v) for v in self.values), mask, positions,
                     self.next_positions)

    def reclaim(self) -> None:
        """Make this trace its arena's tip again, so that the columns written after it are reused. Every trace
        extended from it since becomes invalid: only the code that made those traces, and dropped them, may call
        this. A trace without an arena (or whose arena moved on to fewer rows) is left as it is."""
        if self.arena is not None and self.arena.frontier >= self.length:
            self.arena.frontier = self.length

    def detach(self) -> "Trace":
        """Same trace, cut from the autograd graph (Stage I in ``detached`` gradient mode)."""
        return Trace(tuple(k.detach() for k in self.keys), tuple(v.detach() for v in self.values), self.mask,
                     self.positions, self.next_positions)

    def flatten(self) -> list:
        """The trace as a flat list (inputs of a checkpointed function): its tensors, then its arena or None."""
        return [*self.keys, *self.values, self.mask, self.positions, self.next_positions, self.arena]

    @classmethod
    def unflatten(cls, parts: list | tuple) -> "Trace":
        """Inverse of :meth:`flatten`."""
        n = (len(parts) - 4) // 2
        return cls(tuple(parts[:n]), tuple(parts[n : 2 * n]), *parts[2 * n:])

    def select(self, rows: Tensor) -> "Trace":
        """The trace of some rows of the batch only (``rows``: indices, in the order wanted; repeats allowed)."""
        return Trace(tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values), self.mask[rows],
                     self.positions[rows], self.next_positions[rows])

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
        return cls(keys, values, gather([t.mask for _, t in parts], 1), gather([t.positions for _, t in parts], 1),
                   gather([t.next_positions for _, t in parts], None))


class TraceBuilder:
    """A trace extended in place by a token-by-token loop (latent steps, decoding).

    One cache is updated step after step. Single-token steps take the split path (:class:`_SplitLayer`): they
    never copy the past, so neither the loop nor autograd holds a copy of the trace per step; the past and the
    new tokens are joined once, when the trace is read (:meth:`freeze`) or a wider segment follows. The Trace it
    started from is not modified. Gradients flow through it as usual.
    """

    def __init__(self, trace: Trace) -> None:
        # The tip of an inference trace grows in place in its arena; anything else copies (see Arena).
        self._arena = trace.arena if trace.arena is not None and trace.arena.is_tip(trace.length) else None
        self._cache = as_cache(trace.keys, trace.values) if self._arena is None else arena_cache(self._arena)
        self._mask = trace.mask
        self._positions = trace.positions
        self._next = trace.next_positions
        self._bound: int | None = None  # an upper bound on every row's next position (checked lazily, no sync)

    def _check_length(self, body: torch.nn.Module, seg_mask: Tensor) -> None:
        limit = getattr(getattr(body, "config", None), "max_position_embeddings", None)
        if not isinstance(limit, int):
            return
        if self._bound is None:
            self._bound = int(self._next.max())
        if self._bound + seg_mask.shape[1] > limit:  # only then compute the exact per-row need (a device sync)
            before = self._next
            need = before + seg_mask.sum(1)
            row = int(need.argmax())
            if int(need[row]) > limit:
                raise TraceTooLong(f"a segment of {int(seg_mask[row].sum())} positions after the trace's "
                                   f"{int(before[row])} would need {int(need[row])} positions, more than the model's "
                                   f"max_position_embeddings ({limit})")
            self._bound = int(need.max())
            return
        self._bound += seg_mask.shape[1]

    def append(
        self,
        body: torch.nn.Module,
        seg_mask: Tensor,
        *,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        all_layers: bool = False,
    ) -> Tensor:
        """Append one segment in place (unlike :meth:`Trace.extend`, which returns a new trace); returns its last-layer hidden states ``[B, S, D]`` (every layer's with
        ``all_layers``). Raises :class:`TraceTooLong` when a row would pass ``max_position_embeddings``."""
        self._check_length(body, seg_mask)
        if self._arena is not None and not self._arena.is_tip(self._mask.shape[1]):  # grown from elsewhere meanwhile
            layers = self._cache.layers
            self._cache, self._arena = as_cache(tuple(la.keys for la in layers), tuple(la.values for la in layers)), None
        mask = torch.cat([self._mask, seg_mask.to(self._mask.dtype)], dim=1)
        seg_positions = segment_positions(self._next, seg_mask)
        positions = torch.cat([self._positions, seg_positions], dim=1)
        dtype = inputs_embeds.dtype if inputs_embeds is not None else body.get_input_embeddings().weight.dtype
        # One token over a non-empty trace (latent steps, decoding) attends to the past without copying it.
        split = seg_mask.shape[1] == 1 and bool(self._cache.layers) and splittable(body)
        grouped = not split and grouped_wide(body, mask.device)  # wide segments: no repeat_kv copies of K/V
        windowed = attention_masks(body.config, mask, positions, seg_mask.shape[1], dtype, split=split or grouped)
        with split_call(body.config, self._cache) if split else \
                attention_as(body.config, GQA_SDPA) if grouped else nullcontext():
            out = body(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=mask if windowed is None else windowed,
                position_ids=seg_positions,
                cache=self._cache,
                use_cache=True,
                output_hidden_states=all_layers,
            )
        self._mask, self._positions = mask, positions
        self._next = self._next + seg_mask.sum(1)
        if self._arena is not None:
            self._arena.frontier = mask.shape[1]
        return out.hidden_states if all_layers else out.last_hidden_state

    def freeze(self) -> Trace:
        """The trace as it stands now."""
        if self._arena is not None:
            return Trace(*self._arena.views(), self._mask, self._positions, self._next, self._arena)
        keys, values = cache_tensors(self._cache)
        return Trace(keys, values, self._mask, self._positions, self._next)

    def select(self, rows: Tensor) -> None:
        """Keep only ``rows`` of the batch from now on (decoding drops the rows that finished)."""
        if self._arena is not None:
            self._cache = None  # its views would keep every layer's old storage alive during the copy
            self._arena = self._arena.select(rows)
            self._cache = arena_cache(self._arena)
        else:
            trace = self.freeze().select(rows)
            self._cache = as_cache(trace.keys, trace.values)
        self._mask, self._positions, self._next = self._mask[rows], self._positions[rows], self._next[rows]

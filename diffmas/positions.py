"""Padding, position ids and attention masks of left-padded segments over a trace (no Cache API here).

Every segment is left-padded and one [B, T] mask of real positions is carried over the whole trace; a segment's
positions continue from each row's next position over its real tokens only, so a row's real tokens get the same
positions and see the same keys whatever else shares the batch (see diffmas.kv).
"""

from __future__ import annotations

import torch
from torch import Tensor

MASKABLE_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take a prepared 4D mask (flash kernels take only a 2D padding mask)."""


def segment_positions(start: Tensor, seg_mask: Tensor) -> Tensor:
    """Position ids of a left-padded segment whose first real token sits at ``start`` (per row).

    Padding positions get the position of the next real token; they are masked out as keys, so any value works.
    """
    return start[:, None] + (seg_mask.cumsum(1) - 1).clamp(min=0)


def attention_masks(config, mask: Tensor, positions: Tensor, q_len: int, dtype: torch.dtype, split: bool = False
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
    ``split``: always boolean masks, for diffmas' own attention functions (``diffmas.kv``).
    """
    implementation = "sdpa" if split else getattr(config, "_attn_implementation", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if implementation not in MASKABLE_ATTENTION or not layer_types <= {"full_attention", "sliding_attention"}:
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
    sliding = (full & (positions[:, -q_len:, None] - positions[:, None, :] < window)) | diag
    if "full_attention" not in layer_types:
        return as_mask(sliding)
    return {"full_attention": as_mask(full), "sliding_attention": as_mask(sliding)}


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

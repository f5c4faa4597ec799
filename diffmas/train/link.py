"""Pre-training of the learned link on plain text (RecursiveMAS, arXiv 2604.25917).

A latent step feeds the link's output where the next token's input embedding would go, so the link is first
taught to do exactly that on real text: map the last hidden state at position t to the input embedding of the
token at t + 1 (loss: 1 - cosine + 0.1 x MSE), with the language model frozen. End-to-end training then starts
from a map whose outputs look like the embeddings the model expects.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffmas.backbone import Backbone
from diffmas.positions import left_pad, segment_positions
from diffmas.latent import LearnedLink


def link_loss(link: LearnedLink, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
    """1 - cosine + 0.1 x MSE between the link's outputs and the next tokens' embeddings (rows [N, D])."""
    out = link(hidden)
    cosine = F.cosine_similarity(out.float(), next_embeds.float(), dim=-1).mean()
    return 1 - cosine + 0.1 * F.mse_loss(out.float(), next_embeds.float())


def pretrain_link(backbone: Backbone, link: LearnedLink, texts: list[str], steps: int, lr: float = 1e-3,
                  batch_size: int = 8, seed: int = 0, show_progress: bool = True) -> list[float]:
    """Train ``link`` on ``texts`` for ``steps`` steps with the model frozen; returns the loss per step."""
    if steps == 0:
        return []
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(link.parameters(), lr=lr, weight_decay=0.0)
    embed = backbone.lm.get_input_embeddings()
    losses = []
    was_training = backbone.model.training
    backbone.model.eval()
    link.train()
    for _ in tqdm(range(steps), desc="pre-train link", disable=not show_progress, dynamic_ncols=True):
        chunk = [texts[rng.randrange(len(texts))] for _ in range(batch_size)]
        seqs = [backbone.tokenizer(t, add_special_tokens=False).input_ids for t in chunk]
        ids, mask = left_pad(seqs, backbone.pad_id, backbone.device)
        with torch.no_grad():
            positions = segment_positions(torch.zeros(len(seqs), dtype=torch.long, device=ids.device), mask)
            hidden = backbone.body(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            targets = embed(ids)
        # Pairs (hidden at t, embedding at t + 1) where both positions are real tokens.
        real = (mask[:, :-1] * mask[:, 1:]).bool()
        loss = link_loss(link, hidden[:, :-1][real], targets[:, 1:][real])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    backbone.model.train(was_training)
    return losses

"""Latent thoughts: map the last hidden state back into input-embedding space and feed it as the next input.

Realignment (LatentMAS): W_a solves the ridge problem (W_outᵀW_out + λI) W_a = W_outᵀW_in, where W_out is the
LM head and W_in the input embedding matrix (both [V, D]). h @ W_a is the input embedding whose image under
the head best matches h's, so the next step sees something shaped like a token embedding. The result is
rescaled to the mean input-embedding norm (this applies even with realignment off, or for tied embeddings,
where W_a is close to identity). W_a depends only on the frozen embeddings (LoRA never touches them), so it is
computed once per model and cached in memory and on disk.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffmas.assets import diffmas_home
from diffmas.backbone import Backbone
from diffmas.config import LATENT_MAPS
from diffmas.errors import DiffMASError
from diffmas.kv import Trace, TraceBuilder


def solve_realignment(w_out: Tensor, w_in: Tensor, ridge: float = 1e-5) -> Tensor:
    """W_a [D, D] solving (W_outᵀW_out + ridge·I) W_a = W_outᵀW_in, computed in float64."""
    w_out64, w_in64 = w_out.detach().double(), w_in.detach().double()
    gram = w_out64.T @ w_out64
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, w_out64.T @ w_in64)


RIDGE = 1e-5
"""The ridge term of the realignment every rollout uses."""


def _fingerprint(backbone: Backbone, ridge: float) -> str:
    # Shapes plus a strided sample of both matrices: cheap, and different weights give a different key.
    w_in = backbone.lm.get_input_embeddings().weight.detach()
    w_out = backbone.lm.get_output_embeddings().weight.detach()
    digest = hashlib.sha256(f"{tuple(w_in.shape)}{tuple(w_out.shape)}{ridge}".encode())
    for w in (w_in, w_out):
        digest.update(w.flatten()[:: max(1, w.numel() // 65536)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class Realigner:
    """Maps last-layer hidden states [B, D] to input embeddings [B, D]."""

    matrix: Tensor | None  # None: realignment switched off (norm rescaling only)
    target_norm: float

    def __call__(self, hidden: Tensor) -> Tensor:
        # At least float32, and outside any autocast: training (bf16 autocast) and evaluation map alike.
        with torch.autocast(hidden.device.type, enabled=False):
            x = hidden.float() if hidden.element_size() < 4 else hidden
            if self.matrix is not None:
                x = x @ self.matrix.to(x.dtype)
            x = x * (self.target_norm / x.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return x.to(hidden.dtype)


def embedding_norm(backbone: Backbone, chunk: int = 8192) -> float:
    """Mean norm of what the input-embedding module outputs over the vocabulary: the size a latent input must have.

    Not the raw matrix's row norm: Gemma's embedding module multiplies by sqrt(hidden_size), and its decoder does
    not scale ``inputs_embeds`` again, so latent inputs are rescaled to the scaled norm. (Granite multiplies inside
    the decoder, ``inputs_embeds`` included, so its module output, the raw rows, is the right target.)
    """
    module = backbone.lm.get_input_embeddings()
    total, n = 0.0, module.weight.shape[0]
    with torch.no_grad():
        for lo in range(0, n, chunk):
            ids = torch.arange(lo, min(lo + chunk, n), device=module.weight.device)
            total += float(module(ids).float().norm(dim=-1).sum())
    return total / n


def realignment_path(backbone: Backbone, ridge: float = RIDGE) -> Path:
    """Where the backbone's realignment matrix is cached on disk (keyed by a fingerprint of its embeddings), so that
    every process of a launch can load the one the main process solved."""
    return diffmas_home() / "realign" / f"{_fingerprint(backbone, ridge)}.pt"


def install_realigner(backbone: Backbone, realigner: Realigner, enabled: bool, ridge: float = RIDGE) -> None:
    """Make ``realigner`` what :func:`get_realigner` returns for this backbone (a process that did not solve it)."""
    backbone.cache[("realigner", enabled, ridge)] = realigner


def get_realigner(backbone: Backbone, enabled: bool = True, ridge: float = RIDGE) -> Realigner:
    """The backbone's realigner, computed once (in memory and under ``$DIFFMAS_HOME/realign``)."""
    key = ("realigner", enabled, ridge)
    if key in backbone.cache:
        return backbone.cache[key]
    w_in = backbone.lm.get_input_embeddings().weight
    target_norm = embedding_norm(backbone)
    matrix = None
    if enabled:
        path = realignment_path(backbone, ridge)
        if path.is_file():
            matrix = torch.load(path, map_location="cpu", weights_only=True)
        else:
            # On the CPU: a float64 [V, D] copy on an accelerator costs more memory than the model's embeddings.
            matrix = solve_realignment(backbone.lm.get_output_embeddings().weight.detach().cpu(), w_in.detach().cpu(),
                                       ridge).float()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}-{id(matrix)}")  # processes of one launch write at once
            torch.save(matrix, tmp)
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        matrix = matrix.to(backbone.device)
    realigner = Realigner(matrix, target_norm)
    install_realigner(backbone, realigner, enabled, ridge)
    return realigner


def take_latent_steps(
    backbone: Backbone,
    trace: Trace,
    last_hidden: Tensor,
    steps: int,
    latent_map,
    lens_top_k: int = 0,
    fed: Tensor | None = None,
    fed_out: list[Tensor] | None = None,
) -> tuple[Trace, Tensor, list[list[list[str]]]]:
    """Take ``steps`` latent steps from ``last_hidden`` [B, D]; nothing is decoded.

    ``latent_map`` turns a last hidden state into the next input embedding (a :class:`Realigner`,
    :class:`LearnedLink`, :class:`PauseEmbedding` or :class:`GatedThought`). ``fed`` [B, steps, D] replaces the
    map's outputs with given input embeddings (the shuffled-thought control feeds those computed on another
    question); ``fed_out`` collects the embeddings fed, [B, D] per step.

    Returns the extended trace, the final last hidden state, and (when ``lens_top_k`` > 0) a logit lens:
    for each row and step, the top-k vocabulary tokens the hidden state that was fed would have decoded to.
    """
    lens: list[list[list[str]]] = [[] for _ in range(trace.batch_size)]
    step_mask = torch.ones(trace.batch_size, 1, dtype=torch.long, device=trace.mask.device)
    builder = TraceBuilder(trace)
    if fed is not None and tuple(fed.shape[:2]) != (trace.batch_size, steps):
        raise DiffMASError(f"{tuple(fed.shape[:2])} fed inputs for {trace.batch_size} rows x {steps} latent steps")
    for step in range(steps):
        if lens_top_k:
            with torch.no_grad():
                top = backbone.logits(last_hidden).topk(lens_top_k, dim=-1).indices.tolist()
            for row, ids in enumerate(top):
                lens[row].append([backbone.tokenizer.decode([i]) for i in ids])
        embeds = (latent_map(last_hidden) if fed is None else fed[:, step])[:, None, :]
        if fed_out is not None:
            fed_out.append(embeds[:, 0])
        last_hidden = builder.append(backbone.body, step_mask, inputs_embeds=embeds)[:, -1]
    return builder.freeze(), last_hidden, lens


MAP_FILE = "latent_map.safetensors"


class LearnedLink(torch.nn.Module):
    """A trainable hidden -> embedding map: the ridge realignment, a residual MLP, then the norm rescaling.

    The MLP's output layer starts at zero, so an untrained link is exactly the ridge realigner: training (and
    the optional text pre-training) starts from the fixed map that already works rather than from noise.
    """

    def __init__(self, base: Realigner, dim: int, expansion: int = 2) -> None:
        super().__init__()
        matrix = base.matrix if base.matrix is not None else torch.eye(dim)
        self.register_buffer("matrix", matrix.detach().clone().float(), persistent=False)
        self.target_norm = base.target_norm
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, expansion * dim)
        self.down = torch.nn.Linear(expansion * dim, dim)
        torch.nn.init.zeros_(self.down.weight)
        torch.nn.init.zeros_(self.down.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # float32 in training and evaluation alike
            x = hidden.float() @ self.matrix
            x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
            x = x * (self.target_norm / x.float().norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return x.to(hidden.dtype)


class PauseEmbedding(torch.nn.Module):
    """The pause control: one learned input embedding in every latent position, whatever the hidden state.

    The trace gets the same number of positions as with latent thoughts, but they carry no thought content,
    so "the thoughts carry information" can be told apart from "there are more positions to attend to".
    """

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.embedding = torch.nn.Parameter(init.detach().clone().float())

    def forward(self, hidden: Tensor) -> Tensor:
        return self.embedding.to(hidden.dtype).expand(hidden.shape[0], -1)


class GatedThought(torch.nn.Module):
    """Pause's learned input plus the realigned thought times a learned scalar gate that starts at 0.

    An untrained gated map is exactly the pause control, and no gradient reaches the writer through the fed-back
    state until the gate moves: the reader first learns to read slots filled from the prompt (where pause succeeds
    and coupled's fed states turned into the first digit's token), and the task loss then decides how much thought
    content to let in. The gate's trained value says how much it did.
    """

    def __init__(self, base: Realigner, init: Tensor) -> None:
        super().__init__()
        self.base = base  # frozen, not saved: rebuilt from the model like the ridge map
        self.embedding = torch.nn.Parameter(init.detach().clone().float())
        self.gate = torch.nn.Parameter(torch.zeros(1))  # one element, not 0-d: FSDP2 shards parameters on dim 0

    def forward(self, hidden: Tensor) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # float32 in training and evaluation alike
            x = self.embedding + self.gate * self.base(hidden.float())
        return x.to(hidden.dtype)


def build_latent_map(backbone: Backbone, kind: str, realign: bool = True):
    """The map a rollout feeds latent steps through: ``ridge`` (fixed), ``link``, ``pause`` or ``gated``
    (trainable; pause and gated start from the mean input embedding at the embeddings' mean norm)."""
    if kind not in LATENT_MAPS:
        raise ValueError(f"latent map must be one of {LATENT_MAPS}, got {kind!r}")
    base = get_realigner(backbone, realign)
    if kind == "ridge":
        return base
    if kind == "link":
        return LearnedLink(base, backbone.lm.config.hidden_size).to(backbone.device)
    mean = backbone.lm.get_input_embeddings().weight.detach().float().mean(0)
    init = mean * (base.target_norm / mean.norm().clamp(min=1e-6))
    module = PauseEmbedding(init) if kind == "pause" else GatedThought(base, init)
    return module.to(backbone.device)


def save_latent_map(latent_map, folder, state_dict: dict | None = None) -> str:
    """Save a trainable map beside the adapters; returns its kind (``ridge`` maps have nothing to save).

    ``state_dict``: the map's tensors to write instead of its own (full tensors gathered from FSDP2 shards)."""
    from safetensors.torch import save_file

    if isinstance(latent_map, Realigner):
        return "ridge"
    tensors = latent_map.state_dict() if state_dict is None else state_dict
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(Path(folder) / MAP_FILE))
    kinds = {LearnedLink: "link", PauseEmbedding: "pause", GatedThought: "gated"}
    return kinds[type(latent_map)]


def set_gate(folder, value: float) -> None:
    """Set the gate of the gated map saved in ``folder`` (an evaluation-time substitution: at 0 every latent position
    is fed pause's trained embedding alone, so the reader gets none of the writer's thought)."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / MAP_FILE
    tensors = load_file(str(path)) if path.is_file() else {}
    if "gate" not in tensors:
        raise DiffMASError(f"{folder} holds no gated latent map (one trained with --latent-map gated)")
    tensors["gate"] = torch.full_like(tensors["gate"], value)
    save_file(tensors, str(path))


def load_latent_map(backbone: Backbone, kind: str, folder, realign: bool = True):
    """Inverse of :func:`save_latent_map` (a ``ridge`` map is rebuilt from the model)."""
    from safetensors.torch import load_file

    latent_map = build_latent_map(backbone, kind, realign)
    if kind != "ridge":
        latent_map.load_state_dict(load_file(str(Path(folder) / MAP_FILE)))
        latent_map.eval()
    return latent_map

"""Linear probes on a channel: what of the answer the final agent's view of the trace holds, read linearly.

An accuracy says what a reader *repeated*; a probe says what the positions it attends to *hold*. Under
``--trace latents`` the final agent attends to nothing but the writers' m latent positions, so the features are
exactly those columns' keys and values (per layer: m x KV heads x 2 x head_dim). For each label (the answer's
length and each of its places, the character there) a ridge classifier on one-hot targets is fitted per layer on
two thirds of the items, its layer and ridge strength chosen by 5-fold cross-validation on those; the last third
scores it. Two baselines come with every label: the best constant answer's accuracy on the scored items, and the
same probe fitted to shuffled labels (what the fit finds where there is nothing).

The items are drawn like training items (``Task.training_examples``, excluding the evaluation questions), from a
draw seed of their own. Usage::

    diffmas probe --system diffmas --adapter RUN_DIR --task relay:digits --n 1500 --out probe.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmas.errors import DiffMASError
from diffmas.systems import System
from diffmas.tasks import Example, Task

LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Ridge strengths tried, in units of the number of fitted items (scale-free after standardising)."""
FOLDS = 5
DRAW_SEED = 7_000_003
"""Seed of the probe's item draw: not the study's training seeds (0-2) nor its held-out draw."""
MIN_SCORED = 20
"""A label with fewer scored items than this is left out (too few to say anything)."""


class ProbeError(DiffMASError, ValueError):
    """The channel cannot be probed (no writers, or a view whose width differs between rows)."""


@dataclass(frozen=True)
class LabelProbe:
    """One label's probe. ``per_layer``: scored accuracy of the probe fitted at each layer (at the ridge strength
    chosen with ``layer``); ``layer``: the one cross-validation chose on the fitted items, ``accuracy`` its scored
    accuracy (the headline: no layer is chosen on the scored items)."""

    label: str
    n_fit: int
    n_scored: int
    classes: int
    layer: int
    accuracy: float
    constant: float
    """The best constant answer's accuracy on the scored items."""
    shuffled: float
    """The probe refitted to shuffled labels at ``layer``, scored against the true ones."""
    per_layer: dict[int, float]

    @property
    def stderr(self) -> float:
        return (self.accuracy * (1 - self.accuracy) / self.n_scored) ** 0.5


def answer_labels(answers: list[str]) -> dict[str, list[int]]:
    """Classes per item: ``length`` (the answer's length) and, for each place p, ``str(p)`` (the character at
    place p of the answer, -1 where the answer is shorter). Classes are indices into the sorted values seen."""
    labels = {"length": [len(a) for a in answers]}
    for place in range(1, max(map(len, answers), default=0) + 1):
        labels[str(place)] = [a[place - 1] if len(a) >= place else None for a in answers]
    out = {}
    for label, values in labels.items():
        seen = sorted({v for v in values if v is not None}, key=str)
        index = {v: i for i, v in enumerate(seen)}
        out[label] = [index[v] if v is not None else -1 for v in values]
    return out


@torch.no_grad()
def channel_features(system: System, questions: list, batch_size: int = 25, layers: list[int] | None = None,
                     show_progress: bool = True) -> tuple[Tensor, list[int]]:
    """The K/V of the trace columns the final agent may attend to, per item and layer: ``[N, layers, features]``
    (float32), and the layers (default :func:`default_layers`). Every row must see the same number of columns (a
    latents-only trace: m per writer)."""
    if not system.spec.topology.writers:
        raise ProbeError(f"system {system.kind.name!r} has no writers: there is no channel to probe")
    rows = []
    for lo in tqdm(range(0, len(questions), batch_size), disable=not show_progress, desc="probe features",
                   unit="batch"):
        trace = system.writers_trace(questions[lo:lo + batch_size])
        seen = trace.mask.bool()
        widths = seen.sum(1)
        if int(widths.min()) != int(widths.max()) or int(widths.min()) == 0:
            raise ProbeError("the final agent's view differs in width between rows (or is empty): probe a "
                             "latents-only channel (--trace latents)")
        layers = layers or default_layers(len(trace.keys))
        per_layer = []
        for layer in layers:
            kv = torch.cat([trace.keys[layer], trace.values[layer]], -1)  # [B, heads, T, 2 * head_dim]
            kv = kv.transpose(1, 2)[seen].view(len(seen), int(widths[0]), -1)  # the visible columns, in order
            per_layer.append(kv.flatten(1).float().cpu())
        rows.append(torch.stack(per_layer, 1))
    return torch.cat(rows), list(layers or [])


def _ridge_scores(z_fit: Tensor, y_fit: Tensor, z_eval: Tensor, classes: int) -> dict[float, Tensor]:
    """Predicted classes of ``z_eval`` for each ridge strength (kernel form: one eigendecomposition for all). The
    intercept (each class's share of the fitted items) is not penalised: with nothing in the features the probe
    predicts the most common class."""
    onehot = torch.nn.functional.one_hot(y_fit, classes).double()
    prior = onehot.mean(0)
    evals, evecs = torch.linalg.eigh(z_fit @ z_fit.T)
    projected = evecs.T @ (onehot - prior)
    cross = z_eval @ z_fit.T
    return {lam: (prior + cross @ (evecs @ (projected / (evals + lam * len(z_fit)).unsqueeze(1)))).argmax(1)
            for lam in LAMBDAS}


def _standardise(fit: Tensor, *others: Tensor) -> list[Tensor]:
    mu, sd = fit.mean(0), fit.std(0) + 1e-6
    return [(x - mu) / sd for x in (fit, *others)]


def probe_label(x: Tensor, y: Tensor, fit: Tensor, scored: Tensor, layers: list[int], label: str,
                generator: torch.Generator) -> LabelProbe:
    """Probe one label on features ``x`` ``[N, len(layers), F]`` (items ``fit`` to fit, ``scored`` to score;
    ``y`` -1 where the item has no such label)."""
    fit, scored = fit[y[fit] >= 0], scored[y[scored] >= 0]
    classes = int(y[torch.cat([fit, scored])].max()) + 1
    folds = torch.arange(len(fit)) % FOLDS
    cv: dict[tuple[int, float], float] = {}
    scores: dict[int, dict[float, float]] = {}
    for i in range(len(layers)):
        xs = x[fit, i].double()
        for f in range(FOLDS):
            z_in, z_out = _standardise(xs[folds != f], xs[folds == f])
            for lam, pred in _ridge_scores(z_in, y[fit][folds != f], z_out, classes).items():
                cv[i, lam] = cv.get((i, lam), 0.0) + float((pred == y[fit][folds == f]).sum())
        z_fit, z_scored = _standardise(xs, x[scored, i].double())
        scores[i] = {lam: float((p == y[scored]).double().mean())
                     for lam, p in _ridge_scores(z_fit, y[fit], z_scored, classes).items()}
    best_i, best_lam = max(cv, key=cv.get)
    shuffled = y.clone()
    shuffled[fit] = y[fit][torch.randperm(len(fit), generator=generator)]
    z_fit, z_scored = _standardise(x[fit, best_i].double(), x[scored, best_i].double())
    control = float((_ridge_scores(z_fit, shuffled[fit], z_scored, classes)[best_lam] == y[scored]).double().mean())
    counts = torch.bincount(y[scored], minlength=classes)
    return LabelProbe(label=label, n_fit=len(fit), n_scored=len(scored), classes=classes, layer=layers[best_i],
                      accuracy=scores[best_i][best_lam], constant=float(counts.max()) / len(scored),
                      shuffled=control, per_layer={layers[i]: s[best_lam] for i, s in scores.items()})


def default_layers(num_layers: int) -> list[int]:
    """Every fourth layer and the last (eight of SmolLM2-135M's 30)."""
    return sorted({*range(0, num_layers, 4), num_layers - 1})


def probe_channel(system: System, task: Task, n: int = 1500, layers: list[int] | None = None, seed: int = 0,
                  batch_size: int = 25, show_progress: bool = True) -> dict[str, LabelProbe]:
    """Probe what ``system``'s channel holds of ``task``'s answers on ``n`` fresh items (see the module docstring):
    one :class:`LabelProbe` per label that has at least :data:`MIN_SCORED` scored items."""
    if n < 3 * MIN_SCORED:
        raise ProbeError(f"probe needs at least {3 * MIN_SCORED} items, got {n}")
    items: list[Example] = task.training_examples(n, DRAW_SEED + seed, "answer",
                                                  exclude={e.question for e in task.load()})
    x, layers = channel_features(system, [task.views(e) for e in items], batch_size, layers, show_progress)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    fit, scored = order[: 2 * n // 3], order[2 * n // 3:]
    out = {}
    for label, values in answer_labels([e.answer for e in items]).items():
        y = torch.tensor(values)
        if int((y[scored] >= 0).sum()) >= MIN_SCORED and len(set(y[fit][y[fit] >= 0].tolist())) > 1:
            out[label] = probe_label(x, y, fit, scored, layers, label, generator)
    return out


def save_probe(path: Path, probes: dict[str, LabelProbe], settings: dict) -> None:
    """Write the probes and what was probed (``settings``: system, adapter, task, n, ...) as JSON."""
    labels = {label: {**asdict(p), "stderr": p.stderr} for label, p in probes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "labels": labels}, indent=2) + "\n")


def probe_table(probes: dict[str, LabelProbe]) -> list[str]:
    """A markdown table of the probes, one row per label."""
    lines = ["| label | items fitted / scored | probe accuracy (layer by CV) | best constant | shuffled labels |",
             "|---|---|---|---|---|"]
    for label, p in probes.items():
        name = label if label == "length" else f"place {label}"
        lines.append(f"| {name} | {p.n_fit} / {p.n_scored} | {p.accuracy:.2f} ± {p.stderr:.2f} (layer {p.layer}) | "
                     f"{p.constant:.2f} | {p.shuffled:.2f} |")
    return lines

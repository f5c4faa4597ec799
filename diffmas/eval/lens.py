"""What a channel's latent inputs say: the logit lens of the state fed to each latent position, read against the
answer.

A latent step feeds the writer's last hidden state, mapped into input-embedding space, as the next input. The
logit lens decodes that state with the LM head: its top-1 token is the token the state stands for where it is
token-like. On relay:digits this tells two ways of carrying a number apart: positions whose inputs *say* a
digit (the channel passes tokens, one per position at most) and positions whose inputs say nothing of it, where
whatever reaches the reader travels in their keys and values (what :mod:`diffmas.eval.probe` reads).

For every writer and latent position: the share of items whose top-1 token (stripped) is the answer's character at
each place ("said"); the share whose character there can be read from the token whatever form it takes ("read":
each token stands for its most common character on two thirds of the items, scored on the last third, so "seven"
and "7" both count); beside each, the share the most common character has (what one fixed token would match);
and the most common top-1 tokens. Items are drawn like the probe's (fresh, never evaluation items). Usage::

    diffmas lens --adapter RUN_DIR --task relay:digits --n 300
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from diffmas.decode import DecodeConfig
from diffmas.eval.probe import DRAW_SEED, ProbeError
from diffmas.rollout import rollout
from diffmas.systems import System
from diffmas.tasks import Example, Task

TOP_TOKENS = 5
"""How many of a position's most common top-1 tokens are reported."""


@dataclass(frozen=True)
class PositionLens:
    """The lens at one writer's latent position (1-based) over ``n`` items."""

    writer: str
    position: int
    n: int
    places: dict[str, float]
    """Place p (1-based, as a string) -> share of the items whose answer has a place p where the top-1 token is
    the character there."""
    constant: dict[str, float]
    """Place p -> the most common character's share there: what a position saying one fixed token would match."""
    read: dict[str, float]
    """Place p -> share of the scored items (the last third) whose character there is the one their top-1 token
    stands for: its most common character on the fitted items (the first two thirds), or, for a token not seen
    there, the most common character of all fitted items."""
    read_constant: dict[str, float]
    """Place p -> what the fitted items' most common character scores on the scored items (``read``'s floor)."""
    top_tokens: list[tuple[str, float]]
    """The most common top-1 tokens (stripped) and their shares."""
    tokens: list[str]
    """The top-1 token of every item, in item order (for analyses of one's own)."""


def lens_channel(system: System, task: Task, n: int = 300, seed: int = 0, batch_size: int = 25,
                 show_progress: bool = True) -> tuple[list[PositionLens], list[str]]:
    """The lens of every latent position of ``system``'s writers on ``n`` fresh items of ``task``, and the items'
    answers."""
    writers = [agent.role for agent in system.spec.topology.writers]
    if not writers or system.spec.writer_mode != "latent":
        raise ProbeError(f"system {system.kind.name!r} has no latent writers: there is no latent input to read")
    if n < 1:
        raise ProbeError(f"lens needs at least 1 item, got {n}")
    items: list[Example] = task.training_examples(n, DRAW_SEED + seed, "answer",
                                                  exclude={e.question for e in task.load()})
    said = latent_tokens(system, [task.views(e) for e in items], batch_size, show_progress)
    answers = [e.answer for e in items]
    return read_positions(answers, said), answers


def latent_tokens(system: System, prompts: list, batch_size: int = 25,
                  show_progress: bool = True) -> dict[tuple[str, int], list[str]]:
    """(writer, latent position) -> the top-1 lens token (stripped) of the state fed there, one per prompt, in
    order."""
    spec = replace(system.spec, lens_top_k=1)
    said: dict[tuple[str, int], list[str]] = {}
    for lo in tqdm(range(0, len(prompts), batch_size), disable=not show_progress, desc="lens", unit="batch"):
        # One decoded token is the cheapest way through the rollout's inference path; only the writers matter.
        result = rollout(system.backbone, spec, prompts[lo:lo + batch_size], decode_cfg=DecodeConfig(max_new_tokens=1))
        for record in result.per_question():
            for agent in record["agents"]:
                for step, top in enumerate(agent.get("latents") or []):
                    said.setdefault((agent["role"], step + 1), []).append(top[0].strip())
    return said


def read_positions(answers: list[str], said: dict[tuple[str, int], list[str]]) -> list[PositionLens]:
    """Score what each (writer, position) said (one stripped top-1 token per item, in ``answers``' order)."""
    fitted = 2 * len(answers) // 3
    out = []
    for (writer, position), tokens in said.items():
        places, constant, read, read_constant = {}, {}, {}, {}
        for place in range(1, max(map(len, answers)) + 1):
            chars = [(a[place - 1], t) for a, t in zip(answers, tokens) if len(a) >= place]
            places[str(place)] = sum(c == t for c, t in chars) / len(chars)
            constant[str(place)] = Counter(c for c, _ in chars).most_common(1)[0][1] / len(chars)
            fit = [(a[place - 1], t) for a, t in zip(answers[:fitted], tokens[:fitted]) if len(a) >= place]
            scored = [(a[place - 1], t) for a, t in zip(answers[fitted:], tokens[fitted:]) if len(a) >= place]
            if fit and scored:
                usual = Counter(c for c, _ in fit).most_common(1)[0][0]
                by_token: dict[str, Counter] = {}
                for c, t in fit:
                    by_token.setdefault(t, Counter())[c] += 1
                stands_for = {t: counts.most_common(1)[0][0] for t, counts in by_token.items()}
                read[str(place)] = sum(c == stands_for.get(t, usual) for c, t in scored) / len(scored)
                read_constant[str(place)] = sum(c == usual for c, _ in scored) / len(scored)
        top = [(token, count / len(tokens)) for token, count in Counter(tokens).most_common(TOP_TOKENS)]
        out.append(PositionLens(writer, position, len(tokens), places, constant, read, read_constant, top,
                                list(tokens)))
    return out


def save_lens(path: Path, lenses: list[PositionLens], settings: dict, answers: list[str]) -> None:
    """Write the lens, the items' answers and what was read (``settings``: system, adapter, task, n, ...) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "answers": answers, "positions": [asdict(x) for x in lenses]})
                    + "\n")


def lens_table(lenses: list[PositionLens]) -> list[str]:
    """A markdown table, one row per writer and latent position."""
    places = sorted({p for x in lenses for p in x.places}, key=int)
    lines = ["| writer | position | n | " + " | ".join(f"place {p}: said (constant) / read (constant)" for p in places)
             + " | most common top-1 tokens |", "|---|---|---|" + "---|" * len(places) + "---|"]
    for x in lenses:
        cells = [f"{x.places[p]:.2f} ({x.constant[p]:.2f}) / " + (f"{x.read[p]:.2f} ({x.read_constant[p]:.2f})"
                                                                   if p in x.read else "–")
                 if p in x.places else "–" for p in places]
        tops = ", ".join(f"{t!r} {share:.2f}" for t, share in x.top_tokens)
        lines.append(f"| {x.writer} | {x.position} | {x.n} | " + " | ".join(cells) + f" | {tops} |")
    return lines

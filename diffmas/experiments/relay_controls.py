"""The relay study's controls: each trained arm's test items evaluated again with one thing taken away (the gate
closed, the thoughts swapped for another item's), where their samples go, and the report's tables of them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

GATE_CLOSED = "gate-closed"
"""Where a gated arm's test items evaluated with its gate closed go: ``docs/gate-closed/<id>.jsonl``."""
SHUFFLED_THOUGHT = "shuffled-thought"
"""Where an arm's test items evaluated with each writer fed the thoughts it computed on another item go:
``docs/shuffled-thought/<id>.jsonl`` (``diffmas eval --shuffle-thought``)."""
CONTROLS_RUN = (GATE_CLOSED, SHUFFLED_THOUGHT)


def control_table(control: str, runs: list[tuple[str, dict[str, bool], list[dict]]], n_boot: int = 10_000,
                  places: Callable[[str, list[dict]], dict[int, tuple[float, float, int]] | None] | None = None
                  ) -> list[str]:
    """Each run's test items as trained and under ``control`` (:data:`GATE_CLOSED` or :data:`SHUFFLED_THOUGHT`;
    ``runs``: ``(label, trained, controlled)``, item id -> correct and the control's kept samples), with the paired
    difference; [] where no run was evaluated so. Under shuffled thoughts, also how often the answer is the
    answer of the item whose thoughts were fed (items whose answers differ), and where ``places(label, samples)``
    reads them (the digits), place by place: the thought's digit / the item's own (items that differ there)."""
    from diffmas.eval.compare import paired_bootstrap

    shuffled = control == SHUFFLED_THOUGHT
    rows = []
    for label, trained, samples in runs:
        controlled = {s["id"]: s["correct"] for s in samples}
        ci = paired_bootstrap({0: controlled}, {0: trained}, n_boot=n_boot)
        n = len(set(trained) & set(controlled))
        row = (f"| {label} | {n} | {sum(trained.values()) / len(trained):.3f} | "
               f"{sum(controlled.values()) / len(controlled):.3f} | {100 * ci.diff:+.1f} [{100 * ci.low:+.1f}, "
               f"{100 * ci.high:+.1f}] |")
        if shuffled:
            differ = [s for s in samples if s["thought_gold"] != s["gold"]]
            other = sum(s["extracted"] == s["thought_gold"] for s in differ)
            row += f" {other / len(differ):.3f} ({len(differ)}) |" if differ else " – |"
            split = places(label, samples) if places else None
            row += (" " + ", ".join(f"{p}: {t:.2f} / {o:.2f}" for p, (t, o, _) in split.items()) + " |") if split \
                else " – |"
        rows.append(row)
    if not rows:
        return []
    if shuffled:
        return ["The same test items with each writer fed, at its latent steps, the thoughts it computed on another "
                "item of the set (its own prompt prefilled as trained; `diffmas eval --shuffle-thought`): how much of "
                "the answer comes from the thoughts' content, and how often the reader answers the other item's "
                "answer instead (items whose answers differ).", "",
                "| run | n | accuracy as trained | thoughts shuffled | shuffled - trained, points [95% CI] | "
                "the other item's answer (n) | by place: the thought's digit / the item's own |",
                "|---|---|---|---|---|---|---|", *rows, ""]
    return ["The same test items with the gate closed (set to 0 at evaluation: every position is fed pause's trained "
            "embedding alone, the adapters as trained): how much of the answer the reader takes from the thought.",
            "", "| run | n | accuracy as trained | gate closed | closed - trained, points [95% CI] |",
            "|---|---|---|---|---|", *rows, ""]


def controls_tables(docs: Path, controls: tuple[str, ...], runs: dict[str, list[dict]], n_boot: int = 10_000,
                    places: Callable[[str, list[dict]], dict[int, tuple[float, float, int]] | None] | None = None
                    ) -> list[str]:
    """:func:`control_table` for each of ``controls`` over the ``runs`` (run id -> its test samples as trained)
    evaluated under it (``docs/<control>/<run id>.jsonl``)."""
    text = []
    for control in controls:
        paths = {i: docs / control / f"{i}.jsonl" for i in runs}
        text += control_table(control, [(i, {s["id"]: s["correct"] for s in runs[i]},
                                         [json.loads(line) for line in path.read_text().splitlines()])
                                        for i, path in paths.items() if path.is_file()], n_boot, places)
    return text

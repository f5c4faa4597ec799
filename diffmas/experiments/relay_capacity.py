"""How much the relay:digits channel carries: the ladder (exact repeats per number of digits k, one line per arm)
and the m sweep (the bits that reached the answer against the positions passed, one line per kind of channel).

The sweep regroups the arms of one kind that differ only in how many positions they pass (``coupled_anneal`` at
m = 1, 2, 4, 6, ...; the trained text channel at its two caps), so that "how many digits do m latent steps carry"
reads off one line, beside a text message of as many tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from diffmas.experiments.curves import arm_styles
from diffmas.experiments.relay import FULL, TEXT, arm_key
from diffmas.experiments.relay_answers import Rung, ladder

__all__ = ["SweepPoint", "capacity_plot", "channel", "sweep_points", "sweep_table", "without_m"]

ALL_DIGITS_BITS = math.log2(9 * 10 ** 5)
"""What the answer must receive to name a 6-digit number (the ladder's top rung): 19.8 bits."""


def without_m(key: str) -> str:
    """An arm key without its sweep's ``-m<m>``: ``coupled_anneal_full-m1`` -> ``coupled_anneal_full``."""
    return re.sub(r"-m\d+$", "", key)


def channel(rec: dict) -> tuple[float, str]:
    """What an arm passes to the final agent: (positions, a label): m latent positions, the text message's tokens
    (mean over items, at most its cap), or nothing for the single agent that reads the number itself."""
    if rec["system"] == "single_sft":
        return 0.0, "sees the number"
    if rec["system"] in TEXT:
        return rec["positions_passed"], f"text, {rec['positions_passed']:.1f} tokens"
    return rec["latent_steps"], f"m = {rec['latent_steps']}"


def _kind(rec: dict) -> str:
    """The kind of channel an arm trains, whatever its size: the arm's name without its m and without the run on to
    the cap (a longer budget of the same run); the text arms by whether their writer was trained."""
    if rec["system"] in TEXT:
        return "text, trained writer" if rec["system"] == "text_sft" else "text, untrained writer"
    return without_m(arm_key(rec)).removesuffix(FULL)


@dataclass(frozen=True)
class SweepPoint:
    """One size of one kind of channel: the arm measured there (the longest-trained where several are) and what
    reached the answer through it, pooled over its training seeds."""

    kind: str
    arm: str
    positions: float
    rungs: dict[int, Rung]
    seeds: int

    @property
    def bits(self) -> float:
        """The most information about the number that reached the answer at any k (a lower bound: Rung.bits)."""
        return max(r.bits for r in self.rungs.values())

    @property
    def top_k(self) -> int:
        """The most digits repeated in at least 90% of the items, with every shorter number too (0: not one)."""
        top = 0
        for k, rung in sorted(self.rungs.items()):
            if rung.accuracy < 0.9:
                break
            top = k
        return top


def sweep_points(records: list[dict], outcomes: dict[str, dict[int, dict[str, bool]]]) -> dict[str, list[SweepPoint]]:
    """Per kind of channel measured at two sizes or more, its points in order of positions. ``records``: the
    relay:digits arms' records; ``outcomes``: their per-item outcomes by arm key and seed."""
    # An arm is as long-trained as its shortest seed: a run on to the cap (every seed at the cap) wins over the
    # same arm pooled with a seed that the flat-loss rule stopped; then the arm with more seeds.
    budgets: dict[str, list[int]] = {}
    sizes: dict[str, tuple[str, float]] = {}
    for rec in records:
        if channel(rec)[0] and arm_key(rec) in outcomes:
            budgets.setdefault(arm_key(rec), []).append(rec["steps_trained"])
            sizes[arm_key(rec)] = (_kind(rec), channel(rec)[0])
    chosen: dict[tuple[str, float], str] = {}
    for key in sorted(budgets, key=lambda k: (min(budgets[k]), len(budgets[k]))):
        chosen[sizes[key]] = key  # the best-ranked arm of each size is written last
    kinds: dict[str, list[SweepPoint]] = {}
    for (kind, positions), key in sorted(chosen.items()):
        seeds = outcomes[key]
        kinds.setdefault(kind, []).append(SweepPoint(kind, key, positions, ladder(seeds), len(seeds)))
    return {kind: points for kind, points in kinds.items() if len(points) > 1}


def sweep_table(kinds: dict[str, list[SweepPoint]]) -> list[str]:
    """The m sweep as a Markdown table (empty while no kind of channel has been measured at two sizes)."""
    if not kinds:
        return []
    lines = ["How much crosses per position (the m sweep): each kind of channel at every size measured (where a run "
             "was trained on to the cap, that run). Bits: the lower bound of the ladder's table; top k: the most "
             "digits repeated in >= 90% of items, every shorter number too.", "",
             "| channel | positions passed | arm | seeds | bits reaching the answer | per position | top k |",
             "|---|---|---|---|---|---|---|"]
    for kind, points in kinds.items():
        for p in points:
            size = f"{p.positions:g}" if float(p.positions).is_integer() else f"{p.positions:.1f}"
            lines.append(f"| {kind} | {size} | {p.arm} | {p.seeds} | {p.bits:.1f} | "
                         f"{p.bits / p.positions:.2f} | {p.top_k} |")
    return lines + [""]


def capacity_plot(arms: dict[str, dict], kinds: dict[str, list[SweepPoint]], docs: Path) -> Path | None:
    """``capacity.png``: the ladder of every arm (``arms``: label -> outcomes by seed) and, once some kind of channel
    has two sizes, the sweep beside it. None where no arm is given."""
    rows = {key: ladder(seeds) for key, seeds in arms.items()}
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if kinds else 1, figsize=(15 if kinds else 10, 5.5), squeeze=False)
    ax = axes[0][0]
    styles = arm_styles(sorted(rows))
    for key, rungs in sorted(rows.items()):
        style = "--" if key.startswith("pause") else ":" if "text" in key else "-"
        ax.errorbar(list(rungs), [r.accuracy for r in rungs.values()], yerr=[r.stderr for r in rungs.values()],
                    fmt=style, capsize=2, label=key, **styles[key])
    ks = sorted({k for rungs in rows.values() for k in rungs})
    ax.plot(ks, [10.0 ** -k for k in ks], ":", color="gray", label="chance (1 / 10^k)")
    ax.set_xlabel("digits k the writer sees")
    ax.set_ylabel("accuracy of the final agent (exact number)")
    ax.set_title("the ladder: exact repeats per number of digits")
    ax.set_ylim(-0.02, 1.02)
    # Outside the axes: inside, 15+ entries hid the curves they name.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if kinds:
        _sweep_axes(axes[0][1], kinds)
    fig.suptitle("relay:digits: what the channel carries")
    fig.tight_layout()
    path = docs / "capacity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep_axes(ax, kinds: dict[str, list[SweepPoint]]) -> None:
    styles = arm_styles(sorted(kinds))
    for kind, points in kinds.items():
        ax.plot([p.positions for p in points], [p.bits for p in points], ":" if "text" in kind else "-",
                label=kind, **styles[kind])
    ax.axhline(ALL_DIGITS_BITS, color="gray", linestyle=":", label="a whole 6-digit number")
    ax.set_xscale("log", base=2)
    sizes = [p.positions for points in kinds.values() for p in points]
    ticks = [t for t in (1, 2, 4, 6, 8, 16, 24, 32) if min(sizes) / 1.5 <= t <= max(sizes) * 1.5]
    ax.set_xticks(ticks, [str(t) for t in ticks])  # the sweep's m; text sizes (mean tokens) fall between them
    ax.minorticks_off()
    ax.set_xlabel("positions passed to the final agent (latent steps m, or text tokens)")
    ax.set_ylabel("bits that reached the answer (lower bound)")
    ax.secondary_yaxis("right", functions=(lambda b: b / math.log2(10), lambda d: d * math.log2(10))) \
        .set_ylabel("decimal digits")
    ax.set_title("the m sweep: information per position")
    ax.set_ylim(-0.5, ALL_DIGITS_BITS + 1.5)
    ax.legend(fontsize=7)

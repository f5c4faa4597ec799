"""What the relay study's answers say beyond exact accuracy.

The digits: the ladder (exact repeats per number of digits k, with the bits that must have crossed), what reached the
answer place by place, and what crossed the text channels. The sums: how close the answers came (exact per number
of terms, the sign, within :data:`NEAR` of the sum) and the per-item outcomes that ``compare`` pairs for it.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from diffmas.eval.compare import Comparison
from diffmas.tasks import get_task


@dataclass(frozen=True)
class Rung:
    """One step of the digits ladder: how often the final agent repeated a k-digit number exactly."""

    k: int
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def stderr(self) -> float:
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.n)

    @property
    def bits(self) -> float:
        """A lower bound on the information about the number that reached the answer (Fano's inequality, with the
        measured accuracy plugged in): log2 N - h(e) - e log2(N - 1) for N equally likely numbers and error rate e;
        0 at chance. By data processing the channel carried at least as much."""
        values = 10 if self.k == 1 else 9 * 10 ** (self.k - 1)
        error = 1 - self.accuracy
        if self.accuracy <= 1 / values:
            return 0.0
        entropy = 0.0 if error in (0.0, 1.0) else -error * math.log2(error) - (1 - error) * math.log2(1 - error)
        return max(0.0, math.log2(values) - entropy - error * math.log2(values - 1))


def ladder(outcomes: dict[int, dict[str, bool]]) -> dict[int, Rung]:
    """Exact-repeat outcomes per number of digits k (from item ids ``digits<k>-<seed>``), pooled over seeds."""
    by_k: dict[int, list[bool]] = defaultdict(list)
    for items in outcomes.values():
        for item, correct in items.items():
            by_k[int(item.split("-")[0].removeprefix("digits"))].append(correct)
    return {k: Rung(k, sum(v), len(v)) for k, v in sorted(by_k.items())}


def digit_places(answers: list[tuple[str, str | None]]) -> dict[str, tuple[int, int]]:
    """What of each number reached the answer, place by place: (right, items) for the length and for the 1st, 2nd,
    ... digit (over the items that have that place). ``answers``: (relay:digits item id, extracted answer) pairs,
    pooled over training seeds; the numbers are regenerated from the ids' seeds."""
    task = get_task("relay:digits")
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for item, answer in answers:
        gold, said = task.item(int(item.split("-")[1])).answer, answer or ""
        counts["length"][0] += len(said) == len(gold)
        counts["length"][1] += 1
        for place, digit in enumerate(gold, start=1):
            counts[str(place)][0] += said[place - 1:place] == digit
            counts[str(place)][1] += 1
    return {key: (right, n) for key, (right, n) in counts.items()}


def thought_places(samples: list[dict]) -> dict[int, tuple[float, float, int]]:
    """Under shuffled thoughts (relay:digits, the samples of ``docs/shuffled-thought``): per place of the number,
    over the items whose own number and the thought's differ there, the share of answers with the thought's digit
    there, the share with the item's own, and how many items: which places travel in the thoughts."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in samples:
        said, own, other = s.get("extracted") or "", s["gold"], s["thought_gold"]
        for place in range(1, min(len(own), len(other)) + 1):
            if own[place - 1] != other[place - 1]:
                row = counts[place]
                row[0] += said[place - 1:place] == other[place - 1]
                row[1] += said[place - 1:place] == own[place - 1]
                row[2] += 1
    return {place: (t / n, o / n, n) for place, (t, o, n) in sorted(counts.items())}


def number_sent(item: str, messages: list[str]) -> bool:
    """Whether a text channel's messages hold the relay:digits item's whole number (not as part of a longer one)."""
    gold = get_task("relay:digits").item(int(item.split("-")[1])).answer
    return any(re.search(rf"(?<!\d){gold}(?!\d)", m) for m in messages)


def messages_table(samples_by_arm: dict[str, list[dict]]) -> list[str]:
    """Per text arm and k: how often the writer's message held the whole number, and how often the reader then
    repeated it (a failure is the writer's when the number never crossed, the reader's when it did)."""
    if not samples_by_arm:
        return []
    lines = ["What crossed the text channels: items whose writer message holds the whole number, and of those, the "
             "share the final agent repeated exactly:", "", "| arm | number in the message | repeated when it was |",
             "|---|---|---|"]
    for key, samples in samples_by_arm.items():
        sent = [s for s in samples if number_sent(s["id"], s["messages"])]
        repeated = sum(bool(s["correct"]) for s in sent)
        share = f"{repeated / len(sent):.2f} ({repeated}/{len(sent)})" if sent else "–"
        lines.append(f"| {key} | {len(sent) / len(samples):.2f} ({len(sent)}/{len(samples)}) | {share} |")
    return lines + [""]


def places_table(answers_by_arm: dict[str, list[tuple[str, str | None]]]) -> list[str]:
    rows = {key: digit_places(answers) for key, answers in answers_by_arm.items()}
    places = sorted({p for r in rows.values() for p in r if p != "length"}, key=int)
    lines = ["What reached the answer, place by place (share right, items with that place; chance: 1/6 for the "
             "length, about 1/10 per digit):", "",
             "| arm | length | " + " | ".join(f"digit {p}" for p in places) + " |", "|---|---|" + "---|" * len(places)]
    for key, row in rows.items():
        cells = [f"{row[p][0] / row[p][1]:.2f} ({row[p][1]})" if p in row else "–" for p in ["length", *places]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines + [""]


NEAR = 5
"""An answer within this much of the sum counts as near (the sums of 2-4 terms of 1-2 digits span a few hundred)."""


def _judged(task: str, answers: list[tuple[str, str | None]]) -> list[tuple[str, dict[str, bool]]]:
    """Each answer of a sum task judged three ways: (item id, {"<n> terms": exact, "sign": sign right, "within
    NEAR": near the sum}). ``answers``: (item id, extracted answer) pairs of the task's evaluation items (the first
    ones it loads; other ids are left out); an answer that is not a number counts as wrong."""
    items = {e.id: e for e in get_task(task).load(max(len({i for i, _ in answers}), 1))}
    judged = []
    for item, answer in answers:
        if item not in items:
            continue
        gold = int(items[item].answer)
        try:
            said = int(answer or "")
        except ValueError:
            said = None
        judged.append((item, {f"{items[item].meta['num_terms']} terms": said == gold,
                              "sign": said is not None and (said < 0) == (gold < 0),
                              f"within {NEAR}": said is not None and abs(said - gold) <= NEAR}))
    return judged


def sum_closeness(task: str, answers: list[tuple[str, str | None]]) -> dict[str, tuple[int, int]]:
    """How close the answers came on a sum task: (right, items) for the exact answer per number of terms, for the
    sign, and for an answer within :data:`NEAR` of the sum (see :func:`_judged`)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _, verdicts in _judged(task, answers):
        for key, right in verdicts.items():
            counts[key][0] += right
            counts[key][1] += 1
    return {key: (right, n) for key, (right, n) in counts.items()}


def near_outcomes(task: str, runs: dict[int, list[tuple[str, str | None]]]) -> dict[int, dict[str, bool]]:
    """Per training seed, per item: was the answer within :data:`NEAR` of the sum (the outcomes ``compare`` pairs)."""
    return {seed: {item: v[f"within {NEAR}"] for item, v in _judged(task, answers)} for seed, answers in runs.items()}


def near_table(comps: list[Comparison]) -> list[str]:
    """Paired differences in the share of answers near the sum: finer than exact answers, which a channel that
    carries a sum's size but not its last digit never gets right."""
    if not comps:
        return []
    lines = [f"Paired differences in the share of answers within {NEAR} of the sum (95% paired bootstrap interval; "
             "a finer measure than exact answers, which the goals are judged on):", "",
             f"| arm - baseline | n | seeds | share within {NEAR} (arm / baseline) | diff pp [95% CI] | verdict |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c.arm} - {c.baseline} | {c.n_items} | {c.n_seeds_arm} vs {c.n_seeds_base} | {c.acc_arm:.3f} / "
              f"{c.acc_base:.3f} | {100 * c.diff:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}] | {c.verdict} |"
              for c in comps]
    return lines + [""]


def closeness_table(task: str, answers_by_arm: dict[str, list[tuple[str, str | None]]]) -> list[str]:
    rows = {key: sum_closeness(task, answers) for key, answers in answers_by_arm.items()}
    columns = sorted({c for r in rows.values() for c in r if c.endswith("terms")}) + ["sign", f"within {NEAR}"]
    lines = ["How close the answers came (share, items): exact per number of terms, the sign right, within "
             f"{NEAR} of the sum:", "", "| arm | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, row in rows.items():
        lines.append(f"| {key} | " + " | ".join(f"{row[c][0] / row[c][1]:.2f} ({row[c][1]})" if c in row else "–"
                                               for c in columns) + " |")
    return lines + [""]

"""The relay study's report, rebuilt from its committed files after every finished arm.

Reads ``docs/arms/*.json`` and ``docs/samples/*.jsonl`` and writes ``results.json``, ``README.md`` (per task: every
arm with its floor, the positions and K/V bytes it passed to the final agent and its training budget; the paired
comparisons the study's claims rest on; the goals, each met or not with its interval), the capacity plot and the m
sweep's table (``relay_capacity``) and the held-out loss curves.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from diffmas.eval.compare import Comparison, common_items, compare, markdown_table
from diffmas.experiments.curves import gate_table, plot_heldout
from diffmas.experiments.relay import (CONTROLS, DIGITS, FULL, RECIPES, SWEEP, TEXT, arm_key, plan_arms, run_id,
                                      study_config)
from diffmas.experiments.relay_arm import channel_seconds
from diffmas.experiments.relay_controls import CONTROLS_RUN, controls_tables
from diffmas.experiments.relay_capacity import capacity_plot, channel, sweep_points, sweep_table, without_m
from diffmas.experiments.relay_answers import (closeness_table, digit_places, ladder, messages_table, near_outcomes,
                                               near_table, places_table, thought_places)
from diffmas.experiments.relay_cost import remaining_line
from diffmas.train.resume import INHERITED

# (arm, baseline) pairs whose paired difference the study reports, per task.
_RECIPES = ("", *RECIPES)


def _against_controls(controls: tuple[str, ...], recipes: tuple[str, ...], base: str = "coupled"
                      ) -> list[tuple[str, str]]:
    """``base`` (coupled) against each control under the same recipe: as the flat-loss rule stopped them, the control
    run on to the cap, both run on to the cap, and ``base`` run on against a control that reached the cap itself
    (kept only where it did: :func:`_reported`)."""
    return [pair for r in recipes for c in controls for pair in (
        (f"{base}{r}", f"{c}{r}"), (f"{base}{r}", f"{c}{r}{FULL}"), (f"{base}{r}{FULL}", f"{c}{r}{FULL}"),
        (f"{base}{r}{FULL}", f"{c}{r}"))]


def _run_on(key: str) -> bool:
    """Whether an arm key names a run on to the cap (``<arm>_full``, with or without a sweep's ``-m<m>``)."""
    return without_m(key).endswith(FULL)


def _reported(arm: str, baseline: str, arms: dict[str, dict]) -> bool:
    """A run on to the cap is paired with a baseline as stopped only where no seed of that baseline stopped early:
    then it trained to the cap itself and has no run on of its own, and this is the equal-budget pair."""
    return not (_run_on(arm) and not _run_on(baseline) and any(arms[baseline]["stopped_early"]))


SWEEP_PAIRS = [(f"{a}-m{m}", f"{b}-m{m}") for m in SWEEP
               for a, b in _against_controls(("pause", "kvonly", "gated"), ("_anneal",))
               + _against_controls(("pause",), ("_anneal",), base="gated")]
"""Coupled against pause, kvonly and gated, and gated against pause, at each m of the sweep (the arms' keys end in
-m<m>)."""

PAIRS = {
    "relay:chain_sum": [("coupled", "blind"), ("coupled", "text_m"), ("coupled", "text_4m"), ("coupled", "text_sft_m"),
                        ("text_sft_m", "text_m"), ("coupled", "open"), ("open", "skyline"), ("open", "blind"),
                        ("coupled_ae", "coupled"), ("coupled_anneal", "coupled")]
    + _against_controls(("detached", "pause", "gated"), _RECIPES) + _against_controls(("pause",), RECIPES, base="gated")
    + [(f"coupled{r}", b) for r in RECIPES for b in ("blind", "open")],
    "split:chain_sum": _against_controls(("half_a", "half_b"), _RECIPES),
    "relay:digits": _against_controls(("detached", "frozen", "pause", "kvonly"), _RECIPES)
    + [("coupled", "text_m"), ("coupled", "text_4m"), ("coupled", "text_sft_m"), ("coupled", "text_sft_4m"),
       ("text_sft_m", "text_m"), ("coupled", "skyline"), ("coupled_long", "coupled"),
       ("coupled_anneal", "coupled"), (f"coupled_anneal{FULL}", f"coupled{FULL}"),
       ("coupled_anneal", "text_sft_m"), ("coupled_anneal", "text_sft_4m")] + SWEEP_PAIRS,
}


def _load(docs: Path) -> tuple[list[dict], dict[str, dict[str, dict[int, dict[str, bool]]]], dict[str, list[dict]]]:
    """The finished arms' records (with :func:`_as_run_on` entries), their per-item outcomes by task, arm and seed,
    and their kept samples by run."""
    arms = [json.loads(p.read_text()) for p in sorted((docs / "arms").glob("*.json"))]
    arms += [alias for rec in arms if (alias := _as_run_on(rec, arms)) is not None]
    outcomes: dict = defaultdict(lambda: defaultdict(dict))
    samples: dict = {}
    for rec in arms:
        stem = run_id(rec)
        samples[stem] = samples[rec[SAME_RUN]] if SAME_RUN in rec else \
            [json.loads(line) for line in (docs / "samples" / f"{stem}.jsonl").read_text().splitlines()]
        outcomes[rec["task"]][arm_key(rec)][rec["seed"]] = {s["id"]: bool(s["correct"]) for s in samples[stem]}
    return arms, outcomes, samples


SAME_RUN = "same_run_as"
"""Marks a record that repeats another run's under its ``<arm>_full`` name (:func:`_as_run_on`)."""


def _as_run_on(rec: dict, records: list[dict]) -> dict | None:
    """An arm that trained to its step cap without the flat-loss rule stopping it is its own run to the cap: where
    ``<arm>_full`` exists at another seed, the same record under that name (marked :data:`SAME_RUN`, no cost of its
    own), so that the runs to the cap pool over every seed. None where that does not apply."""
    full = rec.get("arm", "") + FULL
    m = arm_key(rec).removeprefix(rec.get("arm", ""))
    if rec.get("arm", "").endswith(FULL) or rec.get("stopped_early") or \
            rec.get("steps_trained") != rec.get("config", {}).get("steps"):
        return None
    named = [r for r in records if r.get("arm") == full and r["task"] == rec["task"] and arm_key(r) == full + m]
    if not named or any(r["seed"] == rec["seed"] for r in named):
        return None
    return {**rec, "arm": full, "label": f"{full}{m}/s{rec['seed']}", SAME_RUN: run_id(rec), "eval_seconds": 0}


def _summary(c: Comparison) -> dict:
    return {"arm": c.arm, "baseline": c.baseline, "acc_arm": c.acc_arm, "acc_base": c.acc_base, "diff": c.diff,
            "ci_low": c.ci_low, "ci_high": c.ci_high, "paired_p": c.paired_p, "n_items": c.n_items,
            "seeds_arm": c.n_seeds_arm, "seeds_base": c.n_seeds_base, "verdict": c.verdict}


def _curves(records: list[dict], docs: Path) -> dict[str, list[tuple[str, Path]]]:
    """The committed training curve of each trained run, by task: (label, path)."""
    runs: dict[str, list] = {}
    for rec in records:
        path = docs / "curves" / f"{run_id(rec)}.jsonl"
        if path.is_file():  # text arms are not trained
            runs.setdefault(rec["task"], []).append((rec["label"], path))
    return runs


def _seconds(rec: dict, docs: Path) -> tuple[float, float | None]:
    """(training steps, held-out evaluations) an arm's process(es) spent, in seconds, from its curve: every process
    that trained it counts (a run's own ``train_seconds`` holds only the last one's, after a resume), the steps a
    continued run copied from another do not (counted there). Held-out evaluations: None unless the curve timed
    every one of them (from 2026-12-06 on). (0, None) for text arms, which have no curve."""
    path = docs / "curves" / f"{run_id(rec)}.jsonl"
    if not path.is_file():
        return 0.0, None
    records = [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
               if INHERITED not in r]
    heldout = [r.get("heldout_seconds") for r in records if "heldout_loss" in r]
    return sum(r.get("seconds", 0.0) for r in records), None if not heldout or None in heldout else sum(heldout)


def _core_seconds(rec: dict, docs: Path) -> float:
    """Every second an arm cost that was timed: training steps, held-out evaluations, the test evaluation, the
    probe of its channel and its lens curve."""
    steps, heldout = _seconds(rec, docs)
    return steps + (heldout or 0.0) + rec.get("eval_seconds", 0.0) + (channel_seconds(docs, run_id(rec)) or 0.0)


def _probes_table(docs: Path, answers: dict[str, list[tuple[str, str | None]]]) -> list[str]:
    """What each probed channel holds (linear probe, ``docs/probes``) beside what its reader repeated, place by
    place; ``answers``: (item id, extracted answer) pairs per run id."""
    probes = {path.stem: json.loads(path.read_text()) for path in sorted((docs / "probes").glob("*.json"))}
    if not probes:
        return []
    places = sorted({label for p in probes.values() for label in p["labels"] if label != "length"}, key=int)
    lines = ["What the positions hold against what the reader repeated: linear probes on the K/V the reader attends "
             "to (`diffmas probe`: ridge per layer, layer and strength by cross-validation on two thirds of n fresh "
             "items, scored on the rest), shown as held (the probe's accuracy) / repeated (the reader's share right on "
             "the evaluation items); the probes' "
             "shuffled-label controls are at most the last column.", "",
             "| run | m | n | length | " + " | ".join(f"digit {p}" for p in places) + " | shuffled (max) |",
             "|---|---|---|---|" + "---|" * (len(places) + 1)]
    for stem, probe in probes.items():
        read = digit_places(answers[stem]) if stem in answers else {}
        cells = []
        for label in ["length", *places]:
            held = probe["labels"].get(label)
            said = f" / {read[label][0] / read[label][1]:.2f}" if label in read else ""
            cells.append(f"{held['accuracy']:.2f}{said}" if held else "–")
        shuffled = max(p["shuffled"] for p in probe["labels"].values())
        settings = probe["settings"]
        lines.append(f"| {stem} | {settings.get('latent_steps', '–')} | {settings.get('n', '–')} | "
                     + " | ".join(cells) + f" | {shuffled:.2f} |")
    return lines + [""]


def _spans(steps: list[int], read: list[int]) -> str:
    """``steps`` (a subset of the ``read`` checkpoints) as runs of consecutive checkpoints: "200-350, 450"."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and read.index(step) == read.index(runs[-1][-1]) + 1:
            runs[-1].append(step)
        else:
            runs.append([step])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "never"


def _lens_table(docs: Path, at_least: float = 0.5) -> list[str]:
    """When each probed run's latent inputs named the answer's first and second digit over training (the logit lens
    at its checkpoints, ``docs/lens/curves``), beside the held-out loss at those steps."""
    from diffmas.eval.lens_curve import naming_steps

    curves = {path.stem: json.loads(path.read_text()) for path in sorted((docs / "lens" / "curves").glob("*.json"))}
    if not curves:
        return []
    lines = ["When the latent inputs named a digit over training: the logit lens of the state fed to each latent "
             "position (pause: the writer's state there, which its map discards; gated: the state its gate scales) "
             "at the run's checkpoints (`diffmas lens-curve`, the same fresh items at every step; "
             f"[lens/](lens/README.md)). Named: at least {at_least:.1f} of the scored items' top-1 tokens stand for "
             "the digit (\"read\"; one fixed token scores 0.1-0.2).", "",
             "| run | checkpoints read (n items) | position | first digit named at steps | held-out loss there | "
             "second digit named at steps | plot |", "|---|---|---|---|---|---|---|"]
    for stem, curve in curves.items():
        read = sorted(p["step"] for p in curve["points"])
        loss = {p["step"]: p["heldout_loss"] for p in curve["points"]}
        second = naming_steps(curve, "2", at_least)
        plot = f"[plot](lens/curves/{stem}.png)" if (docs / "lens" / "curves" / f"{stem}.png").is_file() else "–"
        for key, first in naming_steps(curve, "1", at_least).items():
            there = [loss[s] for s in first if loss.get(s) is not None]
            span = "–" if not there else f"{min(there):.3f}" + (f"-{max(there):.3f}" if max(there) > min(there) else "")
            lines.append(f"| {stem} | {_spans(read, read)} ({curve['settings']['n']}) | {key[0]} {key[1]} | "
                         f"{_spans(first, read)} | {span} | {_spans(second[key], read)} | {plot} |")
    return lines + [""]


def _precision_line(records: list[dict]) -> str:
    """How many trained runs computed in which precision (as resolved on their machine): arms in different
    precisions are not comparable, so a mix must be visible."""
    trained = [r for r in records if r.get("steps_trained")]
    counts = Counter(r.get("mixed_precision", "not recorded") for r in trained)
    names = {"no": "fp32", "bf16": "bf16 autocast"}
    found = ", ".join(f"{names.get(k, k)}: {n}" for k, n in sorted(counts.items()))
    line = f"Precision of the trained runs: {found}."
    if "not recorded" in counts:
        line += " Runs that did not record it predate the record (PLAN.md, Precision)."
    if set(counts) - {"no", "not recorded"}:
        line += " **Not every run trained in fp32, the study's precision: those arms are not comparable.**"
    return line


def _hours_line(hours: float, records: list[dict], docs: Path) -> str:
    """What the study cost so far, and what that count leaves out."""
    seconds = [_seconds(r, docs) for r in records]
    timed = [(steps, heldout) for steps, heldout in seconds if heldout is not None]
    line = f"Core-hours so far (training steps, test evaluations and held-out evaluations where timed): {hours:.1f}."
    if len(timed) < sum(steps > 0 for steps, _ in seconds):
        added = sum(h for _, h in timed) / max(sum(s for s, _ in timed), 1e-9)
        share = (f" Where timed ({len(timed)} of {len(seconds)} runs) they added {100 * added:.0f}% to the training "
                 "steps' time.")
        share = share if timed else ""
        line += f" Held-out evaluations are timed from 2026-12-06 on and not counted before.{share}"
    return line


def _goals(outcomes: dict, by_arm: dict, comps: dict[str, list[Comparison]]) -> list[str]:
    """The issue's goals, each stated as met, not met, or not measured yet, with the numbers behind it."""
    lines = []
    digits = outcomes.get("relay:digits", {})
    for recipe in _RECIPES:  # coupled under each recipe trained on the digits
        key = f"coupled{recipe}{FULL}" if f"coupled{recipe}{FULL}" in digits else f"coupled{recipe}"  # at the cap
        if key not in digits or (k1 := ladder(digits[key]).get(1)) is None:
            continue
        seeds = [ladder({seed: items})[1].accuracy for seed, items in sorted(digits[key].items())]
        per_seed = f"; per seed {' / '.join(f'{a:.2f}' for a in seeds)}" if len(seeds) > 1 else ""
        lines.append(f"- relay:digits, {key}, k = 1: accuracy {k1.accuracy:.3f} ± {k1.stderr:.3f} (n = {k1.n}"
                     f"{per_seed}; goal >= 0.9, chance 0.1): " + ("met" if k1.accuracy >= 0.9 else "not met"))
    chain = by_arm.get("relay:chain_sum", {})
    # Gated trains coupled (its thought's gradient reaches the writer), so it counts as a coupled recipe here.
    latent = [f"{a}{r}" for a in ("coupled", "gated") for r in _RECIPES if f"{a}{r}" in chain]
    if latent and "open" in chain:  # the best latents-only recipe
        best = max(latent, key=lambda a: chain[a]["accuracy"])
        c, o = chain[best], chain["open"]
        ratio = c["accuracy"] / o["accuracy"] if o["accuracy"] else float("nan")
        share = c["positions"] / o["positions"] if o["positions"] else float("nan")
        lines.append(f"- relay:chain_sum, {best} / open accuracy {ratio:.2f} (goal >= 0.9) while passing "
                     f"{share:.3f} of its positions (goal <= 0.1): "
                     + ("met" if ratio >= 0.9 and share <= 0.1 else "not met"))
    # Coupled against its controls (at m = 6 and at each m of the sweep) and against text, trained or not.
    wanted = set(_against_controls(CONTROLS, _RECIPES)) | set(_against_controls(("pause",), RECIPES, base="gated")) \
        | set(SWEEP_PAIRS) | {("coupled", "text_m")} | {
        (f"coupled{r}", "text_sft_m") for r in _RECIPES}
    for task, pairs in comps.items():
        for c in pairs:
            if (c.arm, c.baseline) in wanted:
                verdict = "above 0: met" if c.ci_low > 0 else "not above 0: no difference detected" \
                    if c.ci_high >= 0 else "below 0"
                steps = by_arm[task][c.arm]["steps"], by_arm[task][c.baseline]["steps"]
                # A baseline that trained at least as long as the arm on every seed cannot owe a loss to its budget.
                favoured = "in the baseline's favour" if max(steps[0], default=0) <= min(steps[1], default=0) else ""
                unequal = "" if set(steps[0]) == set(steps[1]) or not (any(steps[0]) and any(steps[1])) else (
                    f"; not at equal budgets{' (' + favoured + ')' if favoured else ''}: trained "
                    f"{'/'.join(map(str, steps[0]))} vs {'/'.join(map(str, steps[1]))} steps")
                lines.append(f"- {task}: {c.arm} - {c.baseline} = {100 * c.diff:+.1f} points "
                             f"[{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}] (n = {c.n_items}, seeds "
                             f"{c.n_seeds_arm}/{c.n_seeds_base}): interval {verdict}{unequal}")
    return lines or ["- no goal can be judged yet"]


def write_report(docs: Path, n_boot: int = 10_000) -> dict:
    """Rebuild results.json, README.md and the plots under ``docs`` from the finished arms."""
    records, outcomes, samples = _load(docs)
    by_arm: dict[str, dict[str, dict]] = defaultdict(dict)
    for task in outcomes:
        for key in outcomes[task]:
            runs = sorted((r for r in records if r["task"] == task and arm_key(r) == key), key=lambda r: r["seed"])
            by_arm[task][key] = {
                "seeds": sorted(r["seed"] for r in runs), "accuracy": sum(r["accuracy"] for r in runs) / len(runs),
                "per_seed": [round(r["accuracy"], 4) for r in runs],
                "stderr": [r["stderr"] for r in runs], "floor": runs[0].get("floor"),
                "positions": sum(r["positions_passed"] for r in runs) / len(runs),
                "kv_bytes": sum(r["kv_bytes_passed"] for r in runs) / len(runs),
                "steps": [r["steps_trained"] for r in runs], "stopped_early": [r["stopped_early"] for r in runs],
                "continued": [r.get("continued_from") for r in runs], "same_run": [r.get(SAME_RUN) for r in runs],
                "train_hours": sum(_core_seconds(r, docs) for r in runs) / 3600,
            }
    comps: dict[str, list[Comparison]] = {}
    for task, pairs in PAIRS.items():
        found = outcomes.get(task, {})
        comps[task] = [compare({a: found[a], b: found[b]}, b, n_boot=n_boot)[0]
                       for a, b in pairs if a in found and b in found and _reported(a, b, by_arm[task])]
    near_comps: dict[str, list[Comparison]] = {}
    hours = sum(a["train_hours"] for task in by_arm.values() for a in task.values())
    text = ["# Relay study: results so far", "",
            "Built by `make study-relay` (`diffmas study-relay`) from the finished arms in `arms/`; the plan and "
            "what it cost are in [PLAN.md](PLAN.md). Every number is a greedy evaluation on held-out problems the "
            "final agent never sees (it sees only the answer-format line); floor = the best constant answer's "
            "accuracy on the same items. Intervals are 95% paired bootstrap intervals of the accuracy difference "
            "(items, and training seeds where both sides have 3); an interval that contains 0 is reported as no "
            "difference detected at this n.", "",
            _hours_line(hours, [r for r in records if SAME_RUN not in r], docs) + " "
            + remaining_line(plan_arms(docs), study_config(docs), docs), "",
            _precision_line([r for r in records if SAME_RUN not in r]), "",
            "## Goals", "", *_goals(outcomes, by_arm, comps), ""]
    for task in sorted(by_arm):
        text += [f"## {task}", "", "| arm | seeds | accuracy per seed | mean | floor | positions passed | K/V passed "
                 "| steps (early stop) |", "|---|---|---|---|---|---|---|---|"]
        for key, row in sorted(by_arm[task].items()):
            stops = ", ".join(f"{s}{'*' if e else ''}" + (f" (1-{c['steps']}: {c['run']}'s)" if c else "")
                              + (f" (= {same})" if same else "")
                              for s, e, c, same in zip(row["steps"], row["stopped_early"], row["continued"],
                                                       row["same_run"]))
            floor = "–" if row["floor"] is None else f"{row['floor']:.3f}"
            text.append(f"| {key} | {len(row['seeds'])} | {' / '.join(f'{a:.3f}' for a in row['per_seed'])} | "
                        f"{row['accuracy']:.3f} | {floor} | {row['positions']:.1f} | {row['kv_bytes'] / 1024:.0f} KiB "
                        f"| {stops} |")
        text.append("")
        if comps.get(task):
            text += ["Paired differences (arm minus baseline), one table per baseline:", ""]
            for base in dict.fromkeys(c.baseline for c in comps[task]):
                text += [markdown_table([c for c in comps[task] if c.baseline == base]), ""]
        answers_by_seed: dict[str, dict[int, list]] = defaultdict(dict)  # (item id, extracted answer) pairs
        for rec in records:
            if rec["task"] == task:
                answers_by_seed[arm_key(rec)][rec["seed"]] = [(s["id"], s.get("extracted"))
                                                              for s in samples[run_id(rec)]]
        answers = {key: [a for seed in runs.values() for a in seed] for key, runs in answers_by_seed.items()}
        if task != "relay:digits":
            near = {key: near_outcomes(task, runs) for key, runs in answers_by_seed.items()}
            near_comps[task] = [compare({a: near[a], b: near[b]}, b, n_boot=n_boot)[0]
                                for a, b in PAIRS.get(task, [])
                                if a in near and b in near and common_items(near[a], near[b])
                                and _reported(a, b, by_arm[task])]
            text += closeness_table(task, dict(sorted(answers.items()))) + near_table(near_comps[task])
        else:
            passed = {arm_key(r): channel(r) for r in records if r["task"] == task}
            kinds = sweep_points([r for r in records if r["task"] == task], outcomes[task])
            plot = capacity_plot({f"{key}, {passed[key][1]}": seeds for key, seeds in outcomes[task].items()}, kinds,
                                 docs)
            ladders = {key: ladder(seeds) for key, seeds in sorted(outcomes[task].items())}
            ks = sorted({k for rungs in ladders.values() for k in rungs})
            text += ["Exact repeats per number of digits k (accuracy ± stderr, n items x seeds); bits: the most "
                     "information about the number that reached the answer at any k, a lower bound by Fano's "
                     "inequality (log2 10 = 3.3 bits at k = 1; 0 at chance). It is what readers learned to repeat: "
                     "the latent positions themselves hold more ([checks/latent-probe.md](checks/latent-probe.md)).",
                     "",
                     "| arm | " + " | ".join(f"k={k}" for k in ks) + " | bits (per position) |",
                     "|---|" + "---|" * (len(ks) + 1)]
            for key, rungs in ladders.items():
                cells = [f"{rungs[k].accuracy:.2f} ± {rungs[k].stderr:.2f} (n={rungs[k].n})" if k in rungs else "–"
                         for k in ks]
                bits, positions = max(r.bits for r in rungs.values()), passed[key][0]
                per = f"{bits / positions:.2f}" if positions else "–"
                text.append(f"| {key} | " + " | ".join(cells) + f" | {bits:.1f} ({per}) |")
            text += [""] + sweep_table(kinds) + ([f"![capacity]({plot.name})", ""] if plot else [])
            sent: dict[str, list[dict]] = defaultdict(list)
            for rec in records:
                kept = samples[run_id(rec)]
                if rec["task"] == task and rec["system"] in TEXT and all("messages" in s for s in kept):
                    sent[arm_key(rec)] += kept
            text += places_table(answers) + messages_table(sent)
            text += _probes_table(docs, {run_id(r): [(s["id"], s.get("extracted")) for s in samples[run_id(r)]]
                                         for r in records if r["task"] == task})
            text += _lens_table(docs)
    runs = _curves(records, docs)
    curves = plot_heldout(runs, docs / "heldout_loss.png", "validation split")
    if curves:
        text += ["## Held-out loss during training", "",
                 "Steps marked * stopped early (flat validation loss); \"(1-300: X's)\": "
                 "the run started from run X's checkpoint, whose settings differ only in the stopping rule, so "
                 "its first 300 steps are X's.", "",
                 f"![held-out loss]({curves.name})", ""]
        text += gate_table([run for task in runs.values() for run in task])
    task_of = {run_id(r): r["task"] for r in records}  # runs, once each
    text += controls_tables(docs, CONTROLS_RUN, {i: samples[i] for i in task_of}, n_boot,
                            lambda i, kept: thought_places(kept) if task_of[i] == DIGITS else None)
    if records:
        text += [f"Machine: {records[-1]['machine']}. Config of each run: `arms/<id>.json`.", ""]
    results = {"arms": records and [{k: v for k, v in r.items() if k != "config"} for r in records],
               "by_arm": by_arm, "comparisons": {t: [_summary(c) for c in cs] for t, cs in comps.items()},
               "near_comparisons": {t: [_summary(c) for c in cs] for t, cs in near_comps.items()},
               "core_hours": hours}
    (docs / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (docs / "README.md").write_text("\n".join(text))
    return results

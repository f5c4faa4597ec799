"""What an arm of the relay study will cost before it starts, in wall-clock seconds of one one-thread worker,
estimated from the finished arms' own records (their curves' step and held-out times, their test evaluations).

A session's machine may not come back (weights are never committed), so an arm still training when it goes away
is lost. With a deadline (``diffmas study-relay --until``) a worker starts only arms whose estimate ends before
it, taking a later arm of the plan that fits where the next one does not, and stops when none is left that fits.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from diffmas.experiments.relay import (FULL, TEXT, Arm, RelayConfig, arm_settings, continued_from, data_seed_of, run_id,
                                      split_name)
from diffmas.experiments.relay_arm import channel_seconds, gated, probed, thinks
from diffmas.train.checkpoint import latest_checkpoint, read_state
from diffmas.train.resume import INHERITED

HELDOUT_SHARE = 0.4
"""One held-out evaluation's time as a share of ``eval_every`` training steps' time, where no reference curve timed
its held-out evaluations (measured 0.36-0.37 on the sums and the split task, 2026-12-06)."""
MARGIN = 1.15
"""Estimates are raised by this factor: step times vary with what else the machine runs."""


_READ: dict[tuple, list[dict]] = {}
"""The last read of a results folder, keyed by its arms' files and their modification times."""


def _finished(docs: Path) -> list[dict]:
    """The finished arms' records, each with the times its own curve logged (steps a run to the cap copied from the
    run it continues are counted there): ``step_times`` and ``heldout_times``, and ``probe_seconds`` (its probe and
    lens curve, :func:`relay_arm.channel_seconds`) and ``lens_read`` (whether it has a lens curve).
    Read again only when an arm's result, probe or lens curve was added or rewritten (a worker asks for every arm of
    the plan before each claim)."""
    paths = sorted((docs / "arms").glob("*.json")) if (docs / "arms").is_dir() else []
    readings = [path for folder in (docs / "probes", docs / "lens" / "curves") if folder.is_dir()
                for path in sorted(folder.glob("*.json"))]
    key = (str(docs.resolve()), tuple((p.parent.name, p.name, p.stat().st_mtime_ns) for p in paths + readings))
    if key not in _READ:
        _READ.clear()
        _READ[key] = _read(paths, docs)
    return _READ[key]


def _read(paths: list[Path], docs: Path) -> list[dict]:
    found = []
    for path in paths:
        rec = json.loads(path.read_text())
        curve = docs / "curves" / f"{run_id(rec)}.jsonl"
        logged = [r for r in (json.loads(line) for line in curve.read_text().splitlines() if line.strip())
                  if INHERITED not in r] if curve.is_file() else []
        found.append({**rec, "step_times": [r["seconds"] for r in logged if "seconds" in r],
                      "heldout_times": [r["heldout_seconds"] for r in logged if r.get("heldout_seconds")],
                      "probe_seconds": channel_seconds(docs, run_id(rec)),
                      "lens_read": (docs / "lens" / "curves" / f"{run_id(rec)}.json").is_file()})
    return found


def _references(arm: Arm, records: list[dict], trained: bool) -> list[dict]:
    """The finished arms most like ``arm`` (text arms for a text arm, trained ones with a timed curve for a trained
    one): the same arm (any seed or data seed, its run to the cap included) on the same task, else the same arm
    under another recipe on the task (the task's prompts set most of a step's cost; a recipe changes what the reader
    may see, and autoencoding only its first steps' targets), else any arm of the task, else the same arm on another
    task, else any arm at all. The task goes before the arm: the same arm on another task was measured at that
    task's prompt lengths and often at another m, which :func:`_at` can only scale up by (a gated arm at m = 1 on
    the digits put the sums' gated arm at m = 6 at 12.5 h; it took about 2.5)."""
    def name(arm_name: str) -> str:  # the run to the cap and another data seed train the same steps
        return data_seed_of(arm_name.removesuffix(FULL))[0]

    root = name(arm.name)
    kind = [r for r in records if (r.get("system") not in TEXT) == trained and (not trained or r["step_times"])]
    for same in (lambda r: name(r.get("arm", "")) == root and r["task"] == arm.task,
                 lambda r: split_name(name(r.get("arm", "")))[0] == split_name(root)[0] and r["task"] == arm.task,
                 lambda r: r["task"] == arm.task,
                 lambda r: name(r.get("arm", "")) == root,
                 lambda r: True):
        found = [r for r in kind if same(r)]
        if found:
            return found
    return []


def steps_done(arm: Arm, out: Path | None) -> int:
    """Steps that resuming ``arm`` would not repeat: its own latest checkpoint's, else (a run to the cap) that of
    the run it continues, else (or with no runs folder) 0."""
    for source in (arm, continued_from(arm)) if out is not None else ():
        ckpt = latest_checkpoint(out / "runs" / source.id) if source is not None else None
        if ckpt is not None:
            return int(read_state(ckpt)["step"])
    return 0


def _at(m: int, times: dict[int, list[float]]) -> float | None:
    """A time at ``m`` latent steps from times measured at others: the median where m was measured, else a line
    through the medians at two or more m (least squares), else the one measured m's median scaled by m (never
    down: conservative)."""
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    if not medians:
        return None
    if m in medians:
        return medians[m]
    if len(medians) == 1:
        (k, t), = medians.items()
        return t * max(1.0, m / k)
    slope, intercept = statistics.linear_regression(list(medians), list(medians.values()))
    return max(intercept + slope * m, min(medians.values()))


def estimate_seconds(arm: Arm, cfg: RelayConfig, out: Path | None, docs: Path) -> float | None:
    """Wall-clock seconds ``arm`` will still take (training from where it would resume in ``out``, or from step 0,
    held-out evaluations, the test evaluation, the probe of its channel where it gets one, its controls' evaluations
    (a gated arm's with its gate closed, a thinking arm's with its thoughts shuffled)), with :data:`MARGIN`;
    None where no finished arm gives a reference.
    Conservative where the flat-loss rule may stop the arm early (the step cap is assumed); step and held-out times
    follow m (:func:`_at`)."""
    records = _finished(docs)
    system, changes = arm_settings(arm.name, cfg)
    trained = system not in TEXT
    refs = _references(arm, records, trained)
    if not refs:
        return None
    evaluation = statistics.median(r.get("eval_seconds", 0) for r in refs)
    if not trained:
        return evaluation * MARGIN
    steps, heldouts = defaultdict(list), defaultdict(list)
    for r in refs:
        steps[r.get("latent_steps") or cfg.latent_steps] += r["step_times"]
        heldouts[r.get("latent_steps") or cfg.latent_steps] += r["heldout_times"]
    m = arm.latent_steps or cfg.latent_steps
    step = _at(m, steps)
    heldout = _at(m, heldouts) or HELDOUT_SHARE * cfg.eval_every * step
    done = steps_done(arm, out)
    left = max(changes.get("steps", cfg.max_steps) - done, 0)
    evaluations = math.ceil(left / cfg.eval_every) + (done == 0)  # the step-0 held-out loss of a fresh run
    # Any arm's probe: they differ little. Arms read before lens curves existed cost a probe only, so those read the
    # way this arm will be (with a lens curve where the config asks for one) go first.
    read = [r for r in records if r.get("probe_seconds")]
    alike = [r for r in read if r["lens_read"] == bool(cfg.lens_items)]
    probe = statistics.median(r["probe_seconds"] for r in alike or read) if read and probed(arm, cfg) else 0.0
    # The test items again under each control the arm gets: its gate closed, its thoughts shuffled.
    controls = evaluation * (gated(arm, cfg) + thinks(arm, cfg))
    return (left * step + evaluations * heldout + evaluation + probe + controls) * MARGIN


def remaining_line(plan: list[Arm], cfg: RelayConfig, docs: Path) -> str:
    """What the arms of ``plan`` not finished yet will cost, by their estimates from step 0 (a fresh machine)."""
    pending = [a for a in plan if not (docs / "arms" / f"{a.id}.json").is_file()]
    costs = [estimate_seconds(a, cfg, None, docs) for a in pending]
    known = [c for c in costs if c is not None]
    if not pending:
        return "Nothing more is planned."
    line = (f"Still planned: {len(pending)} arms, about {sum(known) / 3600:.0f} core-hours by their estimates "
            f"(`relay_cost.py`: each from step 0 to its step cap, +{100 * (MARGIN - 1):.0f}%; an upper bound where "
            "the flat-loss rule stops an arm early)")
    unknown = len(costs) - len(known)
    return line + (f", {unknown} of them with no finished arm to estimate from yet." if unknown else ".")

"""The relay study: can a trained channel carry a problem the final agent never sees?

    make study-relay     # two one-thread workers side by side; resumable; hours on 2 CPU cores
    diffmas study-relay --out runs/study-relay --docs docs/study-relay [--commit]

On relay tasks the writer sees the question and the final agent sees only the answer-format line; under the trace
scope ``latents`` the final agent attends to nothing but the writer's m latent positions. Arms (same data, batch,
stopping rule and evaluation items within a task; the budget of each run is set by the held-out loss of its own
validation split, see :class:`RelayConfig`):

- ``open``: the final agent attends to the writer's whole segment (KV sharing, as KVComm);
- ``coupled``: latents only, gradient through the channel into the writer (the recipe of :class:`RelayConfig`);
  ``coupled_ae`` / ``coupled_anneal`` add autoencoding pre-training / the bottleneck curriculum; ``coupled_long``
  trains for three times the step cap (the stopping rule still applies);
- ``detached``: the same with no gradient into the writer (its adapter, shared with the reader, still changes
  through the reader's loss); ``frozen``: the writer keeps the untrained model (its own adapter, detached, stays at
  B = 0), only the reader trains; ``pause``: the same positions fed one learned embedding
  (gist tokens: the positions still attend to the prompt, but no thought content is fed back); ``kvonly``: the
  writer's content is fed back but the gradient reaches the writer only through the keys and values (grad mode
  ``kv_only``: no gradient asks the fed-back states to be anything, e.g. a token); ``gated``: pause's input plus
  coupled's fed-back thought behind a learned gate that starts at 0 (it starts as pause; the task loss decides how
  much thought to let in); ``*_full``: coupled
  or a control (detached, frozen, pause, ``half_*``, with any recipe) trained on to the step cap from where the flat-loss rule
  stopped it, planned right after it when the other side of the comparison (same recipe, seed and m) trained
  longer, so that neither side owes a difference to a shorter budget;
- ``blind``: no channel (m = 0): the floor a trained reader reaches on the prior;
- ``skyline``: single_sft given the whole question;
- ``text_m`` / ``text_4m``: an untrained text writer whose message (m or 4m tokens) is all the final agent sees;
  ``text_sft_m`` / ``text_sft_4m``: the same with skyline's adapter on every agent (a trained text channel: the
  writer's message is its SFT'd answer), planned once skyline has finished;
- on ``split:chain_sum``: ``coupled`` and each writer alone (``half_a``, ``half_b``);
- a recipe suffix (``_anneal``, ``_ae``; :data:`RECIPES`) trains a bottlenecked arm under that recipe instead of
  the config's: the split task and the sums' controls use the one under which coupled passed a sum;
- on ``relay:digits``: ``coupled_anneal`` and ``pause_anneal`` for m in 1, 2, 4, 8, 16 (the capacity ladder, per k);
- a data-seed suffix (``pause_anneal_data0``, :data:`DATA_SEED`) draws the training and held-out items with another
  seed than the rest of the run's randomness.

Arms are listed in phases, the decisive ones first (coupled, open, the ladder at m = 6, blind; then, because coupled
collapsed on the sums, detached and pause on the digits, the text channels on the digits and the curriculum on the
sums; once a latents-only recipe passes a sum, the split task and the sums' latent controls under it), then
seed 1 of the digits' coupled and detached (and their ``*_full`` runs to the cap), ``frozen``, the curriculum on the
digits at seeds 0 and 1, its controls (detached, pause, frozen) and seeds, and the m sweep under it; then open's
seeds on the sums, the sums' other controls, the sums' latent seeds under the recipe that passed, the plain
recipe's remaining seeds on the digits and ``coupled_long``. Every finished arm (:mod:`diffmas.experiments.relay_arm`)
writes ``docs/arms/<id>.json``, its per-item outcomes and its held-out loss curve, and a trained latents-only
digits arm the linear probes of what its channel holds (``docs/probes/<id>.json``, :mod:`diffmas.eval.probe`) and
the logit lens of its latent inputs at its checkpoints (``docs/lens/curves/<id>.json``,
:mod:`diffmas.eval.lens_curve`); the report is rebuilt after each.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from diffmas.experiments.workers import work_through

CHAIN, SPLIT, DIGITS = "relay:chain_sum", "split:chain_sum", "relay:digits"
SEEDS = (0, 1, 2)
"""Training seeds where the claims are (seed 0 everywhere else)."""
TOPOLOGIES = Path(__file__).resolve().parents[2] / "configs" / "topologies"
"""Where the one-writer topologies of the split task's controls live (the study runs from a checkout)."""
SWEEP = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class RelayConfig:
    """The budget every trained arm shares. A run stops once its held-out loss (``heldout`` validation items,
    disjoint from evaluation) has improved by less than 1% over the last 20% of its steps, after at least
    ``min_steps``; ``max_steps`` caps it (and sets the cosine schedule's length)."""

    min_steps: int = 300
    max_steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    latent_steps: int = 6
    heldout: int = 200
    eval_every: int = 25
    n_eval: int = 500
    max_new_tokens: int = 24
    eval_batch_size: int = 16
    model: str = "smollm2-135m-instruct"
    mixed_precision: str = "no"
    """fp32 on every machine: ``auto`` would pick bf16 autocast where the CPU computes it natively, so arms trained
    on different machines would differ in precision (it did, 2026-12-06: docs/study-relay/checks/bf16-autocast)."""
    probe_items: int = 1500
    """Items of the linear probes run on every trained latents-only digits arm after its evaluation
    (:mod:`diffmas.eval.probe`): what its channel holds, beside what its reader repeated. 0: no probes."""
    lens_items: int = 150
    """Items of the logit lens read at every ``lens_every``-th checkpoint of a probed arm after its probe
    (:mod:`diffmas.eval.lens_curve`, ``docs/lens/curves/<id>.json``): when its latent inputs became a token, beside
    its held-out loss. Checkpoints are never committed, so it is read while they exist. 0: no lens."""
    lens_every: int = 2
    """The lens reads every N-th checkpoint and the last (2: every 50 steps at the study's checkpoint spacing)."""
    autoencode_steps: int = 0
    anneal: float = 0.0
    """The recipe of the bottlenecked arms (coupled, detached, pause, half_*): autoencoding pre-training steps and
    the bottleneck curriculum's share of the steps. Plain answer-only training (both 0) passed a digit through the
    channel in the probes (docs/study-relay/PLAN.md); the arms coupled_ae and coupled_anneal measure the other two."""


@dataclass(frozen=True)
class Arm:
    """One run: a system trained (or, for text arms, only evaluated) on a task."""

    name: str
    task: str
    seed: int = 0
    phase: int = 1
    latent_steps: int | None = None
    """m for this arm (the sweep); None: the config's."""

    @property
    def id(self) -> str:
        m = "" if self.latent_steps is None else f"-m{self.latent_steps}"
        return f"{self.task.replace(':', '_')}--{self.name}{m}--s{self.seed}"

    @property
    def label(self) -> str:
        m = "" if self.latent_steps is None else f"-m{self.latent_steps}"
        return f"{self.name}{m}/s{self.seed}"


def arm_key(rec: dict) -> str:
    """An arm's name across training seeds (the m of a sweep arm included)."""
    return rec["label"].split("/")[0]


def run_id(rec: dict) -> str:
    """A finished arm's id (``Arm.id``): the name of its samples and curve files."""
    return f"{rec['task'].replace(':', '_')}--{arm_key(rec)}--s{rec['seed']}"


RECIPES = {"_anneal": {"channel.anneal": 0.3}, "_ae": {"channel.autoencode_steps": 60}}
"""Training recipes other than the config's, as arm-name suffixes: the bottleneck curriculum (the prompt columns
fade from the reader's view over the first 30% of the steps) and 60 steps of autoencoding pre-training."""
BOTTLENECKED = ("coupled", "detached", "frozen", "pause", "kvonly", "gated", "half_a", "half_b")
"""The arms a recipe suffix applies to: ``pause_anneal`` is pause trained under the curriculum."""
CONTROLS = ("detached", "frozen", "pause", "kvonly", "gated", "half_a", "half_b")
"""The latents-only arms compared with coupled under the same recipe. ``<arm>_full`` (``pause_full``,
``coupled_anneal_full``) is coupled or a control trained to the step cap (the flat-loss rule stops it no earlier):
where the rule stopped one side of the comparison on a plateau before the other side stopped, it is run on."""
FULL = "_full"
RUN_ON = ("coupled", *CONTROLS)
"""The arms (roots, any recipe) that may be run on to the cap: ``<arm>_full``."""


DATA_SEED = re.compile(r"(.+)_data(\d+)")
"""An arm name's data-seed suffix: ``pause_anneal_data0`` at seed 2 is pause_anneal whose training and held-out items
are seed 0's (their draw and order) while its adapters' initialisation, dropout and curriculum masks are seed 2's."""


def data_seed_of(name: str) -> tuple[str, int | None]:
    """(arm name without its data-seed suffix, the data seed or None): ``pause_anneal_data0`` -> (pause_anneal, 0)."""
    match = DATA_SEED.fullmatch(name)
    return (match[1], int(match[2])) if match else (name, None)


def split_name(name: str) -> tuple[str, str]:
    """(root arm, recipe suffix) of a bottlenecked arm's name: ``pause_anneal`` -> (``pause``, ``_anneal``)."""
    for suffix in RECIPES:
        if name.endswith(suffix) and name.removesuffix(suffix) in BOTTLENECKED:
            return name.removesuffix(suffix), suffix
    return name, ""


def arm_settings(name: str, cfg: RelayConfig) -> tuple[str, dict]:
    """(system, TrainConfig overrides) of an arm by name; text arms (``text_mas``, ``text_sft``) are only evaluated."""
    base, data_seed = data_seed_of(name)
    if data_seed is not None:
        system, changes = arm_settings(base, cfg)
        return system, {**changes, "data.seed": data_seed}
    if name.endswith(FULL) and split_name(name.removesuffix(FULL))[0] in RUN_ON:
        system, changes = arm_settings(name.removesuffix(FULL), cfg)
        return system, {**changes, "stop.min_steps": cfg.max_steps}
    root, suffix = split_name(name)
    if suffix:
        system, changes = arm_settings(root, cfg)
        return system, {**changes, **RECIPES[suffix]}
    latents = {"trace": "latents"}
    recipe = {"channel.autoencode_steps": cfg.autoencode_steps, "channel.anneal": cfg.anneal}
    return {
        "open": ("diffmas", {"trace": "keep"}),
        "coupled": ("diffmas", {**latents, **recipe}),
        "coupled_long": ("diffmas", {**latents, **recipe, "steps": 3 * cfg.max_steps}),
        "detached": ("diffmas", {**latents, **recipe, "grad_mode": "detached"}),
        "frozen": ("diffmas", {**latents, **recipe, "grad_mode": "detached", "lora.layout": "per-agent"}),
        "pause": ("diffmas", {**latents, **recipe, "latent_map": "pause"}),
        "kvonly": ("diffmas", {**latents, **recipe, "grad_mode": "kv_only"}),
        "gated": ("diffmas", {**latents, **recipe, "latent_map": "gated"}),
        "blind": ("diffmas", {**latents, "latent_steps": 0}),
        "skyline": ("single_sft", {}),
        "text_m": ("text_mas", {}),
        "text_4m": ("text_mas", {}),
        "text_sft_m": ("text_sft", {}),
        "text_sft_4m": ("text_sft", {}),
        "half_a": ("diffmas", {**latents, **recipe, "topology": str(TOPOLOGIES / "split-first-half.yaml")}),
        "half_b": ("diffmas", {**latents, **recipe, "topology": str(TOPOLOGIES / "split-second-half.yaml")}),
    }[name]


TEXT = ("text_mas", "text_sft")
"""The systems of the text arms: evaluated only (text_sft borrows skyline's adapter)."""


def plan_arms(docs: Path | None = None) -> list[Arm]:
    """Every arm in priority order (see the module docstring); the trained text arms once skyline's result is in
    ``docs`` (they run on its adapter)."""
    arms = [Arm("coupled", CHAIN), Arm("open", CHAIN), Arm("coupled", DIGITS), Arm("blind", CHAIN)]
    # Coupled on relay:chain_sum collapsed to one constant answer (0.026, n = 500, floor 0.032): the controls go
    # first where the channel is known to carry something (the digits), then the curriculum on the sums.
    arms += [Arm("detached", DIGITS), Arm("pause", DIGITS)]
    # Latent against text where the latent channel carries something: the text arms cost an evaluation each, the
    # digits' skyline (which the trained text channel borrows) a short single-agent run.
    arms += [Arm(n, DIGITS, phase=2) for n in ("text_m", "text_4m", "skyline")] + _trained_text(DIGITS, docs)
    # The curriculum on the sums went before the digits' detached_full (planned by _to_the_cap, which puts each
    # control's run to the cap right after it): once the prompt columns had faded (step 150) its held-out loss fell
    # below the blind reader's (0.79 at step 200 vs 0.92), the first sign of a sum crossing.
    arms += [Arm("coupled_anneal", CHAIN)]
    # Splitting a sum between two writers, and the sums' latent controls, ask something only once a latents-only
    # recipe passes a sum at all; they train under that recipe. The split task's goal is open, so they go first.
    recipe = sum_recipe(docs) if docs is not None else None
    if recipe is not None:
        arms += [Arm(n + recipe, SPLIT, phase=5) for n in ("coupled", "half_a", "half_b")]
        arms += [Arm(n + recipe, CHAIN, phase=5) for n in ("detached", "pause")]
    # Training seeds where the claims are, before the rest of the controls: the digits' coupled and its controls.
    seeds = [[Arm(n, DIGITS, s, phase=3) for n in ("coupled", "detached", "pause")] for s in SEEDS[1:]]
    # The plain recipe passed a digit at seed 0 in a sudden drop of the held-out loss between steps 425 and 500 and
    # at seed 1 not by the cap (held-out flat at 1.097 from step 350, in fp32 and in bf16 alike): the digits' claims
    # hang on when that drop comes. The curriculum, the only recipe that passed a sum, is the other recipe
    # for coupled; at two seeds it says whether it makes the crossing reliable before seed 2, coupled_long and the m
    # sweep spend ~50 core-hours on the plain one.
    # Seed 1's plain coupled passed no digit even at the cap (fp32), so its pause control can only tie it: the
    # curriculum, which may, goes before it (detached at seed 1 keeps its place: it was a third trained).
    curriculum = [Arm("coupled_anneal", DIGITS, s, phase=3) for s in SEEDS[:2]]
    # Linear probes read the number's length and first three digits from an untrained writer's six latent
    # positions (checks/latent-probe.md), while trained readers repeat at most the length and one digit: whether a
    # reader learns to read a channel that holds still (the untrained writer) says which side limits the ladder.
    arms += seeds[0][:2] + [Arm("frozen", DIGITS, phase=2)] + curriculum
    # The curriculum answered 0.990 at seed 0 where the plain recipe answered 0.224 (seed 0) and 0.020 (seed 1): the
    # digits' claims move to it. Its controls first (does the writer's gradient matter, does the thoughts' content,
    # does the writer need training at all), then its seeds, then the m sweep under it (the ladder asks how much m
    # positions carry, so it uses the recipe that reads them best); the plain recipe's remaining seeds and
    # coupled_long after.
    controls = ("detached_anneal", "pause_anneal", "frozen_anneal")
    arms += [Arm(n, DIGITS, phase=3) for n in controls]
    # Six positions pass the whole number at both seeds (k = 6 at 0.93 and 1.00), so the ladder at m = 6 measures
    # no capacity: the first goal (how many digits m latent steps carry) needs m below 6, where positions
    # are scarce and whether the thoughts' content matters (coupled against pause) can show. After coupled's third
    # seed, the sweep's m = 1, 2, 4 go before the controls' seeds (plan change 14); m = 8 and 16, which a ladder
    # that m = 6 already tops cannot tell apart, go last.
    sweep = [[Arm(n, DIGITS, phase=4, latent_steps=m) for n in ("coupled_anneal", "pause_anneal")] for m in SWEEP]
    small = [arm for m, pair in zip(SWEEP, sweep) if m < RelayConfig.latent_steps for arm in pair]
    # At m = 1 and 2 coupled stopped on a one-digit plateau where pause carried four digits through one position,
    # and the logit lens found coupled's fed-back states turned into the first digit's token (docs/study-relay/lens):
    # kvonly (coupled without gradient through the fed-back states) says whether that gradient path holds coupled
    # there (run on to the cap, coupled at m = 1 left the plateau only between steps 375 and 500). Before m = 4,
    # where coupled would most likely meet the same plateau (plan change 16).
    kvonly = [Arm("kvonly_anneal", DIGITS, phase=4, latent_steps=1)]
    arms += [Arm("coupled_anneal", DIGITS, SEEDS[2], phase=3)] + small[:4] + kvonly + small[4:]
    # Pause at m = 1 carried about four digits through one position (0.862) where coupled's fed-back state became
    # the first digit's token (0.206 flat at 300, 0.668 at the cap): gated starts as pause (its gate on the thought
    # is 0) and lets the task loss open the gate, asking whether thought content adds to a reader that first learned
    # to read slots filled from the prompt, or drags it into the token (plan change 18).
    arms += [Arm("gated_anneal", DIGITS, phase=4, latent_steps=1)]
    # Gated beat pause at m = 1 at seed 0 (+10.6 [+7.6, +13.8]), the first arm in which the thought adds: the claim
    # needs its seeds, and pause's at m = 1 beside them (pairs resampled over seeds). Gated on the sums, where no
    # latents-only recipe nears open (pause_anneal 0.160, coupled_anneal 0.122, open 0.358), goes between the two
    # seeds: one decisive arm before the second replicate (plan change 19).
    gated = [[Arm(n, DIGITS, s, phase=4, latent_steps=1) for n in ("gated_anneal", "pause_anneal")] for s in SEEDS[1:]]
    arms += gated[0] + [Arm("gated_anneal", CHAIN, phase=3)] + gated[1]
    arms += [Arm(n, DIGITS, s, phase=3) for s in SEEDS[1:] for n in controls[:2]]
    # Seed 2 put every curriculum arm with the writer's gradient or pause's slots on the one-digit plateau (coupled at
    # m = 6, gated and pause at m = 1: 0.208-0.216, flat, still there at the cap) that seeds 0 and 1 left at the
    # anneal's end (held-out 0.4-0.7 at step 175 against 0.87). Whether the items drawn (which, in which order) or the
    # rest of the seed (initialisation, dropout, the curriculum's masks) decides it says whether more seed-2
    # replicates can tell arms apart: pause at m = 1, the cheapest arm that crossed at seeds 0 and 1, with the
    # seeds swapped between the data and the rest (plan change 20).
    arms += [Arm("pause_anneal_data2", DIGITS, 0, phase=3, latent_steps=1),
             Arm("pause_anneal_data0", DIGITS, 2, phase=3, latent_steps=1)]
    arms += [Arm("open", CHAIN, s, phase=3) for s in SEEDS[1:]]
    # The plain recipe's controls on the sums ask something only where plain coupled passed a sum: a control of a
    # channel that carries nothing can only tie it (measured: plain coupled 0.026 against a floor of 0.032).
    controls = ("detached", "pause") if _carries(Arm("coupled", CHAIN), docs) is not False else ()
    arms += [Arm(n, CHAIN, phase=2) for n in (*controls, "skyline", "text_m", "text_4m", "coupled_ae")]
    arms += _trained_text(CHAIN, docs)
    if recipe is not None:
        arms += [Arm(n + recipe, CHAIN, s, phase=5) for s in SEEDS[1:] for n in ("coupled", "detached", "pause")]
    # The plain recipe's remaining seeds on the digits, and coupled_long (three times the cap, same stopping rule:
    # how much of the plain recipe's ladder the cap decided, its held-out loss 1.06 at step 425 and 0.75 at 500),
    # ask about a recipe the curriculum has replaced for every claim; they go after the seeds the issue asks of
    # the claims that stand (plan change 17).
    arms += seeds[0][2:] + seeds[1] + [Arm("coupled_long", DIGITS, phase=2)]
    arms += [arm for pair in sweep for arm in pair if arm not in small]
    arms = _to_the_cap(arms, docs)
    # An arm whose test samples were committed without its record lost its probe with a machine, and its checkpoints
    # with it: its result is already in the samples, so the whole run it would take again goes after every arm
    # that measures something new.
    lost = [a for a in arms if _evaluated_only(a, docs)]
    arms = [a for a in arms if a not in lost] + lost
    unique = {a.id: a for a in reversed(arms)}  # an arm planned twice (plain coupled's controls) keeps its first place
    return [a for a in arms if unique[a.id] is a]


def _finished(arm: Arm, docs: Path | None) -> dict | None:
    path = None if docs is None else docs / "arms" / f"{arm.id}.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _evaluated_only(arm: Arm, docs: Path | None) -> bool:
    """Whether an arm's test samples are in ``docs`` but not its record (written last, after its probe)."""
    return docs is not None and (docs / "samples" / f"{arm.id}.jsonl").is_file() and _finished(arm, docs) is None


def _to_the_cap(arms: list[Arm], docs: Path | None) -> list[Arm]:
    """``arms`` with, right after each arm that the flat-loss rule stopped before an arm it is compared with had
    trained as long, that arm trained on to the cap (``<name>_full``, continuing its run). Compared: coupled and a
    control under the same recipe (same task, seed and m; either side as stopped or run on), and the same arm at
    another training seed (seeds replicate one comparison, so they share its budget)."""
    out = []
    for arm in arms:
        out.append(arm)
        root, recipe = split_name(arm.name)
        if root not in RUN_ON or (done := _finished(arm, docs)) is None or not done.get("stopped_early"):
            continue
        same = dict(task=arm.task, seed=arm.seed, latent_steps=arm.latent_steps)
        others = ["coupled"] if root in CONTROLS else CONTROLS
        compared = [Arm(f"{other}{recipe}{full}", **same) for other in others for full in ("", FULL)]
        compared += [Arm(arm.name + full, arm.task, seed, latent_steps=arm.latent_steps) for seed in SEEDS
                     for full in ("", FULL) if seed != arm.seed]
        steps = [rec["steps_trained"] for other in compared if (rec := _finished(other, docs))]
        if steps and max(steps) > done["steps_trained"]:
            out.append(Arm(arm.name + FULL, arm.task, arm.seed, arm.phase, arm.latent_steps))
    return out


def _trained_text(task: str, docs: Path | None) -> list[Arm]:
    """The trained text channel's arms of ``task``, once its skyline (whose adapter they run on) has finished."""
    if docs is None or not (docs / "arms" / f"{Arm('skyline', task).id}.json").is_file():
        return []
    return [Arm(n, task, phase=2) for n in ("text_sft_m", "text_sft_4m")]


def sum_recipe(docs: Path) -> str | None:
    """The recipe (``""``: the config's, or a :data:`RECIPES` suffix) under which coupled answers relay:chain_sum
    above its task's floor by more than two standard errors, the most accurate where several do (finished arms'
    results in ``docs/arms``); None while none does."""
    crossed = {suffix: _finished(Arm("coupled" + suffix, CHAIN), docs)["accuracy"] for suffix in ("", *RECIPES)
               if _carries(Arm("coupled" + suffix, CHAIN), docs)}
    return max(crossed, key=crossed.get) if crossed else None


def _carries(arm: Arm, docs: Path | None) -> bool | None:
    """Whether a finished arm answers above its task's floor by more than two standard errors; None: not finished."""
    rec = _finished(arm, docs)
    return None if rec is None else rec["accuracy"] - 2 * rec["stderr"] > (rec.get("floor") or 0.0)


def continued_from(arm: Arm) -> Arm | None:
    """The arm whose run a ``*_full`` arm continues where it stopped (the same settings but the stopping rule: its
    steps are the ``_full`` arm's first ones, so they are not repeated where its checkpoints are at hand)."""
    if not arm.name.endswith(FULL):
        return None
    return Arm(arm.name.removesuffix(FULL), arm.task, arm.seed, arm.phase, arm.latent_steps)


def study_config(docs: Path) -> RelayConfig:
    """The budget the study ran with (saved beside its results by :func:`run_study`), else the default."""
    path = docs / "study_config.json"
    return RelayConfig(**json.loads(path.read_text())) if path.is_file() else RelayConfig()


def run_study(out: Path, docs: Path, cfg: RelayConfig | None = None, device: str = "cpu", commit: bool = False,
              max_arms: int | None = None, until: float | None = None, keep_going: bool = False) -> None:
    """Work through the arms until none is left to claim (resumable; several workers may run at once). ``until``
    (a time, seconds since the epoch): start only arms estimated to finish before it (``relay_cost``); an arm
    nothing finished yet gives a reference for is started regardless. ``keep_going``: once none fits, go on with
    the rest of the plan instead of stopping (``work_through``)."""
    from diffmas.experiments.relay_arm import run_arm
    from diffmas.experiments.relay_cost import estimate_seconds
    from diffmas.experiments.relay_report import write_report

    cfg = cfg or RelayConfig()
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "study_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def run(arm: Arm) -> str:
        record = run_arm(arm, cfg, out, docs, device)
        return (f"study-relay: {arm.id} finished: accuracy {record['accuracy']:.3f} ± {record['stderr']:.3f} "
                f"(n = {record['n']}, floor {record['floor']}, {record['steps_trained']} steps)")

    def fits(arm: Arm) -> bool:
        cost = estimate_seconds(arm, cfg, out, docs)
        return cost is None or time.time() + cost <= until

    work_through(lambda: plan_arms(docs), run, lambda: write_report(docs), out, docs, commit, max_arms,
                 None if until is None else fits, keep_going)

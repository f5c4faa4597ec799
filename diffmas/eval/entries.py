"""Which systems an evaluation runs, with which settings: ``--systems`` entries, each system's effective settings
(the full-budget baseline applied), and the check that a resumed folder was written with the same settings.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffmas.adapters import read_adapter_meta
from diffmas.errors import DiffMASError
from diffmas.eval.samples import RESULTS_FILE
from diffmas.systems import build_system, effective_settings, get_kind

__all__ = ["BUDGET_SUFFIX", "SystemEntry", "check_resumable", "parse_systems", "settings_notice", "system_settings"]

# Settings that change what a sample is: resuming into a folder written with other values would mix experiments.
# (The trace scope is compared per system, resolved, in its settings: the run's --trace may be left to defaults.)
_SAMPLE_SETTINGS = ("model", "dtype", "max_new_tokens", "writer_max_new_tokens", "topology", "latent_steps",
                    "temperature", "top_p", "source", "shuffle_trace", "shuffle_part", "shuffle_thought", "realign",
                    "think")
# What a folder written before a setting existed was run with (``think``: see _legacy_think).
_SETTING_DEFAULTS = {"realign": True, "top_p": 1.0, "shuffle_part": None, "shuffle_thought": False}


@dataclass(frozen=True)
class SystemEntry:
    """One system to evaluate: its display label, registry name and adapter folder (trained systems)."""

    label: str
    name: str
    adapter: str | None = None
    budget: bool = False
    """A single agent given the summed budget of a multi-agent system (``single@budget``, see ``budget_from``)."""


BUDGET_SUFFIX = "@budget"


def parse_systems(entries: Sequence[str]) -> list[SystemEntry]:
    """Parse ``name`` / ``name:ADAPTER_DIR`` entries; a name given twice is labelled ``name@<dir basename>``.

    ``LABEL=name:ADAPTER_DIR`` (or ``LABEL=name``) sets the label, e.g. ``curriculum/s1=diffmas:runs/cur1`` for
    training seed 1 of arm ``curriculum`` (see ``diffmas compare``). Names, adapter presence and adapter metadata
    are checked here, before any model is loaded. ``single@budget`` (any single-agent system) is that system with
    the "full thinking budget": as many answer tokens as a multi-agent system's summed budget (``--budget-from``).
    """
    pairs = []
    for entry in entries:
        label, spec = None, entry
        if "=" in entry.partition(":")[0]:  # only before the name: an adapter path may contain '='
            label, _, spec = entry.partition("=")
            label = label.strip()
            if not label or "," in label:
                raise DiffMASError(f"bad system label in '{entry}': a label must be non-empty and without ','")
        name, _, adapter = spec.strip().partition(":")
        name = name.strip()
        budget = name.endswith(BUDGET_SUFFIX)
        kind = get_kind(name[: -len(BUDGET_SUFFIX)] if budget else name)
        if budget and kind.multi_agent:
            raise DiffMASError(f"'{entry}': only single-agent systems take {BUDGET_SUFFIX}")
        adapter = adapter.strip() or None
        if kind.trained and adapter is None:
            raise DiffMASError(f"system '{kind.name}' needs an adapter: write it as {kind.name}:DIR")
        if not kind.trained and adapter is not None:
            raise DiffMASError(f"system '{kind.name}' is training-free and takes no adapter (got '{entry}')")
        if adapter is not None:
            read_adapter_meta(adapter)  # a clear error now beats one after minutes of other systems
        pairs.append((label, kind.name, adapter, budget))
    if not pairs:
        raise DiffMASError("no systems given")
    counts = Counter(name for label, name, _, budget in pairs if label is None and not budget)
    parsed = [SystemEntry(label or (f"{name}{BUDGET_SUFFIX}" if budget else f"{name}@{Path(adapter).name}"
                                    if counts[name] > 1 and adapter else name), name, adapter, budget)
              for label, name, adapter, budget in pairs]
    dupes = [label for label, n in Counter(e.label for e in parsed).items() if n > 1]
    if dupes:
        raise DiffMASError(f"system(s) listed twice: {', '.join(dupes)}")
    return parsed


def system_settings(entries: list[SystemEntry], build_args: dict, max_new_tokens: int,
                    budget_from: str | None) -> list[dict]:
    """Every entry's effective settings (resolved without loading a model), the budget baseline applied."""
    settings = {e.label: effective_settings(build_system(e.name, None, adapter=e.adapter, **build_args),
                                            max_new_tokens) for e in entries}
    budgeted = [e for e in entries if e.budget]
    if not budgeted and budget_from is not None:
        budgeted = [e for e in entries if not get_kind(e.name).multi_agent]
        if not budgeted:
            raise DiffMASError("--budget-from gives a single-agent system the budget of a multi-agent one: "
                               "add single (or single@budget) to --systems")
    if budgeted:
        source, reference = _budget_reference(budget_from, entries, settings)
        for entry in budgeted:
            item = settings[entry.label]
            item["agents"][-1]["max_new_tokens"] = item["max_new_tokens"] = reference["thinking_budget"]
            item["thinking_budget"] = sum(a["latent_steps"] + a["max_new_tokens"] for a in item["agents"])
            item["budget_from"] = source
    return [settings[e.label] for e in entries]


def _budget_reference(ref: str | None, entries: list[SystemEntry], settings: dict[str, dict]) -> tuple[str, dict]:
    """(where it came from, effective settings) of the multi-agent system whose summed budget a @budget single gets:
    a label of this evaluation, or ``DIR`` / ``DIR:LABEL`` of an earlier one (its results.json)."""
    if ref is None or ref in settings:
        candidates = {e.label: settings[e.label] for e in entries if get_kind(e.name).multi_agent}
        where = "this evaluation"
    else:
        folder, label = Path(ref), None
        if not folder.is_dir() and ":" in ref:
            head, _, label = ref.rpartition(":")
            folder = Path(head)
        path = folder / RESULTS_FILE
        try:
            old = json.loads(path.read_text())["config"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DiffMASError(f"--budget-from {ref}: neither a system of this evaluation nor a readable "
                               f"{path} ({exc})") from exc
        candidates = {}
        for item in old.get("systems", []):
            if not get_kind(item["name"]).multi_agent:
                continue
            if "settings" not in item:  # written before settings were recorded: resolve them as that run did
                args = dict(topology=old.get("topology"), latent_steps=old.get("latent_steps"),
                            writer_max_new_tokens=old.get("writer_max_new_tokens", 128),
                            realign=old.get("realign", True))
                item = {**item, "settings": effective_settings(build_system(item["name"], None,
                                                                            adapter=item.get("adapter"), **args),
                                                               old.get("max_new_tokens", 256))}
            candidates[item["label"]] = item["settings"]
        where, ref = str(folder), label
    if ref is not None:
        if ref not in candidates:
            raise DiffMASError(f"--budget-from: no multi-agent system '{ref}' in {where} "
                               f"(there: {', '.join(candidates) or 'none'})")
        return (ref if where == "this evaluation" else f"{where}:{ref}"), candidates[ref]
    if len(candidates) != 1:
        raise DiffMASError(f"the full-budget single needs one multi-agent system to take its budget from; {where} has "
                           f"{', '.join(candidates) or 'none'}: name one with --budget-from LABEL or DIR:LABEL")
    (label, chosen), = candidates.items()
    return (label if where == "this evaluation" else f"{where}:{label}"), chosen


def settings_notice(systems: list[dict]) -> str | None:
    """One line when the multi-agent systems of an evaluation run on different topologies or latent steps m (a
    trained system defaults to the ones it was trained with), else None."""
    multi = [s for s in systems if "settings" in s and get_kind(s["name"]).multi_agent]
    if len({s["settings"]["topology"] for s in multi}) < 2 and \
            len({s["settings"]["latent_steps"] for s in multi if s["settings"]["latent_steps"] is not None}) < 2:
        return None

    def shape(item: dict) -> str:
        cfg = item["settings"]
        how = f"text, {cfg['writer_max_new_tokens']} tokens/writer" if cfg["latent_steps"] is None else \
            f"m={cfg['latent_steps']}{'' if cfg['realign'] else ', no realignment'}"
        return f"{item['label']} {cfg['topology']} ({how})"

    return "notice: the multi-agent systems differ in topology or latent steps: " + "; ".join(map(shape, multi))


def _legacy_think(model: str) -> bool | None:
    """What a folder written before ``think`` was recorded ran with: the same prompts as ``False`` when the model's
    chat template has no thinking switch; otherwise the template's own default (thinking on for Qwen3), which no
    setting reproduces (None)."""
    from transformers import AutoTokenizer

    from diffmas.assets import resolve_model

    try:
        template = AutoTokenizer.from_pretrained(resolve_model(model)).chat_template
    except (OSError, ValueError, DiffMASError):
        return None
    return None if "enable_thinking" in str(template or "") else False


def check_resumable(out: Path, config: dict) -> None:
    """Refuse to add samples to a folder whose existing samples were made with other settings."""
    path = out / RESULTS_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DiffMASError(f"{path} is unreadable ({exc}); move it away or use another --out") from exc
    defaults = dict(_SETTING_DEFAULTS)
    if "think" not in old:
        defaults["think"] = _legacy_think(config["model"])
    diffs = [f"{k}: {old.get(k, defaults.get(k))!r} -> {config[k]!r}" for k in _SAMPLE_SETTINGS
             if old.get(k, defaults.get(k)) != config[k]]
    old_systems = {s["label"]: s for s in old.get("systems", [])}
    # keys a folder written by an older version lacks (budget, settings) are not compared
    diffs += [f"system {s['label']}: {old_systems[s['label']]} -> {s}" for s in config["systems"]
              if s["label"] in old_systems and any(old_systems[s["label"]][k] != v for k, v in s.items()
                                                   if k in old_systems[s["label"]])]
    if diffs:
        raise DiffMASError(f"{out} holds samples made with other settings ({'; '.join(diffs)}); use another --out")

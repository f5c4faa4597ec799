"""Evaluate systems on tasks: a per-sample log that survives a kill, and a results.json rebuilt from it.

    diffmas eval --systems single,latent_mas,diffmas:runs/demo/diffmas --task rg:chain_sum --limit 100 --out runs/eval

``out/samples.jsonl`` gets one line per finished sample, appended and fsynced batch by batch; running the same
command again skips every (system, task, seed, id) already there, so a crash costs at most one batch.
``out/results.json`` is a pure function of the config and the samples (plus wall times, versions and commit),
so a killed and resumed run ends with the same results as an uninterrupted one.

Under ``accelerate launch --num_processes N ... -m diffmas.cli eval ...`` the batches are dealt round-robin to the
N processes (the same batches as in one process, so the same samples), each appending to its own
``samples.rank{k}.jsonl``; the main process merges them into ``samples.jsonl`` at the end (and at the start of a
resumed run) and computes ``results.json`` from the merged log.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffmas.adapters import read_adapter_meta
from diffmas.assets import DEFAULT_MODEL
from diffmas.backbone import Backbone, load_backbone, resolve_device
from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.eval.metrics import across_seeds, mean_stderr, pass_at_k, summarize
from diffmas.rollout import TRACE_MODES
from diffmas.systems import System, build_system, effective_settings, get_kind
from diffmas.tasks import Example, Task, get_task

__all__ = ["SampleLog", "SystemEntry", "compute_results", "parse_systems", "run_eval", "sample_key", "RESULTS_FILE",
           "SAMPLES_FILE"]

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
# Settings that change what a sample is: resuming into a folder written with other values would mix experiments.
_SAMPLE_SETTINGS = ("model", "dtype", "max_new_tokens", "writer_max_new_tokens", "topology", "latent_steps",
                    "temperature", "top_p", "source", "shuffle_trace", "realign", "think", "trace")
# What a folder written before a setting existed was run with (``think``: see _legacy_think).
_SETTING_DEFAULTS = {"realign": True, "trace": "keep", "top_p": 1.0}


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


def sample_key(system: str, task: str, seed: int, example_id: str) -> tuple[str, str, int, str]:
    """What makes a sample unique: resuming skips every key already in samples.jsonl."""
    return system, task, int(seed), str(example_id)


class SampleLog:
    """samples.jsonl: one JSON object per line, appended and fsynced one batch at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples: dict[tuple[str, str, int, str], dict] = {}
        if path.is_file():
            self._load()

    def __contains__(self, key: tuple) -> bool:
        return key in self.samples

    def _load(self) -> None:
        raw = self.path.read_bytes()
        *lines, tail = raw.split(b"\n")  # ``tail`` is b"" unless a kill cut the last line short
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    self._add(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or bad UTF-8
                    raise DiffMASError(f"{self.path} line {number} is corrupt ({exc}); only a cut-off last line "
                                       "is repaired automatically") from exc
        if tail.strip():
            try:  # the write that was cut may still have been a whole record, minus its newline
                self._add(json.loads(tail))
            except (ValueError, KeyError, TypeError):  # the cut may split a UTF-8 character too
                pass
            # Rewrite cleanly (atomically) so later appends start on a fresh line.
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.samples.values())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def _add(self, record: dict) -> None:
        self.samples.setdefault(sample_key(record["system"], record["task"], record["seed"], record["id"]), record)

    def append(self, records: list[dict]) -> None:
        """Append finished samples and force them to disk, so a kill right after loses nothing."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self._add(r)


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


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this package runs from; (None, None) outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if commit.returncode != 0:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "diffmas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _finite(value: Any) -> Any:
    """NaN -> None, recursively: keeps results.json strict JSON and comparable with ``==``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _flexible(record: dict) -> bool:
    """The flexible verdict; samples written before it existed have one verdict, which stands for both."""
    return bool(record.get("flexible", record["correct"]))


def _row(label: str, task: Task, records: list[dict], seeds: list[int], temperature: float,
         partial: str | None) -> dict:
    """One system x task result; ``records`` ordered by (seed, example order) so float sums are reproducible."""
    row: dict[str, Any] = {"system": label, "task": task.name, "partial": partial}
    row.update(summarize([{"correct": r["correct"], "flexible": _flexible(r), "format_ok": r["format_ok"],
                           "tokens": r["tokens"], "seconds": r["seconds"], "nll": r["nll_sum"],
                           "n_tokens_final": r["final_tokens"], "gold_nll": r.get("gold_nll_sum"),
                           "gold_tokens": r.get("gold_tokens", 0)} for r in records]))
    row["n_samples"] = len(records)
    if len(seeds) > 1:
        per_problem: dict[str, list[bool]] = defaultdict(list)
        per_problem_flexible: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            per_problem[r["id"]].append(bool(r["correct"]))
            per_problem_flexible[r["id"]].append(_flexible(r))
        # Samples of one problem are correlated: the standard error is over problems (per-problem mean
        # accuracy), and the spread over seeds is reported beside it.
        row["n"] = len(per_problem)
        row["stderr"] = mean_stderr(sum(c) / len(c) for c in per_problem.values())[1]
        row["stderr_flexible"] = mean_stderr(sum(c) / len(c) for c in per_problem_flexible.values())[1]
        by_seed = [mean_stderr(r["correct"] for r in records if r["seed"] == s)[0] for s in seeds]
        mean, std = across_seeds(by_seed)
        row["seeds"] = {"n": len(seeds), "accuracy_per_seed": by_seed, "accuracy_mean": mean, "accuracy_std": std}
        if temperature > 0:
            k = len(seeds)
            full = [c for c in per_problem.values() if len(c) >= k]
            value, err = mean_stderr(pass_at_k(len(c), sum(c), k) for c in full)
            row["pass_at_k"] = {"k": k, "value": value, "stderr": err, "n": len(full)}
    return row


def compute_results(config: dict, samples: dict[tuple, dict], tasks: dict[str, tuple[Task, list[Example]]]) -> dict:
    """results.json contents from the resolved ``config`` and the finished ``samples`` (keyed by sample_key)."""
    seeds = list(config["seeds"])
    rows = []
    for entry in config["systems"]:
        for name, (task, examples) in tasks.items():
            records = [samples[k] for seed in seeds for ex in examples
                       if (k := sample_key(entry["label"], name, seed, ex.id)) in samples]
            partial = task.partial if config["source"] is None else None
            rows.append(_row(entry["label"], task, records, seeds, config["temperature"], partial))
    notes = []
    if len(seeds) > 1 and config["temperature"] == 0:
        notes.append("greedy decoding (temperature 0): every seed gives the same samples; extra seeds are redundant")
    notice = settings_notice(config["systems"])
    if notice:
        notes.append(notice.removeprefix("notice: "))
    unsplit = sum("flexible" not in r for r in samples.values())
    if unsplit:
        notes.append(f"{unsplit} samples were graded before strict and flexible verdicts were split: their one "
                     "verdict counts as both")
    isolation = None
    if any(task.kind == "code" for task, _ in tasks.values()):
        from diffmas.eval.sandbox import isolation_level  # only code tasks need the sandbox (and its probe)

        isolation = isolation_level()
    commit, dirty = _git_state()
    return _finite({
        "config": config, "git_commit": commit, "git_dirty": dirty, "versions": _versions(),
        "sandbox_isolation": isolation, "notes": notes, "results": rows,
    })


def _check_resumable(out: Path, config: dict) -> None:
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


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # atomic: a kill never leaves a half-written results.json


def gold_target(ex: Example) -> str:
    """The reference the gold-target perplexity scores: the example's training target when its task sets one
    (a worked solution ending in the answer line, a code solution), else ``Answer: <gold>``."""
    return ex.target if ex.target else f"Answer: {ex.answer}"


def _record(label: str, task: Task, seed: int, ex: Example, rec: dict, max_new_tokens: int) -> dict:
    budget = rec["agents"][-1].get("max_new_tokens") or max_new_tokens  # a topology may set the final agent's
    truncated = rec["generated_tokens"] >= budget  # the final agent used its whole token budget
    grade = task.grade(ex, rec["answer"], truncated=truncated)
    return {
        "system": label, "task": task.name, "seed": seed, "id": ex.id, "correct": bool(grade.correct),
        "flexible": bool(grade.flexible), "truncated": truncated, "format_ok": bool(grade.format_ok),
        "extracted": grade.extracted, "detail": grade.detail, "gold": ex.answer, "response": rec["answer"],
        "tokens": sum(a["generated_tokens"] for a in rec["agents"]), "final_tokens": rec["generated_tokens"],
        "seconds": sum(a["seconds"] for a in rec["agents"]), "nll_sum": rec["nll_sum"],
        "gold_nll_sum": rec.get("gold_nll_sum"), "gold_tokens": rec.get("gold_tokens"),
        "trace_tokens": rec["trace_tokens"], "agents": rec["agents"],
        **({"trace_from": rec["trace_from"]} if "trace_from" in rec else {}),
    }


def run_eval(
    systems: list[str],
    tasks: list[str],
    out: Path,
    *,
    model: str = DEFAULT_MODEL,
    limit: int | None = None,
    seeds: Sequence[int] = (0,),
    batch_size: int = 8,
    max_new_tokens: int = 256,
    writer_max_new_tokens: int = 128,
    topology: str | None = None,
    latent_steps: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    source: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    show_progress: bool = True,
    shuffle_trace: bool = False,
    realign: bool = True,
    think: bool = False,
    trace: str = "keep",
    text_context_limit: int | None = None,
    budget_from: str | None = None,
) -> dict:
    """Evaluate every system on every task for every seed; resumes from ``out/samples.jsonl``.

    Every system's effective settings (topology, latent steps m, realignment, each agent's budget) are recorded
    in ``config.systems[*].settings``; a notice is printed when the multi-agent systems differ in topology or m.
    ``text_context_limit``: see :class:`diffmas.rollout.RolloutSpec`. ``budget_from`` (a multi-agent system's
    label in this evaluation, or an earlier evaluation's folder, ``DIR`` or ``DIR:LABEL``) gives ``single@budget``
    entries (or, when there are none, every single-agent system) that system's summed ``thinking_budget`` as
    their answer budget: the "full thinking budget" baseline.

    Returns the results.json contents (also written to ``out``).
    """
    entries = parse_systems(systems)
    if not tasks:
        raise DiffMASError("no tasks given")
    if source is not None and len(tasks) > 1:
        raise DiffMASError("--source names one task's data: give a single --task with it")
    if limit is not None and limit < 1:
        raise DiffMASError("--limit must be >= 1")
    if trace not in TRACE_MODES:
        raise DiffMASError(f"--trace must be one of {', '.join(TRACE_MODES)}, got '{trace}'")
    if batch_size < 1 or not seeds or len(set(seeds)) != len(seeds):
        raise DiffMASError("need batch size >= 1 and distinct seeds")
    try:
        DecodeConfig(max_new_tokens, temperature, top_p)
    except ValueError as exc:
        raise DiffMASError(str(exc)) from exc
    config = {
        "systems": [asdict(e) for e in entries], "tasks": list(dict.fromkeys(tasks)), "model": model, "limit": limit,
        "seeds": list(seeds), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "writer_max_new_tokens": writer_max_new_tokens, "topology": topology, "latent_steps": latent_steps,
        "device": str(resolve_device(device)), "dtype": dtype, "source": source, "temperature": temperature,
        "top_p": top_p, "shuffle_trace": shuffle_trace, "realign": realign, "think": think, "trace": trace,
        "text_context_limit": text_context_limit, "budget_from": budget_from,
    }
    build_args = dict(topology=topology, latent_steps=latent_steps, writer_max_new_tokens=writer_max_new_tokens,
                      realign=realign, think=think, trace=trace, text_context_limit=text_context_limit)
    for item, settings in zip(config["systems"], _system_settings(entries, build_args, max_new_tokens, budget_from)):
        item["settings"] = settings
    notice = settings_notice(config["systems"])
    if notice:
        print(notice, file=sys.stderr)
    loaded: dict[str, tuple[Task, list[Example]]] = {}
    for name in config["tasks"]:
        task = get_task(name)
        loaded[name] = (task, task.load(limit, source))
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, config)
    rank, world, barrier, device = _shard(device)  # (0, 1, no-op, device) outside `accelerate launch`
    if rank == 0:
        log = _merge_rank_logs(out)  # also what a killed distributed run left behind
        _write_json(out / RESULTS_FILE, {"config": config, "status": "running"})
    barrier()
    if world > 1:  # each process appends to its own log; the samples already merged count as done
        log = SampleLog(out / RANK_SAMPLES_FILE.format(rank=rank))
        log.samples.update(SampleLog(out / SAMPLES_FILE).samples)

    def pending(label: str, task: Task, seed: int, examples: list[Example]) -> list[Example]:
        return [ex for ex in examples if sample_key(label, task.name, seed, ex.id) not in log]

    todo = sum(len(pending(e.label, t, s, exs)) for e in entries for t, exs in loaded.values() for s in seeds)
    shared: Backbone | None = None
    with tqdm(total=-(-todo // world), disable=not show_progress or rank != 0, unit="sample",  # about 1/world each
              dynamic_ncols=True) as bar:
        for entry in entries:
            if not any(pending(entry.label, t, s, exs) for t, exs in loaded.values() for s in seeds):
                continue
            if get_kind(entry.name).trained:
                # peft injects LoRA layers into the model in place: a trained system gets its own copy, so its
                # adapter cannot leak into the systems that share the plain backbone.
                backbone = load_backbone(model, device, dtype)
            else:
                shared = shared or load_backbone(model, device, dtype)
                backbone = shared
            system = build_system(entry.name, backbone, adapter=entry.adapter, **build_args)
            # the final agent's answer budget: max_new_tokens, its topology entry's, or a @budget single's sum
            answer_budget = next(s["settings"]["max_new_tokens"] for s in config["systems"]
                                 if s["label"] == entry.label)
            for task, examples in loaded.values():
                for seed in seeds:
                    bar.set_description(f"{entry.label} {task.name} seed {seed}")
                    _run_one(system, entry.label, task, seed, examples, log, batch_size, answer_budget,
                             temperature, bar, shuffle_trace, shard=(rank, world), top_p=top_p)
    barrier()
    if rank == 0:
        log = _merge_rank_logs(out)
        results = compute_results(config, log.samples, loaded)
        results["status"] = "complete"
        _write_json(out / RESULTS_FILE, results)
    barrier()
    if rank != 0:
        results = json.loads((out / RESULTS_FILE).read_text())
    return results


RANK_SAMPLES_FILE = "samples.rank{rank}.jsonl"


def _shard(device: str) -> tuple[int, int, Callable[[], None], str]:
    """(rank, number of processes, barrier, this process's device): under ``accelerate launch`` each process
    evaluates every ``world``-th batch on its own accelerator; a plain run is rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None, device
    from accelerate import PartialState

    # Joins the process group: gloo for CPU processes (accelerate needs cpu=True for that), nccl on GPUs.
    state = PartialState(cpu=resolve_device(device).type == "cpu")
    if state.device.type != "cpu" and device in ("auto", state.device.type):
        device = str(state.device)  # cuda:<local rank>, not every process on cuda:0
    return state.process_index, state.num_processes, state.wait_for_everyone, device


def _merge_rank_logs(out: Path) -> SampleLog:
    """Fold the per-process logs of a distributed evaluation into samples.jsonl, then remove them.

    Idempotent: a sample already in samples.jsonl is not added again, so a kill between the append and the removal
    loses and duplicates nothing. Runs on the main process only, while the others wait.
    """
    log = SampleLog(out / SAMPLES_FILE)
    parts = sorted(out.glob(RANK_SAMPLES_FILE.format(rank="*")), key=lambda p: int(p.name.split(".")[1][4:]))
    for path in parts:
        log.append([r for key, r in SampleLog(path).samples.items() if key not in log])
        path.unlink()
    return log


def _system_settings(entries: list[SystemEntry], build_args: dict, max_new_tokens: int,
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


def trace_partners(n: int, seed: int = 0) -> list[int]:
    """A seeded derangement: question i reads the trace written for question ``partners[i]`` != i."""
    if n < 2:
        raise DiffMASError("a shuffled trace needs at least 2 questions")
    order = random.Random(seed).sample(range(n), n)
    partners = [0] * n
    for k, i in enumerate(order):  # one cycle through a random order: nobody keeps their own trace
        partners[i] = order[(k + 1) % n]
    return partners


def _run_one(system: System, label: str, task: Task, seed: int, examples: list[Example], log: SampleLog,
             batch_size: int, max_new_tokens: int, temperature: float, bar: tqdm, shuffle_trace: bool = False,
             shard: tuple[int, int] = (0, 1), top_p: float = 1.0) -> None:
    """Run the pending examples of one (system, task, seed), appending each finished batch to ``log``.

    With ``shuffle_trace`` the writers of question i work on another question of the set (the control that
    asks whether the trace carries question-specific information); each record names that question.
    Every record also gets the gold-target NLL (see :func:`gold_target`), from the same writers' trace.
    """
    prompts = [task.prompt(ex) for ex in examples]
    targets = [gold_target(ex) for ex in examples]
    partners = trace_partners(len(examples), seed) if shuffle_trace else None
    # Batches are cut from the full example list (length-sorted), not from what is pending, and a batch that a
    # kill left half-written is rerun whole: a resumed run computes exactly what an uninterrupted one does (same
    # padding, so the same floating-point sums, and with sampling the same random streams).
    order = sorted(range(len(examples)), key=lambda i: (len(prompts[i]), i))
    for number, lo in enumerate(range(0, len(order), batch_size)):
        if number % shard[1] != shard[0]:  # another process's batch (the batches are the same at any world size)
            continue
        batch = order[lo: lo + batch_size]
        todo = {i for i in batch if sample_key(label, task.name, seed, examples[i].id) not in log}
        if not todo:
            continue
        # One stream per batch: with a single seed per call, row r of every batch would draw the same numbers.
        cfg = DecodeConfig(max_new_tokens, temperature, top_p, seed=seed * 1_000_003 + number)
        writer_prompts = [prompts[partners[i]] for i in batch] if partners else None
        records = system.run([prompts[i] for i in batch], cfg, batch_size, writer_prompts=writer_prompts,
                             targets=[targets[i] for i in batch])
        if partners:
            for i, rec in zip(batch, records):
                rec["trace_from"] = examples[partners[i]].id
        log.append([_record(label, task, seed, examples[i], rec, max_new_tokens) for i, rec in zip(batch, records)
                    if i in todo])
        bar.update(len(todo))

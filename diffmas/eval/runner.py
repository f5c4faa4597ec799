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
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from diffmas.assets import DEFAULT_MODEL
from diffmas.backbone import Backbone, load_backbone, resolve_device
from diffmas.decode import DecodeConfig
from diffmas.errors import DiffMASError
from diffmas.eval.entries import check_resumable, parse_systems, settings_notice, system_settings
from diffmas.eval.results import compute_results
from diffmas.eval.samples import RANK_SAMPLES_FILE, RESULTS_FILE, SAMPLES_FILE, SampleLog, merge_rank_logs, \
    sample_key, write_json
from diffmas.systems import System, build_system, get_kind
from diffmas.tasks import Example, Task, get_task

__all__ = ["gold_target", "run_eval", "trace_partners"]


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
    shuffle_part: str | None = None,
    shuffle_thought: bool = False,
    realign: bool = True,
    think: bool = False,
    trace: str | None = None,
    text_context_limit: int | None = None,
    budget_from: str | None = None,
) -> dict:
    """Evaluate every system on every task for every seed; resumes from ``out/samples.jsonl``.

    Every system's effective settings (topology, latent steps m, realignment, each agent's budget) are recorded
    in ``config.systems[*].settings``; a notice is printed when the multi-agent systems differ in topology or m.
    ``text_context_limit``: see :class:`diffmas.rollout_spec.RolloutSpec`. ``budget_from`` (a multi-agent system's
    label in this evaluation, or an earlier evaluation's folder, ``DIR`` or ``DIR:LABEL``) gives ``single@budget``
    entries (or, when there are none, every single-agent system) that system's summed ``thinking_budget`` as
    their answer budget: the "full thinking budget" baseline. ``shuffle_trace``: every writer of question i works
    on another question of the set; ``shuffle_part`` (e.g. ``part:b``): only that part of each question's views
    comes from the other question, so the writers that see it work on another question's part and the rest on
    their own (which writer's information an answer follows); ``shuffle_thought``: every writer of question i
    prefills question i but its latent steps are fed the inputs it computed on another question (does the answer
    follow the thoughts' content or what the latent positions read of the writer's own prompt?).

    Returns the results.json contents (also written to ``out``).
    """
    entries = parse_systems(systems)
    if not tasks:
        raise DiffMASError("no tasks given")
    if source is not None and len(tasks) > 1:
        raise DiffMASError("--source names one task's data: give a single --task with it")
    if limit is not None and limit < 1:
        raise DiffMASError("--limit must be >= 1")
    if sum(map(bool, (shuffle_trace, shuffle_part, shuffle_thought))) > 1:
        raise DiffMASError("give one of --shuffle-trace (every writer), --shuffle-part (the writers of one part) and "
                           "--shuffle-thought (the writers' latent inputs)")
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
        "top_p": top_p, "shuffle_trace": shuffle_trace, "shuffle_part": shuffle_part,
        "shuffle_thought": shuffle_thought, "realign": realign,
        "think": think, "trace": trace, "text_context_limit": text_context_limit, "budget_from": budget_from,
    }
    build_args = dict(topology=topology, latent_steps=latent_steps, writer_max_new_tokens=writer_max_new_tokens,
                      realign=realign, think=think, trace=trace, text_context_limit=text_context_limit,
                      default_topology=task_topology(config["tasks"], topology))
    for item, settings in zip(config["systems"], system_settings(entries, build_args, max_new_tokens, budget_from)):
        item["settings"] = settings
    if shuffle_thought:  # before any model loads: the control needs writers that take latent steps
        thoughtless = [s["label"] for s in config["systems"]
                       if not any(a["latent_steps"] for a in s["settings"]["agents"][:-1])]
        if thoughtless:
            raise DiffMASError(f"--shuffle-thought: {', '.join(thoughtless)} has no writer that takes latent steps")
    notice = settings_notice(config["systems"])
    if notice:
        print(notice, file=sys.stderr)
    loaded: dict[str, tuple[Task, list[Example]]] = {}
    for name in config["tasks"]:
        task = get_task(name)
        loaded[name] = (task, task.load(limit, source))
        if shuffle_part is not None:
            parts = sorted(k for k in task.views(loaded[name][1][0]) if k.startswith("part:"))
            if shuffle_part not in parts:
                raise DiffMASError(f"--shuffle-part {shuffle_part}: task {name} has "
                                   + (f"the parts {', '.join(parts)}" if parts else "no parts (only split tasks do)"))
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(out, config)
    rank, world, barrier, device = _shard(device)  # (0, 1, no-op, device) outside `accelerate launch`
    if rank == 0:
        log = merge_rank_logs(out)  # also what a killed distributed run left behind
        write_json(out / RESULTS_FILE, {"config": config, "status": "running"})
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
                             temperature, bar, shuffle_trace, shuffle_part, shard=(rank, world), top_p=top_p,
                             shuffle_thought=shuffle_thought)
    barrier()
    if rank == 0:
        log = merge_rank_logs(out)
        results = compute_results(config, log.samples, loaded)
        results["status"] = "complete"
        write_json(out / RESULTS_FILE, results)
    barrier()
    if rank != 0:
        results = json.loads((out / RESULTS_FILE).read_text())
    return results


def task_topology(tasks: list[str], topology: str | None) -> str | None:
    """The topology the tasks name for multi-agent systems that name none (relay and split tasks), or None;
    tasks that name different ones need ``--topology`` (or separate evaluations)."""
    named = {get_task(name).topology for name in tasks}
    if len(named) > 1 and topology is None:
        raise DiffMASError(f"tasks {', '.join(tasks)} run on different topologies "
                           f"({', '.join(sorted(str(t) for t in named))}): evaluate them separately or give --topology")
    return next(iter(named))


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


def trace_partners(n: int, seed: int = 0) -> list[int]:
    """A seeded derangement: question i reads the trace written for question ``partners[i]`` != i."""
    if n < 2:
        raise DiffMASError("a shuffled trace needs at least 2 questions")
    order = random.Random(seed).sample(range(n), n)
    partners = [0] * n
    for k, i in enumerate(order):  # one cycle through a random order: nobody keeps their own trace
        partners[i] = order[(k + 1) % n]
    return partners


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
        **{key: rec[key] for key in ("trace_from", "thought_from") if key in rec},
    }


def _run_one(system: System, label: str, task: Task, seed: int, examples: list[Example], log: SampleLog,
             batch_size: int, max_new_tokens: int, temperature: float, bar: tqdm, shuffle_trace: bool = False,
             shuffle_part: str | None = None, shard: tuple[int, int] = (0, 1), top_p: float = 1.0,
             shuffle_thought: bool = False) -> None:
    """Run the pending examples of one (system, task, seed), appending each finished batch to ``log``.

    With ``shuffle_trace`` the writers of question i work on another question of the set (the control that
    asks whether the trace carries question-specific information); with ``shuffle_part`` only that view comes
    from the other question; with ``shuffle_thought`` the writers' latent steps are fed the inputs they computed
    on the other question. Each record names that question (``trace_from``, or ``thought_from``).
    Every record also gets the gold-target NLL (see :func:`gold_target`), from the same writers' trace.
    """
    prompts = [task.views(ex) for ex in examples]
    targets = [gold_target(ex) for ex in examples]
    partners = trace_partners(len(examples), seed) if shuffle_trace or shuffle_part or shuffle_thought else None
    # Batches are cut from the full example list (length-sorted), not from what is pending, and a batch that a
    # kill left half-written is rerun whole: a resumed run computes exactly what an uninterrupted one does (same
    # padding, so the same floating-point sums, and with sampling the same random streams).
    order = sorted(range(len(examples)), key=lambda i: (len(prompts[i]["question"]), i))
    for number, lo in enumerate(range(0, len(order), batch_size)):
        if number % shard[1] != shard[0]:  # another process's batch (the batches are the same at any world size)
            continue
        batch = order[lo: lo + batch_size]
        todo = {i for i in batch if sample_key(label, task.name, seed, examples[i].id) not in log}
        if not todo:
            continue
        # One stream per batch: with a single seed per call, row r of every batch would draw the same numbers.
        cfg = DecodeConfig(max_new_tokens, temperature, top_p, seed=seed * 1_000_003 + number)
        writer_prompts = thought_prompts = None
        if shuffle_thought:
            thought_prompts = [prompts[partners[i]] for i in batch]
        elif partners:
            writer_prompts = [{**prompts[i], shuffle_part: prompts[partners[i]][shuffle_part]} if shuffle_part
                              else prompts[partners[i]] for i in batch]
        records = system.run([prompts[i] for i in batch], cfg, batch_size, writer_prompts=writer_prompts,
                             targets=[targets[i] for i in batch], thought_prompts=thought_prompts)
        if partners:
            for i, rec in zip(batch, records):
                rec["thought_from" if shuffle_thought else "trace_from"] = examples[partners[i]].id
        log.append([_record(label, task, seed, examples[i], rec, max_new_tokens) for i, rec in zip(batch, records)
                    if i in todo])
        bar.update(len(todo))

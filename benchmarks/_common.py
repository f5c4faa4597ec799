"""Shared helpers of the benchmark scripts: setup, interleaved timing, memory probes, machine info, output.

Every benchmark reports a RATIO of two things measured in the same process and interleaved (A B, then B A, ...),
because the machines these run on are shared: absolute seconds drift with other people's load, while the ratio of
two alternating measurements mostly does not. Absolute numbers are printed too, for scale only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere, without installing benchmarks/
    sys.path.insert(0, str(ROOT))

from diffmas.backbone import Backbone, load_backbone  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = ROOT / "docs" / "benchmarks"


# ----------------------------------------------------------------------------------------------- setup / args
def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes; the script's docstring (its first line is the command) is the help."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON of the numbers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 by default: on a shared 2-core machine 1 thread is steadier)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="model weights' dtype (float32 keeps CPU answers comparable)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions / smaller sizes (smoke run)")
    return p


def setup(threads: int, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def load(model: str, device: str = "cpu", dtype: str = "float32") -> Backbone:
    return load_backbone(model, device=device, dtype=dtype)


class FixedLengthBackbone(Backbone):
    """A Backbone that never sees an end-of-sequence token, so every decode runs exactly ``max_new_tokens``.

    Timing comparisons need the same number of decode steps on both sides; the library's DecodeConfig has no
    "ignore EOS" switch (nor should it), so the benchmark hides the EOS ids instead of touching library code.
    """

    @property
    def eos_ids(self) -> set[int]:  # type: ignore[override]
        return set()


def fixed_length(backbone: Backbone) -> FixedLengthBackbone:
    # Shares model, tokenizer and the derived-tensor cache (realigner) with the original.
    return FixedLengthBackbone(model=backbone.model, tokenizer=backbone.tokenizer, name=backbone.name,
                               cache=backbone.cache)


def library_training_step(cfg, bf16: bool = False, before: Callable[[], Any] | None = None):
    """The library's own training step for ``cfg`` (rollout, backward, clipping, AdamW) on its first batch, calling
    ``before`` first; returns ``(step, backbone, spec, plan)``."""
    from diffmas.train.data import build_datasets
    from diffmas.train.loop import attach_trainable, wrapped_trainable
    from diffmas.train.objectives import plan_norm, plan_step, step_loss

    train_set, _ = build_datasets(cfg, cfg.batch_size)
    backbone = load_backbone(cfg.model.name, "cpu", cfg.model.dtype)
    spec = attach_trainable(backbone, cfg)
    backbone.model.train()
    params = wrapped_trainable(backbone, spec)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    plan = plan_step(cfg, 0, train_set, spec.topology)
    norm = plan_norm(backbone, spec, plan)

    def step() -> None:
        if before is not None:
            before()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = step_loss(backbone, spec, cfg, plan, norm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, backbone, spec, plan


def chain_sum_prompts(n: int) -> list[str]:
    """The first ``n`` evaluation questions of rg:chain_sum, rendered as the task's user turn."""
    from diffmas.tasks import get_task

    task = get_task("rg:chain_sum")
    return [task.prompt(ex) for ex in task.load(limit=n)]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result).

    CPU time excludes the time this process waited while other jobs held the cores, so on a shared machine its
    ratios are steadier than wall-clock ones (memory-bandwidth contention still shows in both).
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, dict[str, list[float]]]:
    """Run every function ``reps`` times, alternating their order each repetition (A B, B A, A B, ...).

    Alternation cancels slow drifts of the machine's load to first order; ``warmup`` untimed rounds first
    (allocator, kernel selection, lazily computed tensors such as the realignment matrix).
    Returns ``{name: {"wall": [...], "cpu": [...]}}``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            wall, cpu, _ = timed(fns[name], device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


@dataclass(frozen=True)
class Ratio:
    """``a / b`` from paired, interleaved repetitions."""

    median_a: float
    median_b: float
    ratio_of_medians: float
    median_of_ratios: float
    min_ratio: float
    max_ratio: float
    reps: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def ratio(a: list[float], b: list[float]) -> Ratio:
    pairs = [x / y for x, y in zip(a, b)]
    ma, mb = statistics.median(a), statistics.median(b)
    return Ratio(ma, mb, ma / mb, statistics.median(pairs), min(pairs), max(pairs), len(pairs))


def compare(times: dict[str, dict[str, list[float]]], a: str, b: str) -> dict[str, dict[str, float]]:
    """``a / b`` on wall and on CPU time, from the output of :func:`interleaved`."""
    return {kind: ratio(times[a][kind], times[b][kind]).as_dict() for kind in ("wall", "cpu")}


# ------------------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def rss_mib() -> float:
    """Current resident set size."""
    return _status_kib("VmRSS") / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS since start or the last :func:`reset_peak_rss` (VmHWM; same mark as getrusage's ru_maxrss)."""
    return _status_kib("VmHWM") / 1024


def release_memory() -> None:
    """Hand freed heap back to the OS so the next measurement starts from the live set, not glibc's free lists."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ output / info
# Taken when a benchmark starts (its first import), not when machine() writes the JSON at the end.
_STARTED = (dt.datetime.now().isoformat(timespec="seconds"), os.getloadavg()[0] if hasattr(os, "getloadavg") else None)


def machine(threads: int, device: str = "cpu") -> dict[str, Any]:
    """What produced the numbers: CPU model, cores, threads, versions, start time and the load then."""
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    info: dict[str, Any] = {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "avx512_bf16": bool(flags and "avx512_bf16" in flags.group(1).split()),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": _STARTED[0],
        "loadavg_at_start": _STARTED[1],
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (prints fine in a terminal and pastes into docs/benchmarks.md as is)."""
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def merged(out: Path, name: str, key: str, fresh: dict[str, Any]) -> dict[str, Any]:
    """``fresh`` (a mapping under ``key``, e.g. results per thread count) on top of what an earlier run of the same
    benchmark wrote to ``out/name.json``: thread counts measured at different times (one while the other core was
    busy, two on an idle machine) end up in one file, each with the machine line it was measured under."""
    path = out / f"{name}.json"
    old = json.loads(path.read_text()).get(key, {}) if path.is_file() else {}
    return {**old, **fresh}


def write_json(out: Path, name: str, data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path

"""The sample log of an evaluation: ``samples.jsonl``, one finished sample per line, and what a run writes beside it.

A line is appended and fsynced batch by batch, so a kill costs at most one batch; a resumed run skips every key
already in the log. Under ``accelerate launch`` each process appends to its own ``samples.rank{k}.jsonl``, which
the main process folds into ``samples.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffmas.errors import DiffMASError

__all__ = ["RANK_SAMPLES_FILE", "RESULTS_FILE", "SAMPLES_FILE", "SampleLog", "merge_rank_logs", "sample_key",
           "write_json"]

SAMPLES_FILE = "samples.jsonl"
RANK_SAMPLES_FILE = "samples.rank{rank}.jsonl"
RESULTS_FILE = "results.json"


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


def merge_rank_logs(out: Path) -> SampleLog:
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


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # atomic: a kill never leaves a half-written results.json

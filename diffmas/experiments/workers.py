"""Several one-thread worker processes working through a study's arms: each claims the next arm that is ready
(an exclusive claim file; a dead worker's claim is taken over), runs it, rebuilds the report, and with
``commit`` commits the results folder, so a study carries on where it stopped, on a fresh machine too. A worker
whose package code was changed and committed while it ran an arm restarts itself on that code before the next;
until then it runs the code it started with, every module imported up front (:func:`preload_package`)."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

__all__ = ["claim", "code_tree", "code_version", "commit_docs", "plan_status", "preload_package",
           "restart_on_new_code", "snapshot_unfinished", "work_through"]


class ArmLike(Protocol):
    @property
    def id(self) -> str: ...


def _holder(root: Path, arm_id: str) -> int | None:
    """The pid of the live process that holds an arm's claim (0 while its holder is still writing it), or None
    where no claim is left or its process is gone."""
    try:
        pid = int((root / f"{arm_id}.claim").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return pid


def claim(root: Path, arm_id: str) -> bool:
    """Claim an arm for this process; a claim whose process is gone is taken over."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{arm_id}.claim"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _holder(root, arm_id) is not None:
            return False
        path.unlink(missing_ok=True)
        return claim(root, arm_id)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def code_version() -> str:
    """The commit of the code running the study (plus ``+dirty`` with uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def code_tree() -> str | None:
    """The committed tree of the package (its git object id), or None where that cannot be read or the package has
    uncommitted changes: a worker restarts only onto code that someone committed, never onto a half-made edit."""
    here = Path(__file__).resolve().parents[1]
    try:
        tree = subprocess.run(["git", "rev-parse", "HEAD:./"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True,
                               check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if dirty.stdout.strip() else tree.stdout.strip()


def preload_package(name: str = "diffmas") -> list[str]:
    """Import every module of package ``name`` now (``__main__`` modules excepted), so that a long-running worker
    runs the code it started with: a module imported lazily mid-arm would come from the files as edited since (a
    worker once evaluated with a newer ``systems.py`` calling the ``rollout`` it had loaded, and crashed).
    Returns the modules that could not be imported (an optional dependency missing)."""
    package = importlib.import_module(name)
    missing = []
    for info in pkgutil.walk_packages(package.__path__, f"{name}.", onerror=missing.append):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:
            missing.append(info.name)
    return missing


def restart_on_new_code(started: str | None) -> None:
    """Replace this process by a fresh run of the same command (same pid, so its claims stay its own) when the
    package's committed code differs from ``started`` (the tree it was loaded from)."""
    now = code_tree()
    if started is not None and now is not None and now != started:
        print(f"[study] the code changed ({started[:10]} -> {now[:10]}): restarting on it", flush=True)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def commit_docs(docs: Path, message: str) -> None:
    """Commit the study's results (only ``docs``), serialised between workers."""
    lock = docs / ".git.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        for _ in range(10):  # another git command may hold the index for a moment
            # Run in ``docs``: the results go to the repository that holds them, even when the study's code
            # runs from another checkout (a frozen worktree, so that editing the code cannot disturb a run).
            add = subprocess.run(["git", "add", "."], cwd=docs, capture_output=True, text=True)
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--", "."], cwd=docs, capture_output=True,
                                  text=True)
            if add.returncode == 0 and (done.returncode == 0 or "nothing" in done.stdout + done.stderr):
                return
            time.sleep(3)
        print(f"[study] could not commit: {done.stderr.strip()}")


def work_through(plan: Callable[[], Sequence[ArmLike]], run: Callable[[ArmLike], str], report: Callable[[], object],
                 out: Path, docs: Path, commit: bool = False, max_arms: int | None = None,
                 fits: Callable[[ArmLike], bool] | None = None, keep_going: bool = False) -> None:
    """Run arms until none is left to claim. ``plan()`` lists every arm in priority order (it may grow as results
    come in); an arm is done when ``docs/arms/<id>.json`` exists. ``run(arm)`` returns the commit message.
    ``fits(arm)``: whether the arm can still finish in the time this worker has (a deadline); an arm that does
    not is passed over for a later one that does, and the worker stops once no free arm is left that fits, or,
    with ``keep_going``, then takes the free arms in plan order regardless (a machine that outlives the deadline
    resumes them from their checkpoints; one that does not loses only time its cores would have idled)."""
    docs.mkdir(parents=True, exist_ok=True)
    started = code_tree()
    preload_package()
    done_here = 0
    while max_arms is None or done_here < max_arms:
        pending = [a for a in plan() if not (docs / "arms" / f"{a.id}.json").is_file()]
        free = [a for a in pending if _holder(out / "claims", a.id) is None]
        fitting = [a for a in free if fits is None or fits(a)]
        arm = next((a for a in fitting if claim(out / "claims", a.id)), None)
        if arm is None and keep_going and len(fitting) < len(free):
            arm = next((a for a in free if claim(out / "claims", a.id)), None)
            if arm is not None:
                print(f"[study] no free arm fits in the time left: starting {arm.id} anyway (--keep-going)",
                      flush=True)
        if arm is None:
            if not pending:
                break
            if len(fitting) < len(free):
                print(f"[study] no free arm fits in the time left ({len(free)} left, the next: {free[0].id}): "
                      "stopping", flush=True)
                break
            # Everything ready is claimed by another worker (whose results may unlock the next phase).
            time.sleep(60)
            continue
        print(f"[study] {arm.id}: training and evaluating", flush=True)
        message = run(arm)
        report()
        done_here += 1
        (out / "claims" / f"{arm.id}.claim").unlink(missing_ok=True)
        (docs / IN_PROGRESS / f"{arm.id}.jsonl").unlink(missing_ok=True)
        if commit:
            commit_docs(docs, message)
        if max_arms is None:  # a bounded run (--max-arms) counts its arms in this process: it keeps its code
            restart_on_new_code(started)


IN_PROGRESS = "in-progress"
"""Where ``snapshot_unfinished`` keeps the curves of arms still training (under the study's docs)."""


def snapshot_unfinished(out: Path, docs: Path) -> list[str]:
    """Copy the curve so far (training steps, held-out losses) of every arm still training into
    ``docs/in-progress/`` with a table of them, and drop the snapshots of arms that have finished since: what a stop
    commits, so that a trajectory survives a fresh machine (weights never do). Returns the arms snapshotted."""
    folder = docs / IN_PROGRESS
    folder.mkdir(parents=True, exist_ok=True)
    finished = {p.stem for p in (docs / "arms").glob("*.json")}
    for stale in folder.glob("*.jsonl"):
        if stale.stem in finished:
            stale.unlink()
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    rows, snapshotted = [], []
    for curve in sorted((out / "runs").glob("*/metrics.jsonl")):
        arm_id = curve.parent.name
        records = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
        if arm_id in finished or not records:
            continue
        (folder / f"{arm_id}.jsonl").write_text(curve.read_text())
        held = ", ".join(f"{r['step']}: {r['heldout_loss']:.3f}" for r in records if "heldout_loss" in r)
        last = max((r["step"] for r in records if "step" in r), default=0)
        rows.append(f"| {arm_id} | {stamp} | {last} | {held or '–'} |")
        snapshotted.append(arm_id)
    table = ["| arm | snapshot (UTC) | last step | held-out loss (step: loss) |", "|---|---|---|---|", *rows]
    (folder / "README.md").write_text(
        "# Arms still training when a session stopped\n\n"
        "Snapshots of `runs/<arm>/metrics.jsonl` (training steps and held-out losses so far), written by\n"
        "`--snapshot` at a stop so that the trajectory survives a fresh machine (weights are never committed: on a\n"
        "fresh machine these arms restart from step 0). Not results: a finished arm's curve is\n"
        "`../curves/<arm>.jsonl`, and its result `../arms/`. A snapshot is dropped once its arm has finished.\n\n"
        + ("\n".join(table) if rows else "No arm is training.") + "\n")
    return snapshotted


def plan_status(plan: Sequence[ArmLike], out: Path, docs: Path,
                estimate: Callable[[ArmLike], float | None] | None = None) -> list[tuple[str, str, str]]:
    """Where each planned arm stands, in plan order: (arm id, state, detail). States: ``finished`` (its result in
    ``docs/arms``), ``training`` (claimed by a live worker), ``stopped`` (trained part-way, no live worker: it
    resumes from its last checkpoint, or from step 0 without one), ``pending``. ``estimate(arm)``: the seconds a
    stopped or pending arm would still take (None: unknown), shown in hours."""
    rows = []
    for arm in plan:
        result, run = docs / "arms" / f"{arm.id}.json", out / "runs" / arm.id
        metrics = run / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.is_file() else []
        step = max((r["step"] for r in records if "step" in r), default=None)
        checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*") if p.name[5:].isdigit()) \
            if (run / "checkpoints").is_dir() else []
        if result.is_file():
            rec = json.loads(result.read_text())
            rows.append((arm.id, "finished", f"accuracy {rec['accuracy']:.3f} ± {rec['stderr']:.3f}, "
                                             f"{rec.get('steps_trained', 0)} steps" if "accuracy" in rec else ""))
        elif (pid := _holder(out / "claims", arm.id)) is not None:
            rows.append((arm.id, "training", f"step {step if step is not None else 0} (pid {pid})"))
        else:
            cost = estimate(arm) if estimate is not None else None
            left = [] if cost is None else [f"about {cost / 3600:.1f} h"]
            if records:
                resumes = f"resumes from step {int(checkpoints[-1][5:])}" if checkpoints else "restarts from step 0"
                rows.append((arm.id, "stopped", "; ".join([f"logged step {step}", resumes, *left])))
            else:
                rows.append((arm.id, "pending", "; ".join(left)))
    return rows

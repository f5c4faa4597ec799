"""Reaping what sandboxed code started (:mod:`diffmas.sandbox`): wait for the child without reaping it, then kill
its process group, its bubblewrap namespace and, when it ran under its own uid, every process of that uid."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` s for the child to exit, without reaping it.

    Leaving it a zombie keeps its pid (= the process group id) reserved, so the
    killpg that follows cannot hit an unrelated group that reused the number.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel / non-Linux): plain wait
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if poller.poll(left * 1000):
                return True
        return False
    finally:
        os.close(fd)


def kill_everything(proc: subprocess.Popen[bytes], ids: tuple[int, int] | None, supervised: bool, python: str) -> None:
    """Kill the child's process group, reap the child, then every process of the sandbox uid (``ids``; ``python``:
    an interpreter that uid can run, for the ``kill(-1)`` sent as it)."""
    pgid = proc.pid
    if supervised:
        # Let the supervisor kill bwrap and reap the namespace init: once it has
        # exited, the PID namespace and everything in it are gone.
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        wait_exit(proc, 5.0)
    _killpg(pgid)
    proc.wait()
    if ids is None:
        # Same uid as us: all we can target is the group. SIGKILLed members linger
        # for a moment, so wait until the group has no live member left.
        for _ in range(200):
            if not any(field(f, "NSpgid") == pgid for f in tasks()):
                return
            _killpg(pgid)
            time.sleep(0.005)
        return
    # Children that called setsid() or double-forked left the group, but not the uid.
    # kill(-1) from that uid hits all of them at once, which a fork storm cannot outrun.
    for _ in range(50):
        if not any(field(f, "Uid") == ids[0] for f in tasks()):
            return
        try:
            subprocess.run([python, "-I", "-S", "-c", "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"],
                           user=ids[0], group=ids[1], extra_groups=[], env={}, cwd="/",
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.01)  # a dying PID namespace takes a moment to empty
    log.warning("sandbox uid %d still has processes after cleanup", ids[0])


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tasks(zombies: bool = False) -> Iterator[dict[str, str]]:
    """/proc/<pid>/status fields of every process (zombies only if asked)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="utf-8", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        # Zombies run nothing (and a lazy init may not have reaped them yet).
        if zombies or not fields.get("State", "").strip().startswith(("Z", "X")):
            yield fields


def field(fields: dict[str, str], key: str) -> int:
    """First number of a status field (Uid: real uid, NSpgid: pgid as seen from here)."""
    values = fields.get(key, "").split()
    return int(values[0]) if values else -1

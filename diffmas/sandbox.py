"""Run untrusted, model-written Python code (HumanEval/MBPP answers) in a sandbox.

Every run gets a fresh temporary working directory (removed afterwards), a
scrubbed environment, its own session/process group, a wall-clock timeout and
rlimits (address space, CPU time, processes, file size, no core dumps). On top
of that, whichever of these works on this machine is used:

* ``bubblewrap``: the code runs under ``bwrap`` with a read-only ``/`` (``/dev``
  included), no network and its own PID namespace, so it can neither see nor
  signal other processes, and everything it spawned dies with the namespace. It
  can write only to its work dir, ``/tmp`` and ``/dev/shm``: three private tmpfs
  of 64 MiB each, so at most 192 MiB in all, held in memory, never on the host
  disk.
* ``setuid``: when the evaluator is root, the child runs as a fresh unprivileged
  uid/gid allocated per call. Root is exempt from ``RLIMIT_NPROC``, and a
  distinct uid keeps the code from signalling the evaluator or writing anywhere
  but its dir and world-writable places (``/tmp``, ``/dev/shm``: without bwrap
  those are the real ones). Afterwards every process of that uid is killed,
  which catches children that left the process group (``setsid``, double fork).

``SandboxResult.isolation`` names the layers in force, e.g.
``"bubblewrap+setuid+rlimits"``. Without bwrap the code has network access, and
its writes are limited per file only (16 MiB each, ``RLIMIT_FSIZE``), not in
total: its work dir is a host directory, and ``/tmp`` and ``/dev/shm`` are the
real ones. The plain ``"rlimits"`` fallback (non-root, no working bwrap) contains
time, memory and fork storms only: the code can then write wherever the user
can, signal the user's processes, and children that call ``setsid`` may survive.
In every mode the code can read world-readable files.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from diffmas.sandbox_reap import field, kill_everything, tasks, wait_exit

__all__ = ["SandboxResult", "isolation_level", "run_code"]

log = logging.getLogger(__name__)

_OUTPUT_LIMIT = 10_000  # bytes of stdout/stderr kept (head and tail halves)
_FSIZE_LIMIT = 16 << 20  # largest file the code may write, stdout included
_TMPFS_SIZE = 64 << 20  # size of each private tmpfs under bwrap: the work dir, /tmp and /dev/shm
_NOFILE_LIMIT = 256
# Per-call uids when running as root, drawn at random from [2**30, 2**31): far
# above normal and subuid ranges, and concurrent calls practically never collide.
_UID_BASE = 1 << 30
_SCRIPT = "main.py"

# Runs bwrap (argv[1:]) as a child subreaper. bwrap's outer process exits without
# waiting for its PID-namespace init, which is then orphaned while the namespace
# is still being torn down. Adopting and reaping it means that when this process
# has exited, every process of the namespace is gone (and none is left for PID 1
# to reap). SIGTERM means "kill bwrap now" (the namespace dies with it).
_SUPERVISOR = r'''
import ctypes, os, signal, sys
try:
    libc = ctypes.CDLL(None)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the evaluator
except Exception:
    pass
child = 0
signal.signal(signal.SIGTERM, lambda *_: child and os.kill(child, signal.SIGKILL))
child = os.fork()
if child == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os.write(2, b"sandbox: cannot exec bwrap\n")
        os._exit(127)
status = 0
while True:
    try:
        pid, st = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        status = os.waitstatus_to_exitcode(st)
os._exit(status if status >= 0 else 128 - status)
'''


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one :func:`run_code` call."""

    status: str  # "passed" | "failed" | "timeout" | "error"
    returncode: int | None
    stdout: str  # at most ~10 kB: head and tail of the stream
    stderr: str
    seconds: float
    isolation: str  # layers in force, e.g. "bubblewrap+setuid+rlimits"


def run_code(
    code: str, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 64, stdin: str = ""
) -> SandboxResult:
    """Run ``code`` as a Python script in the strongest sandbox available here; ``stdin`` is its input.

    Status semantics:

    * ``"passed"``: exit code 0 within ``timeout`` seconds.
    * ``"failed"``: non-zero exit code, i.e. the code raised (AssertionError,
      SyntaxError, any exception), called ``sys.exit(n)``, or hit a limit that
      Python turns into an exception: ``MemoryError`` (``memory_mb`` of address
      space), ``OSError`` EFBIG (16 MiB per file, stdout included), ENOSPC
      (a full tmpfs, under bwrap), EAGAIN on fork (``max_processes``).
    * ``"timeout"``: the wall clock (or the CPU-time rlimit, ``SIGXCPU``) ran
      out; the whole process group / namespace is killed.
    * ``"error"``: the sandbox could not run the code, or the process died of a
      signal (e.g. ``SIGKILL``, ``SIGSEGV``). Under bwrap a signal death shows
      as exit code 128+signal, so ``sys.exit(137)`` there also reads as
      ``"error"``.

    ``max_processes`` counts tasks (threads included) of the sandbox, its
    helper processes (up to 4) included. After the call returns, no process the
    code started is left running (except in the plain ``"rlimits"`` mode, see
    the module docstring).
    """
    return _run(code, timeout, memory_mb, max_processes, use_bwrap=isolation_level().startswith("bubblewrap"),
                stdin=stdin)


_probe_lock = threading.Lock()
_isolation: str | None = None


def isolation_level() -> str:
    """Isolation :func:`run_code` uses on this machine (probed once, then cached)."""
    global _isolation
    with _probe_lock:
        if _isolation is None:
            _isolation = _layers(False)
            if shutil.which("bwrap"):
                # Try the real thing: bwrap fails without user namespaces (many containers).
                probe = _run("pass", 30.0, 1024, 64, use_bwrap=True)
                if probe.status == "passed":
                    _isolation = probe.isolation
                else:
                    log.warning("bubblewrap does not work here (%s); sandbox falls back to %s "
                                "(network open, writes capped per file only)", probe.stderr.strip()[-300:], _isolation)
            else:
                log.warning("bwrap not installed (scripts/setup-system.sh); sandbox uses %s "
                            "(network open, writes capped per file only)", _isolation)
    return _isolation


def _layers(use_bwrap: bool) -> str:
    return "+".join((["bubblewrap"] if use_bwrap else []) + (["setuid"] if os.geteuid() == 0 else []) + ["rlimits"])


def _run(code: str, timeout: float, memory_mb: int, max_processes: int, *, use_bwrap: bool,
         stdin: str = "") -> SandboxResult:
    """run_code with the bwrap layer chosen explicitly (tests use it to cover both modes)."""
    if timeout <= 0 or memory_mb <= 0 or max_processes <= 0:
        raise ValueError("timeout, memory_mb and max_processes must be positive")
    isolation = _layers(use_bwrap)
    ids = (_UID_BASE + secrets.randbelow(_UID_BASE),) * 2 if os.geteuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="diffmas-sandbox-")
    start = time.monotonic()
    try:
        script = os.path.join(workdir, _SCRIPT)
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        if ids:
            os.chown(workdir, *ids)
        argv = [_python(), "-I", "-B", script]
        if use_bwrap:
            argv = [_python(), "-I", "-S", "-c", _SUPERVISOR, *_bwrap_argv(workdir), *argv]
        # Nothing of the evaluator's environment (API keys, tokens) is passed on.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONIOENCODING": "utf-8"}
        # A fresh uid starts from zero; otherwise NPROC is per user, so leave room
        # for the tasks the user already has (zombies count too).
        nproc = max_processes if ids else max_processes + sum(
            field(f, "Threads") for f in tasks(zombies=True) if field(f, "Uid") == os.getuid())
        preexec = _limits(memory_mb << 20, math.ceil(timeout) + 1, nproc)
        # Output goes to files, not pipes: RLIMIT_FSIZE caps them, no reader thread needed.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                # Input from an unlinked file that we close once the child has it: after the code has read
                # and closed it, the code can never read it again (grading passes a secret this way).
                with tempfile.TemporaryFile() as given:
                    given.write(stdin.encode())
                    given.seek(0)
                    proc = subprocess.Popen(
                        argv, stdin=given, stdout=out, stderr=err, cwd=workdir, env=env,
                        start_new_session=True, preexec_fn=preexec,
                        user=ids[0] if ids else None, group=ids[1] if ids else None,
                        extra_groups=[] if ids else None)
            except (OSError, subprocess.SubprocessError) as exc:
                return SandboxResult("error", None, "", f"sandbox: could not start: {exc!r}",
                                     time.monotonic() - start, isolation)
            try:
                exited = wait_exit(proc, timeout)
                seconds = time.monotonic() - start
            finally:
                kill_everything(proc, ids, supervised=use_bwrap, python=_python())
            stdout, stderr = _read_capped(out), _read_capped(err)
    finally:
        _remove(workdir)
    rc = proc.returncode
    return SandboxResult(_classify(rc, not exited, use_bwrap, stderr), rc, stdout, stderr, seconds, isolation)


@functools.lru_cache(maxsize=None)
def _python() -> str:
    """Interpreter for the code: sys.executable, unless the sandbox uid cannot run it.

    As root, sys.executable often lives under /root (pyenv, venvs), which an
    unprivileged uid cannot enter; the system python3 is fine for benchmark code.
    """
    if os.geteuid() != 0:
        return sys.executable
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if not candidate:
            continue
        uid = _UID_BASE + secrets.randbelow(_UID_BASE)
        try:
            ok = subprocess.run([candidate, "-I", "-S", "-c", ""], user=uid, group=uid, extra_groups=[],
                                env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return candidate
    return sys.executable  # nothing works: run_code will report "error"


def _bwrap_argv(workdir: str) -> list[str]:
    # An interpreter (venv) living under /tmp would vanish behind the private /tmp.
    hidden = sorted({p for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(_python())))
                     if p.startswith(("/tmp/", "/dev/shm/"))})
    script = os.path.join(workdir, _SCRIPT)
    # Every writable place is a size-limited tmpfs: a bind-mounted host dir would let the code fill the host
    # disk with many files of up to RLIMIT_FSIZE each, and bwrap's own /dev tmpfs has no size limit, so it is
    # made read-only. The work dir keeps its host path so tracebacks and HOME look the same in both modes.
    return [shutil.which("bwrap") or "bwrap",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(_TMPFS_SIZE), "--tmpfs", "/tmp",
            "--size", str(_TMPFS_SIZE), "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev",
            *[arg for p in hidden for arg in ("--ro-bind", p, p)],
            "--size", str(_TMPFS_SIZE), "--tmpfs", workdir, "--ro-bind", script, script, "--chdir", workdir,
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session", "--"]


def _limits(memory_bytes: int, cpu_seconds: int, nproc: int) -> Callable[[], None]:
    """Build the preexec_fn; values are clamped in the parent so the child only calls setrlimit."""
    wanted = {
        resource.RLIMIT_AS: (memory_bytes, memory_bytes),
        resource.RLIMIT_CPU: (cpu_seconds, cpu_seconds + 1),  # SIGXCPU first, SIGKILL a second later
        resource.RLIMIT_NPROC: (nproc, nproc),
        resource.RLIMIT_FSIZE: (_FSIZE_LIMIT, _FSIZE_LIMIT),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NOFILE: (_NOFILE_LIMIT, _NOFILE_LIMIT),
    }
    limits = []
    for res, (soft, hard) in wanted.items():
        cur_hard = resource.getrlimit(res)[1]
        if cur_hard != resource.RLIM_INFINITY:  # a non-root process cannot raise its hard limit
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        limits.append((res, (soft, hard)))

    def apply() -> None:
        for res, pair in limits:
            resource.setrlimit(res, pair)

    return apply


def _read_capped(f: IO[bytes]) -> str:
    """Decode a captured stream, keeping head and tail (tracebacks are at the end)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= _OUTPUT_LIMIT:
        data = f.read()
    else:
        half = _OUTPUT_LIMIT // 2
        head = f.read(half)
        f.seek(size - half)
        data = head + f"\n[... {size - 2 * half} bytes truncated ...]\n".encode() + f.read()
    return data.decode("utf-8", errors="replace")


def _classify(rc: int | None, timed_out: bool, via_bwrap: bool, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "passed"
    if rc is None:
        return "error"
    # bwrap reports a child killed by signal N as exit code 128+N.
    sig = -rc if rc < 0 else (rc - 128 if via_bwrap and rc > 128 else 0)
    if sig == signal.SIGXCPU:
        return "timeout"
    if sig or (via_bwrap and stderr.startswith(("bwrap:", "sandbox:"))):
        return "error"
    return "failed"


def _remove(workdir: str) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(workdir):  # non-root: the code may have chmod-ed dirs to 000
        subprocess.run(["chmod", "-R", "u+rwX", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(workdir, ignore_errors=True)

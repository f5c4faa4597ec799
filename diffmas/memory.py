"""Process memory on CPU: the allocator policy, chosen by measurement (docs/benchmarks.md, P8).

glibc serves blocks below its mmap threshold from the heap, and it raises that threshold (up to 32 MiB) every
time a larger mapped block is freed. Long latent chains allocate a new, slightly larger K/V tensor per layer and
step and free the old one, so the freed blocks fragment the heap and the process stays gigabytes above what it
uses (P4: 2.6 GiB resident after a checkpointed forward that holds 117 MiB; P8: a training step at the demo's
settings leaves 6.2 GiB resident under glibc's defaults). Mapping every block of 64 KiB or more on its own fixes
that, but then every step maps, page-faults and unmaps gigabytes: 1.6x slower training (P8). The policy
(``DIFFMAS_MALLOC``) picks the trade-off:

- ``jemalloc`` (default): jemalloc instead of glibc's malloc, as fast as glibc's defaults and about as lean as
  the 64 KiB threshold (P8). It must be loaded before Python starts, so the command line restarts itself once
  with ``LD_PRELOAD`` (:func:`preload_jemalloc`) when the library is installed (Debian's libjemalloc2, which
  ``make`` installs; ``$DIFFMAS_JEMALLOC`` names another file). A process without it (the Python API, a machine
  without the library) falls back to :data:`FALLBACK`; run ``LD_PRELOAD=<libjemalloc.so.2> python ...`` to get it;
- ``trim``: glibc's own thresholds, and the free heap handed back to the OS (``malloc_trim``) after every
  training step (:func:`step_done`): lean between steps, but the next step faults the pages in again;
- ``glibc``: glibc's defaults, nothing else (``DIFFMAS_MMAP_THRESHOLD=0`` means the same);
- ``mmap64k`` / ``mmap4m``: every block of at least 64 KiB / 4 MiB is its own mapping, returned at free.
  ``DIFFMAS_MMAP_THRESHOLD=<bytes>`` sets any threshold.

The CLI applies the policy at start (so ``diffmas train``/``eval`` and ``accelerate launch -m diffmas.cli`` get
it), and so does the library's ``train()``; call :func:`configure_allocator` yourself in a long-running process
of your own. Thresholds are skipped where the user already chose (any ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` in the environment: glibc applied those at start) and off glibc (macOS, musl). CUDA
memory is torch's caching allocator's business and is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys
from pathlib import Path

POLICIES = {"jemalloc": 0, "trim": 0, "glibc": 0, "mmap64k": 64 * 1024, "mmap4m": 4 << 20}
"""Policy -> the mmap threshold it sets in glibc (0: glibc's own)."""
DEFAULT_POLICY = "jemalloc"
FALLBACK = "trim"
"""The policy of a process that asked for jemalloc but runs without it."""
POLICY_ENV = "DIFFMAS_MALLOC"
ENV = "DIFFMAS_MMAP_THRESHOLD"
JEMALLOC_ENV = "DIFFMAS_JEMALLOC"
_REEXEC_MARK = "DIFFMAS_JEMALLOC_PRELOADED"
JEMALLOC_PATHS = tuple(f"/usr/lib/{arch}-linux-gnu/libjemalloc.so.2" for arch in ("x86_64", "aarch64")) + \
    ("/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2", "/opt/homebrew/lib/libjemalloc.2.dylib")
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_applied: int | None = None
_configured = False


def jemalloc_library() -> str | None:
    """The jemalloc shared library to preload: ``$DIFFMAS_JEMALLOC``, else the first installed of the usual paths."""
    named = os.environ.get(JEMALLOC_ENV, "").strip()
    candidates = (named,) if named else JEMALLOC_PATHS
    return next((path for path in candidates if path and Path(path).is_file()), None)


@functools.cache  # fixed for the life of the process; step_done asks after every step
def jemalloc_loaded() -> bool:
    """Whether jemalloc is this process's allocator (mapped into it, i.e. preloaded)."""
    try:
        return "jemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def preload_jemalloc() -> None:
    """Under the ``jemalloc`` policy, restart this process (``os.execve``: same pid, same arguments) with jemalloc
    preloaded, when the library is installed and not loaded yet; at most once (the restart is marked in the
    environment). Call it first thing in a command-line entry point: nothing is lost by restarting there."""
    if policy() != "jemalloc" or jemalloc_loaded() or os.environ.get(_REEXEC_MARK):
        return
    library = jemalloc_library()
    if library is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    env = {**os.environ, "LD_PRELOAD": f"{library}:{preload}" if preload else library, _REEXEC_MARK: "1"}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - only glibc has both
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def policy() -> str:
    """The allocator policy asked for: ``$DIFFMAS_MALLOC`` (an unknown name is an error), else the default."""
    name = os.environ.get(POLICY_ENV, "").strip() or DEFAULT_POLICY
    if name not in POLICIES:
        from diffmas.errors import DiffMASError

        raise DiffMASError(f"{POLICY_ENV} must be one of {', '.join(POLICIES)}, got {name!r}")
    return name


def effective_policy() -> str:
    """The policy in force: the one asked for, except ``jemalloc`` without jemalloc loaded, which is
    :data:`FALLBACK`."""
    name = policy()
    return FALLBACK if name == "jemalloc" and not jemalloc_loaded() else name


def configure_allocator(threshold: int | None = None) -> int | None:
    """Apply the policy's mmap threshold: every block of at least ``threshold`` bytes becomes its own mapping and
    goes back to the OS when freed.

    ``threshold`` defaults to ``$DIFFMAS_MMAP_THRESHOLD``, else the policy's (:data:`POLICIES`). Returns the
    threshold in force, or None when glibc keeps its own (the policy, opted out, the user set glibc's own
    variables, or not glibc). Applied once per process.
    """
    global _applied, _configured
    if _configured:
        return _applied
    _configured = True
    if any(os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return None
    if threshold is None:
        raw = os.environ.get(ENV, "").strip()
        try:
            threshold = int(raw) if raw else POLICIES[effective_policy()]
        except ValueError:
            return None
    if threshold <= 0:
        return None
    libc = _libc()
    if libc is None:
        return None
    # The trim threshold too: once set, glibc stops adjusting either one dynamically, and free heap above it at the
    # top is released at once. mallopt returns 1 on success.
    if libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, threshold) != 1:
        return None
    _applied = threshold
    return threshold


def step_done() -> None:
    """Call after every training step: under the ``trim`` policy the heap that the step freed goes back to the OS
    (``malloc_trim``, no garbage collection: tensors are freed by reference counting), so it does not stay
    resident between steps; a no-op under the others."""
    if effective_policy() == "trim":
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def release_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the OS (``malloc_trim(0)``)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_mib() -> float:
    """Resident set size of this process (VmRSS), MiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0

"""Process memory on CPU: keep glibc from holding on to freed tensor memory.

glibc serves blocks below its mmap threshold from the heap, and it raises that threshold (up to 32 MiB) every
time a larger mapped block is freed. Long latent chains allocate a new, slightly larger K/V tensor per layer and
step and free the old one, so after a few steps every tensor lives in the heap, the freed ones fragment it, and
the process stays gigabytes above what it uses (docs/benchmarks.md, P4: 2.6 GiB resident after a checkpointed
forward that holds 117 MiB). :func:`configure_allocator` fixes the threshold (every block of at least
``DIFFMAS_MMAP_THRESHOLD`` bytes, default 64 KiB, is its own mapping and goes back to the OS when freed) and the
trim threshold, with ``mallopt`` at run time: the same effect as starting Python with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=65536``.

The CLI applies it at start (so ``diffmas train``/``eval`` and ``accelerate launch -m diffmas.cli`` get it), and so
does the library's ``train()``; call it yourself in a long-running process of your own. It is skipped where the
user already chose (any ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment: glibc
applied those at start), with ``DIFFMAS_MMAP_THRESHOLD=0`` (keep glibc's defaults), and off glibc (macOS, musl).
CUDA memory is torch's caching allocator's business and is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

DEFAULT_MMAP_THRESHOLD = 64 * 1024
ENV = "DIFFMAS_MMAP_THRESHOLD"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_applied: int | None = None


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - only glibc has both
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def configure_allocator(threshold: int | None = None) -> int | None:
    """Make glibc map every block of at least ``threshold`` bytes on its own and return it to the OS when freed.

    ``threshold`` defaults to ``$DIFFMAS_MMAP_THRESHOLD`` or 64 KiB. Returns the threshold in force, or None when
    nothing was changed (opted out, the user set glibc's own variables, or not glibc). Applied once per process.
    """
    global _applied
    if _applied is not None:
        return _applied
    if any(os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return None
    if threshold is None:
        raw = os.environ.get(ENV, "").strip()
        try:
            threshold = int(raw) if raw else DEFAULT_MMAP_THRESHOLD
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

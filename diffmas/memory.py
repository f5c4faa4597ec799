"""Process memory on CPU: glibc's allocator settings, chosen by measurement (docs/benchmarks.md, P9).

glibc serves blocks below its mmap threshold from the heap, and it raises that threshold (up to 32 MiB) every
time a larger mapped block is freed. Long latent chains allocate a new, slightly larger K/V tensor per layer and
step and free the old one, so after a few steps every tensor lives in the heap, the freed ones fragment it, and
the process can stay gigabytes above what it uses (P4: 2.6 GiB resident after a checkpointed forward that holds
117 MiB). Mapping every block of 64 KiB or more on its own fixes that, but then every step maps, page-faults and
unmaps gigabytes: ~1.4x slower training at two threads (issue 20). The policy (``DIFFMAS_MALLOC``) picks the
trade-off:

- ``trim``: glibc's own thresholds, and the free heap handed back to the OS (``malloc_trim``) after every
  training step (:func:`step_done`), so a step costs what it costs under glibc's defaults and the memory a step
  freed does not stay resident between steps;
- ``glibc``: glibc's defaults, nothing else (``DIFFMAS_MMAP_THRESHOLD=0`` means the same);
- ``mmap64k`` (default) / ``mmap4m``: every block of at least 64 KiB / 4 MiB is its own mapping, returned at free
  (the lowest resident memory at every moment). ``DIFFMAS_MMAP_THRESHOLD=<bytes>`` sets any threshold.

The CLI applies it at start (so ``diffmas train``/``eval`` and ``accelerate launch -m diffmas.cli`` get it), and so
does the library's ``train()``; call it yourself in a long-running process of your own. Thresholds are skipped
where the user already chose (any ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment: glibc
applied those at start) and off glibc (macOS, musl). CUDA memory is torch's caching allocator's business and is
not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

POLICIES = {"trim": 0, "glibc": 0, "mmap64k": 64 * 1024, "mmap4m": 4 << 20}
"""Policy -> mmap threshold it sets (0: glibc's own)."""
DEFAULT_POLICY = "mmap64k"
POLICY_ENV = "DIFFMAS_MALLOC"
ENV = "DIFFMAS_MMAP_THRESHOLD"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_applied: int | None = None
_configured = False


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - only glibc has both
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def policy() -> str:
    """The allocator policy of this process: ``$DIFFMAS_MALLOC`` (an unknown name is an error), else the default."""
    name = os.environ.get(POLICY_ENV, "").strip() or DEFAULT_POLICY
    if name not in POLICIES:
        from diffmas.errors import DiffMASError

        raise DiffMASError(f"{POLICY_ENV} must be one of {', '.join(POLICIES)}, got {name!r}")
    return name


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
            threshold = int(raw) if raw else POLICIES[policy()]
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
    if policy() == "trim":
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

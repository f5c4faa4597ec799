"""The allocator policy: freed tensor memory goes back to the OS, and the command line runs on jemalloc when it is
installed (each check in a fresh process: the allocator is per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The pattern of a latent chain, in small: a large block raises glibc's dynamic mmap threshold, then many
# mid-sized tensors are allocated and all but the newest freed (the newest pins the top of the heap).
CHILD = """
import json, sys, torch
from diffmas.memory import configure_allocator, effective_policy, jemalloc_loaded, rss_mib, step_done
applied = configure_allocator() if sys.argv[1] == "library" else None
if sys.argv[1] == "cli":
    from diffmas import memory
    from diffmas.cli import main
    sys.argv = ["diffmas", "--help"]
    try:
        main()
    except SystemExit:
        pass
    applied = memory._applied
big = torch.ones(8 << 20, dtype=torch.uint8); del big
before = rss_mib()
tensors = [torch.ones(1 << 18) for _ in range(200)]  # 200 x 1 MiB
held = rss_mib() - before
keep = tensors[-1]
del tensors
after_free = rss_mib() - before
if sys.argv[1] != "none":
    step_done()  # the end of a training step
print(json.dumps({"applied": applied, "held": held, "after_free": after_free, "after_step": rss_mib() - before,
                  "jemalloc": jemalloc_loaded(), "policy": effective_policy()}))
"""


def _child(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DIFFMAS_")) and k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", CHILD, mode], env={**environ, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_freed_tensors_leave_the_process_by_the_end_of_a_step():
    from diffmas.memory import FALLBACK

    default = _child("none")
    trim = _child("library", DIFFMAS_MALLOC="trim")
    mapped = _child("library", DIFFMAS_MALLOC="mmap64k")
    fallback = _child("library")  # the default policy without jemalloc preloaded: the fallback
    assert trim["applied"] is None and mapped["applied"] == 64 * 1024
    assert fallback["policy"] == FALLBACK == "trim" and not fallback["jemalloc"]
    assert all(r["held"] > 150 for r in (default, trim, mapped))  # the tensors were resident while alive
    assert default["after_free"] > 150 and default["after_step"] > 150  # glibc's default keeps the freed heap...
    assert trim["after_free"] > 150 and trim["after_step"] < 20  # ...trim returns it at the end of the step...
    assert fallback["after_step"] < 20
    assert mapped["after_free"] < 20  # ...a 64 KiB threshold returns every block at once


def test_the_command_line_runs_on_jemalloc_when_it_is_installed():
    from diffmas.memory import jemalloc_library

    if jemalloc_library() is None:
        pytest.skip("libjemalloc2 is not installed (scripts/setup-system.sh installs it)")
    cli = _child("cli")  # main() restarts the process once with jemalloc preloaded
    assert cli["jemalloc"] and cli["policy"] == "jemalloc" and cli["applied"] is None
    assert not _child("cli", DIFFMAS_MALLOC="trim")["jemalloc"]  # another policy: no restart
    assert not _child("library")["jemalloc"]  # the library alone cannot preload it


def test_the_user_can_opt_out_or_choose():
    assert _child("library", DIFFMAS_MMAP_THRESHOLD="0", DIFFMAS_MALLOC="mmap4m")["applied"] is None
    assert _child("library", MALLOC_MMAP_THRESHOLD_="131072", DIFFMAS_MALLOC="mmap64k")["applied"] is None
    assert _child("library", DIFFMAS_MMAP_THRESHOLD="262144")["applied"] == 262144
    assert _child("library", DIFFMAS_MALLOC="glibc")["after_step"] > 150  # glibc's defaults: nothing trimmed


def test_an_unknown_policy_is_a_one_line_error_of_the_command_line():
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DIFFMAS_")) and k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", "from diffmas.cli import main; main()", "--help"],
                          env={**environ, "DIFFMAS_MALLOC": "bogus"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: DIFFMAS_MALLOC must be one of jemalloc, trim, glibc, mmap64k, mmap4m, got 'bogus'"]

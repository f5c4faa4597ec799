"""The allocator setting: freed tensor memory goes back to the OS (each check in a fresh process: mallopt is global)."""

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
from diffmas.memory import configure_allocator, rss_mib
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
print(json.dumps({"applied": applied, "held": held, "after_free": rss_mib() - before}))
"""


def _child(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DIFFMAS_MMAP_THRESHOLD"}
    done = subprocess.run([sys.executable, "-c", CHILD, mode], env={**environ, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_freed_tensors_leave_the_process_once_configured():
    default = _child("none")
    ours = _child("library")
    cli = _child("cli")
    assert ours["applied"] == cli["applied"] == 64 * 1024
    assert default["held"] > 150 and ours["held"] > 150  # the tensors were resident while alive
    assert default["after_free"] > 150  # glibc's default keeps the freed heap...
    assert ours["after_free"] < 20 and cli["after_free"] < 20  # ...the setting gives it back


def test_the_user_can_opt_out_or_choose():
    assert _child("library", DIFFMAS_MMAP_THRESHOLD="0")["applied"] is None
    assert _child("library", MALLOC_MMAP_THRESHOLD_="131072")["applied"] is None  # glibc applied the user's own
    assert _child("library", DIFFMAS_MMAP_THRESHOLD="262144")["applied"] == 262144

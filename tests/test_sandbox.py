"""Tests for diffmas.sandbox: each attack must be contained, in every isolation mode available here."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from diffmas import sandbox
from diffmas.sandbox import SandboxResult, isolation_level, run_code

Runner = Callable[..., SandboxResult]


@pytest.fixture(params=["bwrap", "no-bwrap"])
def run(request: pytest.FixtureRequest) -> Runner:
    """run_code forced into one mode, so the fallback is tested even where bwrap works."""
    use_bwrap = request.param == "bwrap"
    if use_bwrap and not isolation_level().startswith("bubblewrap"):
        pytest.skip(f"bubblewrap does not work here (isolation: {isolation_level()})")

    def runner(code: str, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 64,
               stdin: str = "") -> SandboxResult:
        return sandbox._run(code, timeout, memory_mb, max_processes, use_bwrap=use_bwrap, stdin=stdin)

    runner.isolation = sandbox._layers(use_bwrap)  # type: ignore[attr-defined]
    return runner


def _require_containment(run: Runner) -> None:
    # Plain "rlimits" (non-root, no bwrap) runs as the caller's uid: by design it
    # cannot keep the code from writing the user's files or signalling them.
    if run.isolation == "rlimits":  # type: ignore[attr-defined]
        pytest.skip("rlimits-only mode does not contain file writes / signals / setsid children")


def _require_bwrap(run: Runner, why: str) -> None:
    if not run.isolation.startswith("bubblewrap"):  # type: ignore[attr-defined]
        pytest.skip(f"without bubblewrap {why}")


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(name))
    return found


def test_passing_code(run: Runner) -> None:
    r = run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')")
    assert (r.status, r.returncode, r.stdout.strip()) == ("passed", 0, "ok")
    assert r.seconds > 0


@pytest.mark.parametrize(
    ("code", "error"),
    [("assert 1 + 1 == 3", "AssertionError"), ("def f(:\n  pass", "SyntaxError"),
     ("raise KeyError('x')", "KeyError"), ("import sys; sys.exit(3)", None)],
)
def test_failing_code(run: Runner, code: str, error: str | None) -> None:
    r = run(code)
    assert r.status == "failed"
    assert r.returncode not in (0, None)
    if error:
        assert error in r.stderr


def test_killed_by_signal_is_error(run: Runner) -> None:
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert r.status == "error"


def test_infinite_loop_times_out(run: Runner) -> None:
    t0 = time.monotonic()
    r = run("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < 3.0


def test_timeout_kills_sleeping_children(run: Runner) -> None:
    marker = f"1000.{uuid.uuid4().int % 10**9}"
    r = run(f"import subprocess, time\nsubprocess.Popen(['sleep', '{marker}'])\ntime.sleep(60)", timeout=1.0)
    assert r.status == "timeout"
    assert _processes_with(marker) == []


@pytest.mark.parametrize("catch", [False, True], ids=["storm", "storm-that-survives-EAGAIN"])
def test_fork_storm_is_contained(run: Runner, catch: bool) -> None:
    body = "    try:\n        os.fork()\n    except OSError:\n        pass" if catch else "    os.fork()"
    # Root ignores RLIMIT_NPROC: if the sandbox ever failed to drop root, refuse to
    # storm (exit 0, so the test fails) rather than fork-bomb the machine.
    code = ("import os\nprint(os.getcwd(), flush=True)\n"
            f"if os.getuid() == {os.getuid()} == 0:\n    raise SystemExit(0)\nwhile True:\n{body}\n")
    t0 = time.monotonic()
    r = run(code, timeout=2.0, max_processes=32)
    assert r.status != "passed"
    if not catch:  # the plain storm dies of the process limit long before the timeout
        assert (r.status, "BlockingIOError" in r.stderr) == ("failed", True), r
    assert time.monotonic() - t0 < 8.0
    workdir = r.stdout.splitlines()[0]
    assert workdir.startswith("/")
    assert _processes_with(workdir) == []  # no forked copy of main.py survives
    assert not os.path.exists(workdir)  # and the work dir was removed


def test_process_limit(run: Runner) -> None:
    # Forks sleeping children until refused; capped at 200 so a missing limit fails the test, not the machine.
    code = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
            "    n += 1\nprint(n)")
    r = run(code, max_processes=16)
    assert r.status == "passed", r.stderr
    assert 3 <= int(r.stdout) < 16


@pytest.mark.parametrize("code", ["bytearray(10**10)", "xs = []\nwhile True:\n    xs.append(bytearray(10**7))"])
def test_memory_limit(run: Runner, code: str) -> None:
    t0 = time.monotonic()
    r = run(code, memory_mb=256)
    assert r.status in ("failed", "error")
    assert time.monotonic() - t0 < 10.0


def test_no_writes_outside_workdir(run: Runner, tmp_path: Path) -> None:
    _require_containment(run)
    tag = uuid.uuid4().hex
    targets = [Path(__file__).resolve().parents[1] / f"should_not_exist_{tag}", tmp_path / "escaped.txt"]
    if run.isolation.startswith("bubblewrap"):  # type: ignore[attr-defined]
        targets.append(Path("/tmp") / f"should_not_exist_{tag}")  # private /tmp under bwrap only
    code = "import os\n" + "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x')\n    print('WROTE', {str(t)!r})\nexcept OSError as e:\n    print('denied', e)\n"
        for t in targets
    ) + "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n"
    try:
        r = run(code)
        assert r.status == "passed", r.stderr
        assert "fine" in r.stdout  # its own dir is writable
        # Under bwrap a write below /tmp lands in the private tmpfs: allowed, but invisible here (this also
        # covers a checkout that itself lives under /tmp, as CI clones may).
        private = run.isolation.startswith("bubblewrap")  # type: ignore[attr-defined]
        assert [t for t in targets[:2] if f"WROTE {t}" in r.stdout
                and not (private and str(t).startswith("/tmp/"))] == []
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_stdin_is_given_once(run: Runner) -> None:
    r = run("import sys\nprint(sys.stdin.read())\nprint(repr(sys.stdin.read()))", stdin="hello")
    assert (r.status, r.stdout.split()) == ("passed", ["hello", "''"]), r.stderr


def test_total_writes_are_capped(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_bwrap(run, "only each file is capped (RLIMIT_FSIZE), not the total")
    cap_mb = 16
    monkeypatch.setattr(sandbox, "_TMPFS_SIZE", cap_mb << 20)
    host_bytes = []  # what the work dir holds on the host disk just before it is removed
    remove = sandbox._remove

    def measure_then_remove(workdir: str) -> None:
        host_bytes.append(sum(f.stat().st_blocks * 512 for f in Path(workdir).rglob("*") if f.is_file()))
        remove(workdir)

    monkeypatch.setattr(sandbox, "_remove", measure_then_remove)
    # Up to 64 files of 1 MiB in every place that could be writable: bounded even where nothing stops it.
    code = ("import errno, os\nchunk = b'x' * (1 << 20)\n"
            "for place in ('.', '/tmp', '/dev/shm', '/dev'):\n    written, error = 0, None\n"
            "    for i in range(64):\n        try:\n"
            "            with open(os.path.join(place, f'fill{i}'), 'wb') as f:\n                f.write(chunk)\n"
            "        except OSError as e:\n            error = errno.errorcode[e.errno]\n            break\n"
            "        written += 1\n    print(place, written, error)\n")
    r = run(code, timeout=30)
    assert r.status == "passed", r.stderr
    filled = {place: (int(n), error) for place, n, error in (line.split() for line in r.stdout.splitlines())}
    assert set(filled) == {".", "/tmp", "/dev/shm", "/dev"}
    for place, (n, error) in filled.items():
        assert n <= cap_mb and error in ("ENOSPC", "EROFS"), (place, n, error)
    assert filled["."][1] == "ENOSPC"  # the work dir is writable, up to the cap
    assert len(host_bytes) == 1 and host_bytes[0] < 1 << 20  # only the script: the files never reached the disk


def test_no_network(run: Runner) -> None:
    _require_bwrap(run, "the code has network access")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        r = run("import socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('CONNECTED')\n"
                "except OSError as e:\n    print('no connection:', e)")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the listening socket
    assert r.status == "passed", r.stderr
    assert "no connection" in r.stdout and "CONNECTED" not in r.stdout, r.stdout


def test_environment_is_scrubbed(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("DIFFMAS_TEST_SECRET", secret)
    r = run("import os\nprint(dict(os.environ))\nprint(os.environ.get('DIFFMAS_TEST_SECRET'))")
    assert r.status == "passed"
    assert secret not in r.stdout
    assert "DIFFMAS_TEST_SECRET" not in r.stdout
    assert "'HOME'" in r.stdout and "'PATH'" in r.stdout


def test_parent_environment_not_readable_via_proc(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_containment(run)
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("DIFFMAS_TEST_SECRET", secret)
    r = run(f"for p in ({os.getpid()}, 'self', {os.getppid()}):\n"
            "    try:\n        print(open(f'/proc/{p}/environ', 'rb').read())\n"
            "    except OSError as e:\n        print('denied', e)")
    assert secret not in r.stdout + r.stderr


@pytest.mark.parametrize("how", ["popen-setsid", "double-fork"])
def test_no_children_left_behind(run: Runner, how: str) -> None:
    _require_containment(run)
    marker = f"1000.{uuid.uuid4().int % 10**9}"
    if how == "popen-setsid":
        code = f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
    else:
        code = ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                f"        os.execvp('sleep', ['sleep', '{marker}'])\n    os._exit(0)\nos.wait()\n")
    code += "import time\ntime.sleep(0.2)\n"  # let the child get going before we exit
    r = run(code)
    assert r.status == "passed", r.stderr
    assert _processes_with(marker) == []


def test_cannot_signal_the_evaluator(run: Runner) -> None:
    _require_containment(run)
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        me, victim_pid = os.getpid(), victim.pid
        # Signal 0 only checks permission. The real SIGKILLs (kill(-1) included) run
        # only once those checks failed, so a broken sandbox fails this test instead
        # of killing pytest and every other process on the machine.
        code = (
            "import os, signal\n"
            "def attempt(name, fn):\n"
            "    try:\n        fn()\n        print(name, 'SENT')\n        return True\n"
            "    except OSError as e:\n        print(name, type(e).__name__)\n        return False\n"
            f"probes = [attempt('evaluator', lambda: os.kill({me}, 0)),\n"
            f"          attempt('evaluator-group', lambda: os.killpg({os.getpgid(me)}, 0)),\n"
            f"          attempt('victim', lambda: os.kill({victim_pid}, 0)),\n"
            f"          attempt('victim-group', lambda: os.killpg({victim_pid}, 0))]\n"
            "if not any(probes):\n"
            f"    attempt('victim-kill', lambda: os.kill({victim_pid}, signal.SIGKILL))\n"
            f"    attempt('victim-group-kill', lambda: os.killpg({victim_pid}, signal.SIGKILL))\n"
            "    attempt('parent-kill', lambda: os.kill(os.getppid(), signal.SIGKILL))\n"
            "    attempt('everyone-kill', lambda: os.kill(-1, signal.SIGKILL))\n"
        )
        r = run(code)
        assert "SENT" not in r.stdout.split("parent-kill")[0], r.stdout
        assert "victim-kill" in r.stdout, r.stdout + r.stderr  # the real attacks did run
        time.sleep(0.1)
        assert victim.poll() is None, "the sandbox killed a process outside it"
    finally:
        victim.kill()
        victim.wait()


def test_output_is_truncated(run: Runner) -> None:
    r = run("print('x' * 1_000_000)\nprint('END')")
    assert r.status == "passed"
    assert len(r.stdout) < 11_000
    assert r.stdout.startswith("xxx") and r.stdout.rstrip().endswith("END") and "truncated" in r.stdout


def test_isolation_reported() -> None:
    level = isolation_level()
    assert isinstance(level, str) and level
    assert isolation_level() is level  # cached
    r = run_code("print(1)", timeout=5)
    assert r.status == "passed"
    assert r.isolation == level


def test_result_is_frozen() -> None:
    r = run_code("pass", timeout=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.status = "passed"  # type: ignore[misc]


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        run_code("pass", timeout=0)

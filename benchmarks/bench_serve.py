"""python benchmarks/bench_serve.py --out docs/benchmarks   (P7: `diffmas serve` under load vs sequential calls)

requests/s and p50/p95 latency of ``diffmas serve`` (its own process, one torch thread) answering ``--requests``
rg:chain_sum questions sent by 1, 4 and 8 concurrent clients (each client sends its next question when its answer
arrives), against the same system answering them one at a time in this process (``System.run`` on one question,
the way a caller without a server uses it). latent_mas, sequential topology, m latent steps per writer, greedy with
EOS, ``max_tokens`` answer tokens at most. Both sides run with the allocator settings of every diffmas command
(:func:`diffmas.memory.configure_allocator`). The settings alternate order per repetition (A B C D, D C B A, ...);
throughput ratios are medians of per-repetition ratios.

Check: every answer the server gives, at every concurrency, is the sequential answer to that question.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import ROOT, chain_sum_prompts, load, machine, parser, setup, table, timed, write_json
from diffmas.decode import DecodeConfig
from diffmas.memory import configure_allocator
from diffmas.systems import build_system


class Server:
    """``diffmas serve`` in a subprocess on a free port, stopped on exit."""

    def __init__(self, args) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "diffmas.cli", "serve", "--systems", "latent_mas", "--model", args.model,
               "--topology", args.topology, "--latent-steps", str(args.latent_steps), "--port", str(self.port),
               "--device", args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch),
               "--batch-window-ms", str(args.batch_window_ms), "--log-level", "warning"]
        path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # this checkout's diffmas
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONPATH=path)
        self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"diffmas serve exited:\n{self.process.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)  # graceful: nothing is in flight by now
        self.process.wait(60)

    def ask(self, question: str, max_tokens: int) -> tuple[float, str]:
        """(seconds, answer) of one chat completion."""
        body = json.dumps({"model": "latent_mas", "messages": [{"role": "user", "content": question}],
                           "max_tokens": max_tokens}).encode()
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())["choices"][0]["message"]["content"]
        return time.perf_counter() - start, answer


def drive(server: Server, questions: list[str], concurrency: int, max_tokens: int
          ) -> tuple[float, list[float], list[str]]:
    """(wall seconds, per-request latencies, answers in question order) with ``concurrency`` clients."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:  # at most `concurrency` requests in flight, each sent when one ends
        done = list(pool.map(lambda q: server.ask(q, max_tokens), questions))
    return time.perf_counter() - start, [d[0] for d in done], [d[1] for d in done]


def sequential(system, questions: list[str], cfg: DecodeConfig) -> tuple[float, list[float], list[str]]:
    latencies, answers = [], []
    start = time.perf_counter()
    for question in questions:
        took, _, records = timed(lambda: system.run([question], cfg, batch_size=1))
        latencies.append(took)
        answers.append(records[0]["answer"])
    return time.perf_counter() - start, latencies, answers


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation between order statistics)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--topology", default="sequential")
    p.add_argument("--latent-steps", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-window-ms", type=float, default=20.0)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.requests, args.latent_steps, args.max_tokens, args.reps = 8, 2, 8, 1
    setup(args.threads)
    # The allocator settings `diffmas serve` (like every diffmas command) runs with, here too: they cost inference
    # 10-25% on this machine, which would otherwise count against the server.
    configure_allocator()
    questions = chain_sum_prompts(args.requests)
    system = build_system("latent_mas", load(args.model, args.device, args.dtype), topology=args.topology,
                          latent_steps=args.latent_steps)
    cfg = DecodeConfig(max_new_tokens=args.max_tokens)
    sequential(system, questions[:1], cfg)  # warm-up: realigner, kernels

    settings = ["sequential", *(f"c{c}" for c in args.concurrency)]
    walls: dict[str, list[float]] = {s: [] for s in settings}
    latencies: dict[str, list[float]] = {s: [] for s in settings}
    answers: dict[str, list[list[str]]] = {s: [] for s in settings}
    with Server(args) as server:
        server.ask(questions[0], 2)  # warm-up: the server's realigner and kernels
        for rep in range(args.reps):
            for name in settings if rep % 2 == 0 else settings[::-1]:
                if name == "sequential":
                    wall, lat, got = sequential(system, questions, cfg)
                else:
                    wall, lat, got = drive(server, questions, int(name[1:]), args.max_tokens)
                walls[name].append(wall)
                latencies[name].extend(lat)
                answers[name].append(got)
                print(f"rep {rep} {name}: {len(questions) / wall:.3f} requests/s", flush=True)

    reference = answers["sequential"][0]
    mismatches = {name: [i for run in runs for i, (a, b) in enumerate(zip(run, reference)) if a != b]
                  for name, runs in answers.items()}
    rows: list[dict[str, Any]] = []
    for name in settings:
        ratios = [w_seq / w for w_seq, w in zip(walls["sequential"], walls[name])]
        rows.append({"setting": name, "concurrency": None if name == "sequential" else int(name[1:]),
                     "seconds": walls[name], "requests_per_s": len(questions) / statistics.median(walls[name]),
                     "p50_s": percentile(latencies[name], 50), "p95_s": percentile(latencies[name], 95),
                     "vs_sequential": statistics.median(ratios), "vs_sequential_range": [min(ratios), max(ratios)]})
    print(f"\nP7 diffmas serve, latent_mas {args.topology} m={args.latent_steps}, {len(questions)} rg:chain_sum "
          f"requests, max_tokens={args.max_tokens}, max batch {args.max_batch}, window {args.batch_window_ms:g} ms "
          f"({args.threads} thread(s))")
    print(table(["setting", "requests/s", "p50 s", "p95 s", "x sequential"],
                [[r["setting"], r["requests_per_s"], r["p50_s"], r["p95_s"], r["vs_sequential"]] for r in rows]))
    identical = not any(mismatches.values())
    print(f"answers identical to the sequential ones: {identical}")
    write_json(args.out, "serve", {
        "machine": machine(args.threads, args.device), "requests": len(questions), "topology": args.topology,
        "latent_steps": args.latent_steps, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "batch_window_ms": args.batch_window_ms, "reps": args.reps, "results": rows,
        "answers_identical": identical, "mismatches": mismatches})
    assert identical, f"served answers differ from the sequential ones: {mismatches}"


if __name__ == "__main__":
    main()

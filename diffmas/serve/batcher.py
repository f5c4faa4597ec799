"""Request batching: concurrent requests with the same key are answered by one call of a batch function, run in
a worker thread so that the event loop keeps accepting, checking and answering requests meanwhile.

The scheduler takes the oldest waiting request; its batch is its key's queue, up to ``max_batch`` requests, and
it waits for more only until that request has waited ``window_s`` (while a batch runs, the next one fills up on
its own). One batch runs at a time: one model answers them all. The queue is bounded (``max_queue`` waiting
requests; :class:`QueueFull` beyond it), a request whose client went away leaves the queue
(:meth:`Batcher.cancel`), and :meth:`Batcher.stop` refuses what waits while the running batch finishes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batcher", "Job", "QueueFull", "ShuttingDown"]


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests."""


class ShuttingDown(Exception):
    """The server is stopping: nothing new is started."""


@dataclass(eq=False)
class Job:
    """One waiting or running request: its batch key, its item, and the future its answer lands in."""

    key: Hashable
    item: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    left_queue: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the job's batch starts or :meth:`Batcher.stop` refuses it (a streamed answer then begins)."""


class Batcher:
    """Groups jobs by key and runs ``run(key, items) -> outcomes`` (one outcome per item, in order: a value, or an
    exception instance to raise to that item's caller) in one worker thread, one batch at a time."""

    def __init__(self, run: Callable[[Hashable, list[Any]], Sequence[Any]], max_batch: int = 8,
                 window_s: float = 0.02, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("need max_batch >= 1, max_queue >= 1 and window_s >= 0")
        self.run, self.max_batch, self.window_s, self.max_queue = run, max_batch, window_s, max_queue
        self._queues: dict[Hashable, deque[Job]] = {}
        self._waiting = 0
        self._running = 0
        self._last_batch_s = 0.0
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        """Requests in the queue (not yet in a running batch)."""
        return self._waiting

    @property
    def running(self) -> int:
        """Requests in the batch that runs now."""
        return self._running

    def start(self) -> None:
        """Start the scheduler on the running event loop."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="diffmas-rollout")
        self._task = asyncio.get_running_loop().create_task(self._schedule())

    def submit(self, entries: Sequence[tuple[Hashable, Any]]) -> list[Job]:
        """Queue (key, item) pairs, all or none; raises :class:`QueueFull` or :class:`ShuttingDown`."""
        if self._stopping or self._task is None:
            raise ShuttingDown("the server is shutting down")
        if self._waiting + len(entries) > self.max_queue:
            raise QueueFull(f"{self._waiting} requests are waiting and the queue holds {self.max_queue}")
        loop = asyncio.get_running_loop()
        jobs = [Job(key, item, loop.create_future()) for key, item in entries]
        for job in jobs:
            self._queues.setdefault(job.key, deque()).append(job)
        self._waiting += len(jobs)
        self._wake.set()
        return jobs

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: the batches ahead of a new request, each as long as the
        last one took (at least 1)."""
        batches = -(-self._waiting // self.max_batch) + (1 if self._running else 0)
        return max(1, round(batches * self._last_batch_s))

    def cancel(self, job: Job) -> None:
        """Drop a job whose caller is gone: out of the queue if it still waits (its slot is free again); a job in
        the running batch finishes and its answer is discarded."""
        queue = self._queues.get(job.key)
        if queue is not None and job in queue:
            queue.remove(job)
            self._waiting -= 1
            if not queue:
                del self._queues[job.key]
            self._wake.set()
        job.future.cancel()

    async def stop(self) -> None:
        """Refuse every waiting job (:class:`ShuttingDown`) and new ones; the running batch finishes."""
        self._stopping = True
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(ShuttingDown("the server shut down before this request started"))
                job.left_queue.set()
        self._queues.clear()
        self._waiting = 0
        self._wake.set()

    async def close(self) -> None:
        """:meth:`stop`, then wait for the running batch and the worker thread."""
        await self.stop()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _oldest(self) -> Job | None:
        heads = [queue[0] for queue in self._queues.values() if queue]
        return min(heads, key=lambda job: job.enqueued) if heads else None

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            first = self._oldest()
            if first is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            queue = self._queues[first.key]
            deadline = first.enqueued + self.window_s
            while len(queue) < self.max_batch and not self._stopping and time.monotonic() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
                if self._queues.get(first.key) is not queue:  # every job of this key was cancelled
                    break
            if self._stopping or self._queues.get(first.key) is not queue:
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
            if not queue:
                del self._queues[first.key]
            self._waiting -= len(batch)
            self._running = len(batch)
            for job in batch:
                job.left_queue.set()
            started = time.monotonic()
            try:
                outcomes = await loop.run_in_executor(self._executor, self.run, first.key, [j.item for j in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"the batch function gave {len(outcomes)} outcomes for {len(batch)} items")
            except Exception as exc:  # a failed batch fails its requests, not the server
                outcomes = [exc] * len(batch)
            finally:
                self._running = 0
                self._last_batch_s = time.monotonic() - started
            for job, outcome in zip(batch, outcomes):
                if job.future.done():  # cancelled: the client went away
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

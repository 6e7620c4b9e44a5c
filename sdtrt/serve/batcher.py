"""The batching scheduler: one worker thread runs one batch at a time on the one model.

Rule: the oldest waiting job decides what runs next (so nothing starves, whatever else arrives).
Rows of jobs with its key join it, oldest first, up to `max_batch` images; the batch starts when it
is full or when the oldest job has waited `max_wait` seconds. Jobs with other keys wait their turn
in the same arrival order. A job with more rows than fit continues in the next batch; a solo job
runs alone. The queue holds at most `max_queue` jobs: past that, `submit` refuses (the caller
answers 503 with Retry-After)."""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from .jobs import Batch, Job


class QueueFull(Exception):
    pass


class Stopped(Exception):
    pass


class Batcher:
    def __init__(self, run: Callable[[Batch], None], *, max_batch: int, max_wait: float, max_queue: int,
                 on_change: Callable[[], None] = lambda: None):
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.on_change = on_change  # queue depth changed (metrics)
        self.queue: collections.deque[Job] = collections.deque()  # arrival order
        self.cond = threading.Condition()
        self.running: Batch | None = None
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.before_first: Callable[[], None] | None = None

    # --- clients ------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise Stopped()
            if len(self.queue) >= self.max_queue:
                raise QueueFull()
            self.queue.append(job)
            self.cond.notify()
        self.on_change()

    def cancel(self, job: Job, reason: str) -> None:
        """Drop a waiting job; stop a running batch between steps once all of its jobs are cancelled."""
        with self.cond:
            if job.cancelled.is_set():
                return
            job.cancel_reason = reason
            job.cancelled.set()
            if job in self.queue:
                self.queue.remove(job)
            for batch in job.batches:
                batch.job_cancelled()
            self.cond.notify()
        self.on_change()

    def depth(self) -> tuple[int, int]:
        """(jobs waiting, images waiting)."""
        with self.cond:
            return len(self.queue), sum(j.remaining for j in self.queue)

    # --- the worker ---------------------------------------------------------------------------------

    def start(self, before_first: Callable[[], None] | None = None) -> None:
        self.before_first = before_first
        self.thread = threading.Thread(target=self._loop, name="sdtrt-batcher", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the worker (new submits are refused from now on)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def abort(self, reason: str = "shutdown") -> None:
        """Cancel everything waiting or running (after a drain deadline)."""
        with self.cond:
            jobs = list(self.queue) + (self.running.jobs if self.running else [])
        for job in jobs:
            self.cancel(job, reason)

    def _loop(self) -> None:
        if self.before_first is not None:
            self.before_first()
        while True:
            batch = self._next()
            if batch is None:
                return
            self.on_change()
            try:
                self.run(batch)
            finally:
                with self.cond:
                    self.running = None
                    for job, _ in batch.parts:
                        job.batches.remove(batch)
                self.on_change()

    def _next(self) -> Batch | None:
        with self.cond:
            while True:
                if not self.queue:
                    if self.stopping:
                        return None
                    self.cond.wait()
                    continue
                oldest = self.queue[0]
                if oldest.key is None:
                    return self._take([oldest], oldest.size)
                same = [j for j in self.queue if j.key == oldest.key]
                waiting = sum(j.remaining for j in same)
                wait = oldest.created + self.max_wait - time.monotonic()
                if waiting >= self.max_batch or wait <= 0 or self.stopping:
                    return self._take(same, self.max_batch)
                self.cond.wait(wait)

    def _take(self, jobs: list[Job], room: int) -> Batch:
        """Rows from `jobs` in order, at most `room` (a solo job: all of its rows)."""
        parts = []
        for job in jobs:
            if room <= 0:
                break
            n = min(room, job.remaining)
            parts.append((job, list(range(job.next_row, job.next_row + n))))
            job.next_row += n
            room -= n
            if job.remaining == 0:
                self.queue.remove(job)
        batch = Batch(parts)
        for job, _ in parts:
            job.batches.append(batch)
            if job.started is None:
                job.started = time.monotonic()
        self.running = batch
        return batch

"""Threads for the ptrace work of new processes, as many as the moment needs.

A held exec or library open must be taken on at once: the thread that seizes
the process is its tracer for the rest of the job (ptrace requests come from
the tracing thread), so a job never moves between threads and a burst of 40
starts needs 40 threads, not a queue behind four (where the watchdog would
release the rest unpatched). Threads are started when a job finds none idle,
up to `limit`; those above `keep` end after `idle` seconds without work. Most
of a worker's time is spent blocked in waitpid or in the engine's stop, so the
count costs little but memory (one stack each).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], None]


class Workers:
    """A pool of threads started on demand (see the module doc)."""

    def __init__(
        self, limit: int, *, keep: int = 2, idle: float = 30.0, name: str = "newproc-worker"
    ) -> None:
        self.limit = limit
        self.keep = min(keep, limit)
        self.idle_seconds = idle
        self.name = name
        self.most = 0  # the most threads alive at once
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._pending = 0
        self._started = 0
        self._stopping = False

    def submit(self, job: Job) -> None:
        """Run `job` in a worker, a new one if none is free (up to `limit`)."""
        with self._lock:
            self._pending += 1
            if self._pending > self._idle and len(self._threads) < self.limit:
                self._spawn()
        self._jobs.put(job)

    def alive(self) -> int:
        with self._lock:
            return len(self._threads)

    def stop(self) -> None:
        """Let every worker finish its job (a worker detaches its tracee on its way
        out), then end."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()

    def _spawn(self) -> None:
        self._started += 1
        name = f"{self.name}-{self._started}"
        thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._threads.add(thread)
        self.most = max(self.most, len(self._threads))
        thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    # not while a job waits that counted on this thread being idle
                    surplus = len(self._threads) > self.keep and self._pending <= self._idle
                    if surplus or self._stopping:
                        self._threads.discard(me)
                        return
                continue
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._pending -= 1
            if job is None:
                with self._lock:
                    self._threads.discard(me)
                return
            try:
                job()
            except Exception:
                log.exception("a new-process job failed")

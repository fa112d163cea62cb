"""Threads for the ptrace work of new processes, as many as the moment needs.

A held exec or library open must be taken on at once: the thread that seizes
the process is its tracer for the rest of the job (ptrace requests come from
the tracing thread), so a job never moves between threads and a burst of 40
starts needs 40 threads, not a queue behind four (where the watchdog would
release the rest unpatched). `keep` threads wait from the start; more are
started when a job finds none idle, up to `limit`, by a thread of their own
(starting a thread waits for it to run: not something the reader, which every
exec on the host waits for, may do). Those above `keep` end after `idle`
seconds without work. A worker spends most of its time blocked in waitpid or
in the engine's stop, so the count costs little but memory (one stack each).

With `priority`, every worker runs at that SCHED_FIFO priority for its whole
life (where permitted): a held event's worker must run within `hold_limit` on
a machine whose CPUs are taken by other work, and so must the worker holding
the interpreter's lock when it wakes (a worker at normal priority, preempted
while it holds the lock, would keep the real-time ones waiting). A worker only
ever sleeps in the kernel (a queue, waitpid, the engine's stop waits), never
spins, which is what makes this safe (process/priority.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from micropatch.process import seized
from micropatch.process.priority import realtime

log = logging.getLogger(__name__)

Job = Callable[[], None]
T = TypeVar("T")


class Workers:
    """A pool of threads started on demand (see the module doc)."""

    def __init__(
        self,
        limit: int,
        *,
        keep: int = 48,
        idle: float = 30.0,
        name: str = "newproc-worker",
        priority: int | None = None,
    ) -> None:
        self.limit = limit
        self.priority = priority
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
        self._more = threading.Event()  # the spawner starts threads while jobs wait
        self._spawner: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            self._stopping = False
            for _ in range(self.keep):
                self._spawn()
        self._spawner = threading.Thread(target=self._spawn_more, name=f"{self.name}s", daemon=True)
        self._spawner.start()

    def submit(self, job: Job) -> None:
        """Run `job` in a worker, a new one if none is free (up to `limit`)."""
        with self._lock:
            self._pending += 1
            more = self._pending > self._idle and len(self._threads) < self.limit
        self._jobs.put(job)
        if more:
            self._more.set()

    def alive(self) -> int:
        with self._lock:
            return len(self._threads)

    def stop(self) -> None:
        """Let every worker finish its job (a worker detaches its tracee on its way
        out), then end."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        self._more.set()
        if self._spawner is not None:
            self._spawner.join()
            self._spawner = None
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()

    def _spawn_more(self) -> None:
        while True:
            self._more.wait()
            self._more.clear()
            with self._lock:
                if self._stopping:
                    return
                while self._pending > self._idle and len(self._threads) < self.limit:
                    self._spawn()
                    self._idle += 1  # counted idle until it takes its first job

    def _spawn(self) -> None:
        self._started += 1
        name = f"{self.name}-{self._started}"
        thread = threading.Thread(target=self._work, args=(self._started,), name=name, daemon=True)
        self._threads.add(thread)
        self.most = max(self.most, len(self._threads))
        thread.start()

    def _work(self, number: int) -> None:
        if self.priority is None:
            self._serve(number)
            return
        with realtime(self.priority):
            self._serve(number)

    def _serve(self, number: int) -> None:
        me = threading.current_thread()
        first = True
        while True:
            with self._lock:
                if not first or number <= self.keep:
                    self._idle += 1
                first = False
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
            if seized.release():
                # A thread of a target never stopped and is still seized by this one:
                # this thread's end lets it go (process/seized.py); another takes its place.
                log.warning("%s: ending, to let go a thread it could not detach", me.name)
                with self._lock:
                    self._threads.discard(me)
                return


def in_own_thread(work: Callable[[], T]) -> T:
    """`work()` in a thread that ends with it: whatever target thread its stops
    could not let go is let go by the kernel at that end (process/seized.py), never
    kept stopped by a long-lived thread of the agent."""
    with ThreadPoolExecutor(1, thread_name_prefix=threading.current_thread().name) as pool:
        return pool.submit(work).result()

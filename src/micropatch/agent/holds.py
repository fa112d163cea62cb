"""Held permission events: answered once, and never held longer than a bound.

An exec or a library open reported by fanotify waits for our answer, and with
it the thread that asked. `Holds` keeps the events not answered yet; a worker
`claim`s one before it seizes the thread, then `answer`s it (microseconds
later). A watchdog thread allows any event no worker claimed within
`hold_limit`, and any a worker kept claimed longer than `claimed_limit`: the
host is never blocked by a busy agent. An event allowed that way is not
forgotten: `on_release` is told, and the agent patches that process live as
soon as it maps the module (agent/late.py), with a `late` event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from micropatch.process import fanotify
from micropatch.process.priority import realtime

log = logging.getLogger(__name__)

READER_PRIORITY = 5  # SCHED_FIFO of the reader and the watchdog, below the engine's stops
CLAIMED_LIMIT = 1.0  # seconds a worker may keep a claimed event before the watchdog allows it


@dataclass(eq=False)
class Held:
    """A permission event waiting for our answer."""

    fd: int
    tid: int
    since: float  # time.monotonic() when read
    inode: tuple[int, int] = (0, 0)  # the file's (dev, ino)
    exec: bool = False  # an exec, not a library open
    answered: bool = False
    claimed: float = 0.0  # monotonic time a worker took it on (0: not yet)
    data: dict[str, object] = field(default_factory=dict)


class Holds:
    """The events held now, their answers and the watchdog (see the module doc)."""

    def __init__(
        self,
        fan: fanotify.Fanotify,
        *,
        hold_limit: float,
        claimed_limit: float = CLAIMED_LIMIT,
        on_hold: Callable[[float], None] | None = None,
        on_release: Callable[[Held], None] | None = None,
    ) -> None:
        """`on_hold`: told how long each event was held (metrics); `on_release`: an
        event the watchdog allowed."""
        self.fan = fan
        self.hold_limit = hold_limit
        self.claimed_limit = claimed_limit
        self.on_hold = on_hold
        self.on_release = on_release
        self.max_hold_ms = 0.0
        self.max_claim_ms = 0.0  # the longest wait of an event for its worker
        self.released = 0
        self._held: dict[int, Held] = {}
        self._lock = threading.Lock()
        self._holding = threading.Event()  # set while an event may be held
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._watch, name="newproc-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watchdog and forget every event (the caller closes the group, and
        the kernel allows them)."""
        self._stopping.set()
        self._holding.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            for held in self._held.values():
                held.answered = True
                with contextlib.suppress(OSError):
                    os.close(held.fd)
            self._held.clear()

    def hold(self, held: Held) -> None:
        with self._lock:
            self._held[held.fd] = held

    def watch(self) -> None:
        """Something is held: the watchdog looks (it sleeps while nothing is)."""
        self._holding.set()

    def answer(self, held: Held) -> bool:
        """Allow the event, once; False if it was answered already."""
        with self._lock:
            if held.answered:
                return False
            held.answered = True
            self._held.pop(held.fd, None)
            hold = (time.monotonic() - held.since) * 1e3
            self.max_hold_ms = max(self.max_hold_ms, hold)
            if self.on_hold is not None:
                self.on_hold(hold / 1e3)
            try:
                self.fan.answer(held.fd)
            except OSError as e:
                log.warning("answering the event of thread %d failed: %s", held.tid, e)
            finally:
                os.close(held.fd)
        return True

    def claim(self, held: Held) -> bool:
        """A worker takes the event on: False if the watchdog allowed it meanwhile."""
        with self._lock:
            if held.answered:
                return False
            held.claimed = time.monotonic()
            self.max_claim_ms = max(self.max_claim_ms, (held.claimed - held.since) * 1e3)
            return True

    def _watch(self) -> None:
        with realtime(READER_PRIORITY):
            self._watch_holds()

    def _watch_holds(self) -> None:
        # Looks every tenth of hold_limit, and allows an event one look early: no event
        # waits longer than hold_limit plus this thread's own wake-up. With nothing
        # held it sleeps until something is: an idle agent does not wake up hundreds
        # of times a second.
        period = max(self.hold_limit / 10, 0.001)
        while not self._stopping.is_set():
            with self._lock:
                idle = not self._held
                if idle:
                    self._holding.clear()
            if idle:
                self._holding.wait()
            else:
                self._stopping.wait(period)
            if self._stopping.is_set():
                return
            now = time.monotonic()
            with self._lock:
                late = [
                    h
                    for h in self._held.values()
                    if (not h.claimed and now - h.since > self.hold_limit - period)
                    or (h.claimed and now - h.claimed > self.claimed_limit)
                ]
            for held in late:
                if self.answer(held):
                    self.released += 1
                    log.warning(
                        "allowed the open of thread %d after %.0f ms unanswered (agent too "
                        "busy): it is patched live once it maps the module",
                        held.tid, (now - held.since) * 1e3,
                    )  # fmt: skip
                    if self.on_release is not None:
                        try:
                            self.on_release(held)
                        except Exception:
                            log.exception("following a released event failed")

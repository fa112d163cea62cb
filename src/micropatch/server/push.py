"""Push: a check-in held until the host's answer changes (docs/server.md, "Push").

An agent that holds the server's answer sends its `policy_digest` back with
`wait`; the server stores the check-in as usual, then, instead of answering at
once, holds the request until a newer catalogue changes this host's answer (its
group's policy, its relevant or revoked patches), or `wait` seconds pass. A
publish, a policy change or a revocation so reaches every online agent within
about POLL seconds, with no more check-ins than before: one per hold, and the
hold is the check-in interval.

A held check-in waits on the event loop: it holds no request thread and no
database connection, only its socket. What wakes it is the policy revision
(`catalogue.REVISION`, one primary-key read), followed every POLL seconds by a
thread of each server process while it holds check-ins: a change made through
any process (`--workers N`) or by `server admin` wakes the check-ins held in
every process, on SQLite and PostgreSQL alike, without LISTEN/NOTIFY.

Before it is held, such a check-in is stored like any; those that arrive while
STORING are being stored wait for their turn on the event loop (`Push.turn`), so a
burst of them is taken at the rate the database writes, not refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from micropatch.errors import MicropatchError
from micropatch.server.catalogue import Catalogue, revision
from micropatch.server.errors import Busy

if TYPE_CHECKING:
    from micropatch.server.context import Server

log = logging.getLogger(__name__)
POLL = 0.5  # seconds between two reads of the policy revision, while check-ins are held
MAX_HELD = 16_384  # check-ins one server process holds at once (an open socket each)
RESERVED_FILES = 1024  # file descriptors kept for everything else (requests, database, files)
# The check-ins a change answers come back at once (the agents report what they did and
# wait again): each answer says to wait `after`, uniform in [0, woken / WAKE_RATE) s,
# so that they come at about this rate (a second, per server process) instead of all
# at once. Three agents: a few ms; 10,000 in one process: up to 40 s.
WAKE_RATE = 250.0
# Check-ins sent with `wait` are stored this many at a time (per process); the others
# queue on the event loop for a turn (`Push.turn`), the other requests keep their threads.
STORING = 4
# Those with nothing to store are read (checkin.look_up) this many at a time, beside.
READING = 8


def held_capacity(wanted: int = MAX_HELD) -> int:
    """How many check-ins this process can hold: its file descriptor limit raised to
    the hard one as far as needed (systemd's unit sets LimitNOFILE=65536), less
    RESERVED_FILES. Said when it is fewer than `wanted`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return wanted
    capacity = max(0, min(wanted, soft - RESERVED_FILES))
    if capacity < wanted:
        log.warning(
            "the file descriptor limit (%d) lets this process hold %d check-ins, not %d: "
            "raise it (ulimit -n, LimitNOFILE=) for more agents to get changes pushed",
            soft, capacity, wanted,
        )  # fmt: skip
    return capacity


class Push:
    """The check-ins one server process holds, and the newest catalogue that wakes them.

    `turn`, `hold` and `publish` run on the event loop; `held` is read by the follower
    thread (a plain int: whether to read the revision at all)."""

    def __init__(self, capacity: int, storing: int = STORING, reading: int = READING) -> None:
        self.capacity = capacity
        self.storing = storing
        self.reading = reading
        self.held = 0
        self.queued = 0  # check-ins with `wait` waiting for their turn to be stored or read
        self._catalogue: Catalogue | None = None
        self._changed = asyncio.Event()
        self._turns = asyncio.Semaphore(storing)
        self._reads = asyncio.Semaphore(reading)
        self.spread = 0.0  # seconds over which the check-ins the last change answered return

    def start(self) -> None:
        """Before serving, on the loop that serves (asyncio's events and semaphores are
        bound to the first loop that waits on them; a server's app may be run by more
        than one)."""
        self.held = self.queued = 0
        self._catalogue = None
        self._changed = asyncio.Event()
        self._turns = asyncio.Semaphore(self.storing)
        self._reads = asyncio.Semaphore(self.reading)

    def full(self) -> bool:
        return self.held + self.queued >= self.capacity

    def offer(self, interval: int) -> int:
        """The longest hold to offer an agent now: the check-in interval, or 0 when
        this process holds as many as it can (that agent checks in every interval)."""
        return 0 if self.full() else interval

    @contextlib.asynccontextmanager
    async def turn(self, seconds: float, *, read: bool = False) -> AsyncIterator[None]:
        """A turn to store (STORING at a time) or, `read`, to read (READING at a time,
        beside) a check-in that will be held, waited for on the event loop: not a
        request at work (server/capacity.py), so a burst of agents — a fleet's first
        check-ins, the check-ins a change answered — is taken at the rate the database
        answers them (SQLite: one writer) instead of refused with 503.
        Busy (503) after `seconds` without one."""
        turns = self._reads if read else self._turns
        self.queued += 1
        try:
            async with asyncio.timeout(seconds):
                await turns.acquire()
        except TimeoutError:
            raise Busy(
                f"the database stayed busy with other check-ins for {seconds:g} s: "
                "check in again shortly"
            ) from None
        finally:
            self.queued -= 1
        try:
            yield
        finally:
            turns.release()

    async def hold(
        self,
        seconds: float,
        revision: int,
        changed: Callable[[Catalogue], bool],
        gone: Awaitable[object] | None = None,
    ) -> Catalogue | None:
        """Wait until a catalogue newer than `revision` for which `changed` is true (that
        catalogue), `seconds` pass, or `gone` (the client went away) completes (None)."""
        if self.held >= self.capacity:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        gone_task = asyncio.ensure_future(gone) if gone is not None else None
        self.held += 1
        try:
            while True:
                catalogue = self._catalogue
                if catalogue is not None and catalogue.revision > revision:
                    if changed(catalogue):
                        return catalogue
                    revision = catalogue.revision
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                woken = asyncio.ensure_future(self._changed.wait())
                waiting = {woken} | ({gone_task} if gone_task else set())
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if woken not in done:
                    woken.cancel()
                if gone_task is not None and gone_task in done:
                    return None
        finally:
            self.held -= 1
            if gone_task is not None:
                gone_task.cancel()

    def publish(self, catalogue: Catalogue) -> None:
        """A newer catalogue: every held check-in looks at it (on the event loop)."""
        if self._catalogue is None or catalogue.revision > self._catalogue.revision:
            self._catalogue = catalogue
            self.spread = self.held / WAKE_RATE
            event, self._changed = self._changed, asyncio.Event()
            event.set()


def follow(
    server: Server, loop: asyncio.AbstractEventLoop, stop: threading.Event, poll: float = POLL
) -> None:
    """Read the policy revision every `poll` seconds while check-ins are held; a new
    one's catalogue is published to them (the body of a thread of its own)."""
    push = server.push
    last: int | None = None
    while not stop.wait(poll):
        if push.held == 0:
            continue
        try:
            with server.database.reading() as session:
                number = revision(session)
                if number == last:
                    continue
                catalogue = server.catalogues.current(session, number)
        except (SQLAlchemyError, MicropatchError) as exc:
            log.warning("cannot read the policy revision: %s", exc)
            continue
        last = number
        try:
            loop.call_soon_threadsafe(push.publish, catalogue)
        except RuntimeError:  # the loop is closed: the server is stopping
            return

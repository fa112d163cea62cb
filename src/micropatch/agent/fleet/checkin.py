"""The fleet part of the agent: enrollment, then a check-in every `checkin_interval`
(docs/agent.md, "Fleet"; docs/server.md, "Agent protocol").

A check-in sends what `report` builds (the inventory when it changed since the
server last stored it, otherwise only its digest; the events since the last
successful check-in, by id: the cursor is in agent.db and moves only when the
server has answered, so an event is never lost and, after a restart, never sent
twice) and applies the answer (`answer.Answer`).

A server that holds check-ins (its answers carry `hold`: docs/server.md, "Push")
gets the next one at once, with `wait` and the digest of the answer in hand: it
answers when that answer changes — a publish, a policy change, a revocation
reaches the agent within seconds — or after the wait (the check-in interval), so
there are no more check-ins than before. An older server (no `hold`) is checked in
with every interval. The held request is cut short by `stop`, and a connection
that stays silent past the wait plus HOLD_MARGIN counts as dead (a network cut);
a server killed closes it at once.

The server unreachable, or refusing a check-in: the agent goes on with what it
has, retries with exponential backoff and jitter, and says what happened in one
"agent" event (a refusal with the server's own message), and in one when it is back.

Layering: nothing of the server but `server.updater` is imported (in `answer`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import threading
import time
import urllib.error
from typing import TYPE_CHECKING, Any

from micropatch.agent.events import Event
from micropatch.agent.fleet import backoff, enrollment, report
from micropatch.agent.fleet.answer import Answer
from micropatch.agent.fleet.enrollment import FLEET_FILE, MAX_FLEET_FILE, Enrollment
from micropatch.agent.fleet.server_api import (
    HTTP_TIMEOUT,
    Cancel,
    HttpError,
    agent_version,
    post_json,
)
from micropatch.agent.store import write_private
from micropatch.errors import AgentError
from micropatch.files import read_bounded

if TYPE_CHECKING:
    from micropatch.agent.service import Agent

log = logging.getLogger(__name__)

ROOT_NAME = "repository-root.json"  # the trusted TUF root, beside the trusted keys
HOLD_MARGIN = 15.0  # seconds past its wait a held check-in may stay silent: then it is dead
NOT_HELD = 1.0  # a check-in sent with wait answered this fast, unchanged, was not held
SERVER_EXTRA = ("tuf",)  # what the TUF client (server/updater.py) needs beyond the agent


class Fleet:
    """Enrollment and the check-in thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.path = agent.paths.state_dir / FLEET_FILE
        self.tuf_dir = agent.paths.state_dir / "tuf"
        self.db = agent.db  # its `fleet` table keeps the event cursor (agent/db.py)
        self.enrollment: Enrollment | None = enrollment.load(self.path)
        self.inventory = report.Inventory()
        self.answer = Answer(agent, self.tuf_dir)
        self._modules: list[dict[str, Any]] = []
        self._scanned: float | None = None  # monotonic time of the last inventory scan
        self._acknowledged: str | None = None  # the inventory digest the server holds
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._lock = threading.Lock()
        self.failures = 0
        self._busy = 0  # busy answers (503 with Retry-After) in a row
        self.last_checkin: float | None = None
        self.last_error: str | None = None
        self._failure_said: str | None = None  # what the event of this streak said
        # Held check-ins: the last answer's digest, the hold the server offered (0: it
        # holds none) and how long to wait before the next check-in (`after`).
        self._policy_digest: str | None = None
        self._hold = 0
        self._next_in: float | None = None  # None: the interval
        self._rehold = False  # check in (held) once the revocations under way are done
        self._cancel = Cancel()
        self.checkins = 0

    # --- life ---------------------------------------------------------------

    def start(self) -> None:
        """The check-in thread, if enrolled (an agent that never enrolls runs none)."""
        self._started = True
        if self.enrollment is not None:
            self._run_thread()

    def _run_thread(self) -> None:
        with self._lock:
            if self._thread is None and self._started and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._loop, name="fleet", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._cancel.cancel()  # a held check-in ends now
        if self._thread is not None:
            self._thread.join(timeout=5)  # a daemon thread: a hung request never holds the stop

    def wake(self) -> None:
        self._wake.set()

    # --- enrollment -----------------------------------------------------------

    def enroll(self, url: str, token: str, root: str | None) -> dict[str, Any]:
        """Trade a one-time token for this host's credential; keep it (0600) with the
        server's and the repository's URLs; check in at once."""
        url = url.rstrip("/")
        missing = [m for m in SERVER_EXTRA if importlib.util.find_spec(m) is None]
        if missing:
            raise AgentError(
                f"enrolling needs the fleet client ({', '.join(missing)} missing): "
                "install micropatch with its server extra, pip install 'micropatch[server]', "
                "and restart the agent"
            )
        root_bytes = root.encode() if root is not None else self._trusted_root()
        try:
            json.loads(root_bytes)
        except ValueError:
            raise AgentError("the repository's root metadata is not JSON") from None
        enrolled = enrollment.request(url, token)
        metadata = self.tuf_dir / "metadata"
        metadata.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(metadata / "root.json", root_bytes)
        self._start_cursor()
        enrolled.save(self.path)
        self.enrollment = enrolled
        self.agent.report(Event(
            "agent", time.time(), pid=os.getpid(),
            message=f"enrolled with {url} as host {enrolled.host_id} (group {enrolled.group})",
            data={"server": url, "host_id": enrolled.host_id, "group": enrolled.group},
        ))  # fmt: skip
        self.wake()
        self._run_thread()
        return {"server": url, "host_id": enrolled.host_id, "group": enrolled.group,
                "repository": enrolled.repository,
                "checkin_interval": self.interval()}  # fmt: skip

    def _trusted_root(self) -> bytes:
        path = self.agent.paths.trust_dir / ROOT_NAME
        try:
            return read_bounded(path, MAX_FLEET_FILE)
        except OSError:
            raise AgentError(
                f"no trusted root for the repository: give --root ROOT.json (the "
                f"1.root.json of `micropatch repo init`), or install it as {path}"
            ) from None

    def interval(self) -> float:
        configured = self.agent.config.checkin_interval
        if configured is not None:
            return float(configured)
        return self.enrollment.checkin_interval if self.enrollment else 60.0

    def status(self) -> dict[str, Any] | None:
        e = self.enrollment
        if e is None:
            return None
        return {
            "server": e.server, "host_id": e.host_id, "group": e.group,
            "repository": e.repository, "checkin_interval": self.interval(),
            "last_checkin": self.last_checkin, "failures": self.failures,
            "last_error": self.last_error, "event_cursor": self.cursor(),
            "hold": self._hold, "checkins": self.checkins,
        }  # fmt: skip

    # --- the loop -------------------------------------------------------------

    def _loop(self) -> None:
        due = 0.0  # monotonic time of the next check-in
        while not self._stopping.is_set():
            if self._wake.is_set():
                self._wake.clear()
                due = 0.0
            if self.enrollment is None:
                self._wake.wait(3600.0)
                continue
            if time.monotonic() >= due:
                try:
                    self.check_in()
                    delay = self.interval() if self._next_in is None else self._next_in
                except Exception as e:
                    if self._stopping.is_set():
                        return  # a held check-in cut short by stop: not a failure
                    delay = self._failed(e)
                due = time.monotonic() + delay
            if self.answer.revoking:
                with contextlib.suppress(Exception):
                    self.answer.drop_revoked()
            if self._rehold and not self.answer.revoking:
                self._rehold = False  # revocations done: hold a check-in again, now
                self._wake.set()
            # Revocations in progress are looked at often, the server every interval.
            wait = due - time.monotonic()
            self._wake.wait(max(0.0, min(wait, 0.2) if self.answer.revoking else wait))

    def _failed(self, error: BaseException) -> float:
        """A failed check-in: said once per streak and kind of failure (unreachable;
        refused, with the server's message; failed on the server's side); the delay
        before the next one (agent/fleet/backoff.py: seconds after a busy answer, the
        interval doubled at each other failure)."""
        assert self.enrollment is not None
        server = self.enrollment.server
        self.failures += 1
        data: dict[str, object] = {"server": server}
        if isinstance(error, HttpError) and error.refused:
            self.last_error = f"HTTP {error.status}: {error.detail}"
            message = (
                f"fleet server {server} refused the check-in (HTTP {error.status}): "
                f"{error.detail}; working on with the patches and policy at hand, retrying"
            )
            if error.status == 401:
                message += "; if this host was retired, enroll it again (agent enroll)"
            data.update(status=error.status, error=error.detail)
        elif isinstance(error, HttpError):
            self.last_error = f"HTTP {error.status}: {error.detail}"
            message = (
                f"fleet server {server} failed the check-in (HTTP {error.status}: "
                f"{error.detail}): working on with the patches and policy at hand, retrying "
                "with backoff"
            )
            data.update(status=error.status, error=error.detail)
        else:
            if not isinstance(error, OSError | urllib.error.URLError):
                log.exception("check-in failed")
            self.last_error = str(getattr(error, "reason", None) or error)
            message = (
                f"fleet server {server} unreachable ({self.last_error}): working on with "
                "the patches and policy at hand, retrying with backoff"
            )
            data.update(error=self.last_error)
        kind = message if isinstance(error, HttpError) else "unreachable"
        if kind != self._failure_said:
            self._failure_said = kind
            self.agent.report(Event("agent", time.time(), pid=os.getpid(), message=message,
                                    data=data))  # fmt: skip
        self._next_in = None
        if (
            isinstance(error, HttpError)
            and error.status in backoff.BUSY
            and error.retry_after is not None
        ):
            # Up, and saying when to come back: seconds, so that a change pushed
            # meanwhile is not missed by minutes (agent/fleet/backoff.py).
            self._busy += 1
            return backoff.busy(error.retry_after, self._busy)
        self._busy = 0
        return backoff.failed(self.interval(), self.failures)

    def check_in(self) -> dict[str, Any]:
        """One check-in: report, then apply the answer."""
        enrolled = self.enrollment
        assert enrolled is not None
        agent = self.agent
        stored, view = [*agent.store.patches(), *agent.store.python_patches()], agent.view()
        events, cursor, bad = report.events(self.db, self.cursor(), stored, view)
        if bad:
            self.answer.say("bad events", f"{bad} events of the history could not be sent "
                            "to the fleet server (see the agent's log)")  # fmt: skip
        modules = self._inventory()
        covered = agent.reconciler.python.covered(agent.reconciler.covered().values())
        processes = report.processes(covered, stored, view)
        digest = report.inventory_digest(modules, processes)
        body: dict[str, Any] = {
            "hostname": report.text(platform.node(), 255), "kernel": os.uname().release[:255],
            "agent_version": agent_version()[:64], "inventory_digest": digest, "events": events,
        }  # fmt: skip
        if digest != self._acknowledged:  # the server does not hold this inventory yet
            body["modules"], body["processes"] = modules, processes
        wait = self._wait()
        if wait:
            body["wait"], body["policy_digest"] = wait, self._policy_digest
        sent = time.monotonic()
        answer = post_json(
            f"{enrolled.server}/api/v1/checkin", body, enrolled.credential,
            timeout=wait + HOLD_MARGIN if wait else HTTP_TIMEOUT, cancel=self._cancel,
        )  # fmt: skip
        self.checkins += 1
        self._held(answer, wait, time.monotonic() - sent)
        self._set_cursor(cursor)  # the server has them: never sent again
        # What the server holds now: when it is not this digest (a server restored
        # from an older backup, say), the next check-in sends the inventory again.
        acknowledged = answer.get("inventory_digest")
        self._acknowledged = acknowledged if isinstance(acknowledged, str) else None
        if self.failures:
            agent.report(Event(
                "agent", time.time(), pid=os.getpid(),
                message=f"fleet server {enrolled.server} took a check-in again after "
                f"{self.failures} failed ones",
            ))  # fmt: skip
        self.failures, self.last_error, self.last_checkin = 0, None, time.time()
        self._busy = 0
        self._failure_said = None
        ignored = answer.get("ignored")
        if isinstance(ignored, list) and ignored:
            self.answer.say("ignored", f"the fleet server ignored {len(ignored)} items of a "
                            f"check-in: {'; '.join(map(str, ignored[:3]))}",
                            data={"ignored": ignored[:20]})  # fmt: skip
        try:
            self._update_enrollment(answer)
            self.answer.apply(answer, self.enrollment.repository if self.enrollment else "")
        except Exception as e:  # the check-in itself succeeded: not "unreachable"
            log.exception("applying the fleet server's answer")
            self.answer.say(f"answer: {type(e).__name__}",
                            f"cannot apply the fleet server's answer: {e}")  # fmt: skip
        if len(events) >= report.EVENT_BATCH:
            self.wake()  # more to send
        return answer

    def _wait(self) -> int:
        """How long the next check-in may be held (0: not at all): the server's hold,
        at most this agent's interval; none while revocations are followed closely
        (the loop looks at them every 0.2 s) or the agent is stopping."""
        if not self._hold or not self._policy_digest or self.answer.revoking:
            return 0
        if self._stopping.is_set() or self.interval() < 1:
            return 0
        return min(self._hold, int(self.interval()))

    def _held(self, answer: dict[str, Any], wait: int, took: float) -> None:
        """What the answer says of the next check-in: after `after` (a change answered
        it, or the first answer), at once (a hold ran to its end), or after the
        interval (the server holds none; this one was not held)."""
        digest = answer.get("policy_digest")
        changed = isinstance(digest, str) and digest != self._policy_digest
        self._policy_digest = digest if isinstance(digest, str) and digest else None
        hold = answer.get("hold")
        self._hold = hold if isinstance(hold, int) and hold > 0 else 0
        after = answer.get("after")
        after = float(after) if isinstance(after, int | float) and after > 0 else 0.0
        if not self._hold or not self._policy_digest:
            self._next_in = None  # an older server, or one holding all it can
        elif changed:
            self._next_in = min(after, self.interval())
        elif wait and took >= NOT_HELD:
            self._next_in = 0.0  # held to its end: hold the next one at once
        else:
            # Not held: answered at once unchanged, or sent without wait (revocations
            # under way: the loop checks in again once they are done).
            self._next_in = None
            self._rehold = not wait

    def _update_enrollment(self, answer: dict[str, Any]) -> None:
        assert self.enrollment is not None
        new = self.enrollment.updated(answer)
        if new != self.enrollment:
            new.save(self.path)
            self.enrollment = new

    def _inventory(self) -> list[dict[str, Any]]:
        every = self.agent.config.inventory_interval
        if self._scanned is None or time.monotonic() - self._scanned >= every:
            # the ELF modules mapped, and the Python modules of the last pass
            self._modules = self.inventory.scan() + self.agent.reconciler.python.modules()
            self._scanned = time.monotonic()
        return self._modules

    # --- the event cursor -------------------------------------------------------

    def cursor(self) -> int:
        rows = self.db.rows("SELECT value FROM fleet WHERE key = 'event_cursor'")
        return int(rows[0]["value"]) if rows else 0

    def _start_cursor(self) -> None:
        """At the first enrollment: the history before it is not the fleet's business."""
        with self.db.write() as c:
            c.execute(
                "INSERT OR IGNORE INTO fleet (key, value) "
                "SELECT 'event_cursor', COALESCE(MAX(id), 0) FROM events"
            )

    def _set_cursor(self, cursor: int) -> None:
        with self.db.write() as c:
            c.execute(
                "INSERT INTO fleet (key, value) VALUES ('event_cursor', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(cursor),),
            )

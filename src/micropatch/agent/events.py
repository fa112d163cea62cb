"""What the agent did and saw, as events: JSON lines on stdout (journald) and a
history in agent.db that `agent events` queries and follows.

Event kinds: applied, removed, updated, failed, blocked, crashed, disabled,
rejected, skipped, agent (the agent's own life: started, stopping, warnings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from micropatch.agent.db import Database

log = logging.getLogger(__name__)

KINDS = (
    "applied", "removed", "updated", "failed", "blocked", "crashed",
    "disabled", "rejected", "skipped", "agent", "watchdog",
)  # fmt: skip


@dataclass(frozen=True)
class Event:
    kind: str
    time: float  # time.time()
    pid: int | None = None
    exe: str | None = None
    patch_id: str | None = None
    version: int | None = None
    module: str | None = None
    message: str = ""
    data: dict[str, object] = field(default_factory=dict)  # {"count": 3}, {"signal": 11} ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Event:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in value.items() if k in names})


EventSink = Callable[[Event], None]  # thread-safe; EventLog.record is one


@dataclass(frozen=True)
class EventFilter:
    """Which events a query or a follower wants; every field given must match."""

    kinds: tuple[str, ...] = ()
    patch_id: str | None = None
    pid: int | None = None
    since: float | None = None

    def matches(self, event: Event) -> bool:
        return (
            (not self.kinds or event.kind in self.kinds)
            and (self.patch_id is None or event.patch_id == self.patch_id)
            and (self.pid is None or event.pid == self.pid)
            and (self.since is None or event.time >= self.since)
        )


class EventLog:
    """Records events: one JSON line each on `stream` (stdout: journald keeps it),
    one row each in the database, and a copy to every follower and sink."""

    def __init__(self, db: Database, stream: IO[str] | None = None) -> None:
        self._db = db
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()
        self._followers: list[tuple[EventFilter, queue.Queue[Event | None]]] = []
        self._sinks: list[EventSink] = []

    def record(self, event: Event) -> None:
        """Thread-safe. A failure to write the history is logged, never raised: an
        event must not stop the operation that reports it.

        The line on `stream` comes last: whoever sees it (a supervisor reading the
        journal, a test) finds the event in the history, in the followers' queues and
        in every sink (the metrics) already."""
        line = json.dumps({"event": event.kind, **event.to_json()}, default=str)
        try:
            with self._db.write() as c:
                c.execute(
                    "INSERT INTO events (kind, time, pid, exe, patch_id, version, module, "
                    "message, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (event.kind, event.time, event.pid, event.exe, event.patch_id,
                     event.version, event.module, event.message,
                     json.dumps(event.data, default=str)),
                )  # fmt: skip
        except Exception:
            log.exception("cannot record event %s in the history", event.kind)
        with self._lock:
            followers = list(self._followers)
            sinks = list(self._sinks)
        for filt, q in followers:
            if filt.matches(event):
                q.put(event)
        for sink in sinks:
            try:
                sink(event)
            except Exception:
                log.exception("event sink %r failed", sink)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stdout closed: the history has it

    __call__ = record

    def add_sink(self, sink: EventSink) -> None:
        """Every event recorded from now on is also given to `sink` (metrics, trackers)."""
        with self._lock:
            self._sinks.append(sink)

    def query(self, filt: EventFilter | None = None, limit: int | None = None) -> list[Event]:
        """The history, oldest first: the last `limit` events that match."""
        filt = filt or EventFilter()
        where: list[str] = []
        params: list[object] = []
        if filt.kinds:
            where.append(f"kind IN ({', '.join('?' for _ in filt.kinds)})")
            params += list(filt.kinds)
        for column, value in (("patch_id", filt.patch_id), ("pid", filt.pid)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if filt.since is not None:
            where.append("time >= ?")
            params.append(filt.since)
        sql = "SELECT * FROM events" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY id DESC" + (" LIMIT ?" if limit is not None else "")
        if limit is not None:
            params.append(limit)
        rows = self._db.rows(sql, tuple(params))
        return [_event(row) for row in reversed(rows)]

    @contextlib.contextmanager
    def follow(self, filt: EventFilter | None = None) -> Iterator[queue.Queue[Event | None]]:
        """A queue that receives every matching event recorded while the block runs;
        `None` in it means the log is closing."""
        q: queue.Queue[Event | None] = queue.Queue()
        entry = (filt or EventFilter(), q)
        with self._lock:
            self._followers.append(entry)
        try:
            yield q
        finally:
            with self._lock:
                self._followers.remove(entry)

    def close(self) -> None:
        """Wake every follower: the agent is stopping."""
        with self._lock:
            for _, q in self._followers:
                q.put(None)


def _event(row: Any) -> Event:
    return Event(
        row["kind"], row["time"], row["pid"], row["exe"], row["patch_id"], row["version"],
        row["module"], row["message"], json.loads(row["data"]),
    )  # fmt: skip

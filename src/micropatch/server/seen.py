"""When hosts were last seen, for the check-ins that store nothing else.

A held check-in (server/push.py) of an agent with nothing new to report — no
inventory, no events, the same name — is answered from a read-only transaction
(`checkin.look_up`): it needs no turn of the database's one writer (SQLite), so a
fleet that holds its check-ins, or comes back all at once after a change, is not
taken at the rate the database writes. Its one write, `last_seen`, is noted here
and written for every such host at once, one transaction every FLUSH seconds
(`keep`, a thread of each server process).

A server killed between two loses at most FLUSH seconds of these times: the
host's next check-in, within its interval, sets it again; the console's online
state is counted in intervals (console/liveness.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, update
from sqlalchemy.exc import SQLAlchemyError

from micropatch.errors import MicropatchError
from micropatch.server import models as m
from micropatch.server.database import Database

log = logging.getLogger(__name__)
FLUSH = 1.0  # seconds between two writes of the times noted

_hosts = cast(Table, m.Host.__table__)
_SEEN = (
    update(_hosts)
    .where(_hosts.c.id == bindparam("host_id"))
    .where(or_(_hosts.c.last_seen.is_(None), _hosts.c.last_seen < bindparam("now")))
    .values(last_seen=bindparam("now"))
)


class Seen:
    """The hosts seen since the last write, and when (the newest time of each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[int, float] = {}

    def saw(self, host_id: int, when: float) -> None:
        with self._lock:
            if when > self._hosts.get(host_id, 0.0):
                self._hosts[host_id] = when

    def pending(self) -> int:
        return len(self._hosts)

    def write(self, database: Database) -> int:
        """Every time noted, in one transaction; kept for the next write if it fails
        (said in the log). How many were written."""
        with self._lock:
            hosts, self._hosts = self._hosts, {}
        if not hosts:
            return 0
        rows: list[dict[str, Any]] = [{"host_id": h, "now": t} for h, t in hosts.items()]
        try:
            with database.session() as session:
                session.connection().execute(_SEEN, rows)
        except (SQLAlchemyError, MicropatchError) as exc:
            log.warning("cannot store when %d hosts were last seen: %s", len(hosts), exc)
            for host_id, when in hosts.items():
                self.saw(host_id, when)
            return 0
        return len(hosts)


def keep(seen: Seen, database: Database, stop: threading.Event, every: float = FLUSH) -> None:
    """Write the times noted every `every` seconds until `stop`, then once more (the
    body of a thread of its own)."""
    while not stop.wait(every):
        seen.write(database)
    seen.write(database)

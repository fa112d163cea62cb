"""agent.db: the agent's SQLite database (policy state and event history).

One connection shared by the agent's threads behind a lock; every change is
one transaction (WAL journal), so a SIGKILL at any instant leaves either the
state before or the state after it, never a torn one.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS patches (
    patch_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('enabled', 'disabled')),
    changed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS exclusions (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('exe', 'unit', 'user')),
    pattern TEXT NOT NULL,
    patch_id TEXT NOT NULL DEFAULT '',  -- '': every patch
    added REAL NOT NULL,
    UNIQUE (kind, pattern, patch_id)
);
CREATE TABLE IF NOT EXISTS auto_disabled (
    patch_id TEXT NOT NULL,
    exe TEXT NOT NULL,
    since REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (patch_id, exe)
);
CREATE TABLE IF NOT EXISTS pins (
    pid INTEGER NOT NULL,
    start INTEGER NOT NULL,
    patch_id TEXT NOT NULL,
    wanted INTEGER NOT NULL,
    PRIMARY KEY (pid, start, patch_id)
);
CREATE TABLE IF NOT EXISTS counters (
    pid INTEGER NOT NULL,
    start INTEGER NOT NULL,
    patch_id TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (pid, start, patch_id)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    pid INTEGER,
    exe TEXT,
    patch_id TEXT,
    version INTEGER,
    module TEXT,
    message TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS fleet (
    key TEXT PRIMARY KEY,  -- event_cursor: the last event id the fleet server has
    value TEXT NOT NULL
);
"""


class Database:
    """The agent's database: `read` and `write` blocks, one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a process kill loses nothing
            self._conn.executescript(SCHEMA)  # idempotent; one transaction of its own
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed at the end of the block, rolled back on an exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

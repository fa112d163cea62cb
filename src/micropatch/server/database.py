"""The database: an engine for a URL, migrated to the newest schema with Alembic.

SQLite in the data directory by default; any SQLAlchemy URL otherwise
(`postgresql://…` is driven by psycopg 3).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from micropatch.errors import ServerError
from micropatch.server.errors import Busy

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
DATABASE_FILE = "server.db"
POOL_SIZE = 16  # connections kept open per server process (the API's threads: app.THREADS)
TURN_TIMEOUT = 10.0  # seconds a writing transaction waits for its turn (SQLite)
READING = "micropatch_reading"  # the execution option of read-only transactions


def database_url(data_dir: str | Path, database: str | None = None) -> str:
    """The URL to use: `database` (postgresql:// means psycopg 3), else SQLite in `data_dir`."""
    if not database:
        return f"sqlite:///{Path(data_dir).resolve() / DATABASE_FILE}"
    for plain in ("postgresql://", "postgres://"):
        if database.startswith(plain):
            return "postgresql+psycopg://" + database.removeprefix(plain)
    return database


def private_data_dir(data_dir: Path) -> None:
    """The data directory made (or kept) 0700: it holds the database and the
    repository's online keys. A directory others could read is tightened, and said."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = data_dir.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(data_dir, 0o700)
            log.warning("%s was readable by others (mode %o): now 0700", data_dir, mode)
    except OSError as exc:
        raise ServerError(f"cannot make the data directory {data_dir}: {exc.strerror}") from None


def _private_file(url: str) -> None:
    """An SQLite database file created (or kept) 0600, before SQLite opens it (its
    -wal and -shm files take its mode)."""
    path = Path(url.removeprefix("sqlite:///"))
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        try:
            path.touch(mode=0o600, exist_ok=True)
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
        except OSError as exc:
            raise ServerError(f"cannot create the database {path}: {exc.strerror}") from None


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, WAL and a busy timeout, so the
    API's worker threads and a CLI command can share the file."""
    options: dict[str, Any] = {}
    if url.startswith("sqlite"):
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # A connection for each request thread, and as many again for a burst (the
        # repository refresher, a CLI command): no request waits out the pool's timeout.
        options.update(pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_SIZE)
    try:
        engine = create_engine(url, **options)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise ServerError(f"database {_safe(url)}: {exc}") from None
    if url.startswith("sqlite"):
        # A writing transaction takes SQLite's write lock when it begins (BEGIN
        # IMMEDIATE), waiting up to the timeout for it: with deferred transactions, two
        # requests that read and then write (two check-ins, two hosts racing for one
        # enrollment token) can fail with "database is locked" instead of taking turns.
        # A reading one (`Database.reading`) begins deferred and may not write
        # (query_only): in WAL mode it reads beside a writer without waiting.

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            connection.isolation_level = None  # the driver's own BEGIN off: ours below
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            if connection.get_execution_options().get(READING):
                connection.exec_driver_sql("PRAGMA query_only=1")
                connection.exec_driver_sql("BEGIN")
            else:
                connection.exec_driver_sql("PRAGMA query_only=0")
                connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (default: the newest) with the migrations in
    server/migrations; a new database is created from nothing."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise ServerError(f"database {_safe(str(engine.url))}: migration failed: {exc}") from None
    log.info("database %s at revision %s", _safe(str(engine.url)), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


class Database:
    """An engine and its transactions: `session()` writes, `reading()` only reads. Each
    is a unit of work, committed at the end, rolled back on an exception, and used
    by one thread from its start to its end: nothing here is held from one thread
    to another (a request served in two threads must open two of them)."""

    def __init__(self, url: str, *, migrate_now: bool = True) -> None:
        self.url = url
        self.safe_url = _safe(url)  # without its password, for messages
        _private_file(url)
        self.engine = make_engine(url)
        if migrate_now:
            migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Same pool; PostgreSQL begins these READ ONLY, SQLite deferred and query_only.
        reader = self.engine.execution_options(**{READING: True, "postgresql_readonly": True})
        self._readers = sessionmaker(reader, expire_on_commit=False)
        # SQLite has one writer at a time, and every writing transaction takes the
        # write lock (BEGIN IMMEDIATE). The threads of this process take turns on this
        # lock: waiting in SQLite's busy handler instead sleeps in steps of up to 100 ms
        # while the lock is free, which under load idles the server with requests
        # queued. (Other processes, `server admin …`, still wait in SQLite.) It is
        # taken and released by the thread that runs the transaction, never held
        # while waiting for another thread, so no number of requests can deadlock it.
        self._turns = threading.Lock() if url.startswith("sqlite") else None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A writing transaction (SQLite: one at a time in this process; Busy after
        TURN_TIMEOUT seconds of waiting for it)."""
        if self._turns is None:
            with self._sessions() as session, session.begin():
                yield session
            return
        if not self._turns.acquire(timeout=TURN_TIMEOUT):
            raise Busy(
                f"the database stayed busy with other requests for {TURN_TIMEOUT:g} s: "
                "try again shortly"
            )
        try:
            with self._sessions() as session, session.begin():
                yield session
        finally:
            self._turns.release()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A transaction that only reads: it neither waits for nor holds the write turn;
        a write in it fails."""
        with self._readers() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _safe(url: str) -> str:
    """A URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"

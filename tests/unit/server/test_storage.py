"""The database: migrations from nothing, and migrations that match the models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

from micropatch.errors import ServerError
from micropatch.server import models as m
from micropatch.server.database import (
    Database,
    current_revision,
    database_url,
    make_engine,
    migrate,
    tables,
)

POSTGRES = os.environ.get("MICROPATCH_TEST_POSTGRES")  # e.g. postgresql://postgres@127.0.0.1/test
HEAD = "0006"
VERSION_MAX = 2**63 - 1  # patch versions are 63-bit


def urls(tmp_path: Path) -> list[str]:
    found = [database_url(tmp_path)]
    if POSTGRES:
        found.append(database_url(tmp_path, POSTGRES))
    return found


def test_database_url() -> None:
    assert database_url("/d") == "sqlite:////d/server.db"
    assert database_url("/d", "postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("/d", "sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_from_empty_matches_the_models(tmp_path: Path, backend: str) -> None:
    if backend == "postgresql":
        if not POSTGRES:
            pytest.skip("no PostgreSQL: set MICROPATCH_TEST_POSTGRES=postgresql://…")
        url = database_url(tmp_path, POSTGRES)
        engine = make_engine(url)
        with engine.begin() as c:  # a clean schema for the test
            m.Base.metadata.drop_all(c)
            c.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    else:
        url = database_url(tmp_path)
        engine = make_engine(url)
    assert tables(engine) == set()
    migrate(engine)
    assert current_revision(engine) == HEAD
    assert tables(engine) >= {t.name for t in m.Base.metadata.sorted_tables}
    with engine.connect() as connection:
        diff = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}), m.Base.metadata
        )
    assert diff == [], f"the models and the migrations disagree: {diff}"
    migrate(engine)  # again: nothing to do
    db = Database(url)
    with db.session() as session:
        root = session.scalar(select(m.Group).where(m.Group.path == "/"))
        assert root is not None and root.default_state == "enabled"
        # A group after the seeded root gets a new id (PostgreSQL's sequence included).
        session.add(m.Group(path="/x", parent_id=root.id))
        # 63-bit versions: bigint on PostgreSQL (integer would refuse 2**31), kept whole.
        session.add(m.Patch(patch_id="big", version=VERSION_MAX, artifact_id="a" * 64,
                            module_name="m", module_sha256="0" * 64, target="t", size=1,
                            published=0.0, published_by="test", revoked=False))  # fmt: skip
    with db.reading() as session:
        assert session.scalar(select(m.Patch.version).where(m.Patch.patch_id == "big")) == (
            VERSION_MAX
        )
    if backend == "postgresql":
        with engine.connect() as c:
            types = dict(c.exec_driver_sql(
                "SELECT table_name, data_type FROM information_schema.columns "
                "WHERE column_name = 'version' AND table_schema = 'public'"
            ).all())  # fmt: skip
        assert types == {"patches": "bigint", "process_patches": "bigint", "events": "bigint"}
    db.dispose()
    engine.dispose()


def test_reading_transactions_cannot_write(tmp_path: Path) -> None:
    """`Database.reading` only reads: a write in it fails (SQLite query_only, PostgreSQL
    READ ONLY), and nothing of it is kept."""
    from sqlalchemy.exc import DBAPIError

    for url in urls(tmp_path):
        db = Database(url)
        with pytest.raises(DBAPIError, match=r"(?i)read.?only|readonly"), db.reading() as session:
            session.add(m.Group(path="/nope", parent_id=1))
            session.flush()
        with db.session() as session:  # the same pooled connection writes again
            session.add(m.Group(path="/yes", parent_id=1))
        with db.reading() as session:
            paths = set(session.scalars(select(m.Group.path)))
        assert "/yes" in paths and "/nope" not in paths
        with db.session() as session:
            session.query(m.Group).filter(m.Group.path == "/yes").delete()
        db.dispose()


def test_upgrade_to_0003_unique_host_names(tmp_path: Path) -> None:
    """Hosts enrolled under one name before names were unique: the later ones are
    renamed NAME~ID, and a third one under that name is refused."""
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(database_url(tmp_path))
    migrate(engine, "0002")
    with engine.begin() as c:
        for credential in ("a", "b"):
            c.exec_driver_sql(
                "INSERT INTO hosts (name, group_id, credential_hash, enrolled) "
                f"VALUES ('web', 1, '{credential}', 0)"
            )
    migrate(engine)
    assert current_revision(engine) == HEAD
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT id, name FROM hosts ORDER BY id").all() == [
            (1, "web"), (2, "web~2")
        ]  # fmt: skip
    with pytest.raises(IntegrityError), engine.begin() as c:
        c.exec_driver_sql("INSERT INTO hosts (name, group_id, credential_hash, enrolled) "
                          "VALUES ('web', 1, 'c', 0)")  # fmt: skip
    engine.dispose()


def test_upgrade_from_0001_keeps_hosts(tmp_path: Path) -> None:
    """A server of the first schema upgraded: its hosts keep working, without a stored
    inventory digest (their agents send the inventory at the next check-in), and the
    policy revision counter starts at 0; the downgrade undoes it."""
    from alembic import command
    from alembic.config import Config

    from micropatch.server.database import MIGRATIONS

    engine = make_engine(database_url(tmp_path))
    migrate(engine, "0001")
    with engine.begin() as c:
        c.exec_driver_sql(
            "INSERT INTO hosts (name, group_id, credential_hash, enrolled) "
            "VALUES ('old', 1, 'x', 0)"
        )
    migrate(engine, "0002")
    assert current_revision(engine) == "0002"
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT name, inventory_digest FROM hosts").all() == [
            ("old", None)
        ]
        assert c.exec_driver_sql("SELECT name, value FROM revisions").all() == [("policy", 0)]
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as c:
        config.attributes["connection"] = c
        command.downgrade(config, "0001")
    assert "revisions" not in tables(engine)
    assert current_revision(engine) == "0001"
    engine.dispose()


def test_unusable_database(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="database"):
        Database("nosuchdialect://x")


def test_the_data_directory_is_private(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The data directory 0700 (an existing one readable by others tightened, and said);
    the SQLite database 0600, created so before SQLite opens it."""
    from micropatch.server.database import private_data_dir

    fresh = tmp_path / "fresh" / "data"
    private_data_dir(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with caplog.at_level("WARNING"):
        private_data_dir(loose)
    assert loose.stat().st_mode & 0o777 == 0o700 and "now 0700" in caplog.text
    db = Database(database_url(loose))
    assert (loose / "server.db").stat().st_mode & 0o777 == 0o600
    db.dispose()
    (loose / "server.db").chmod(0o644)
    Database(database_url(loose)).dispose()
    assert (loose / "server.db").stat().st_mode & 0o777 == 0o600

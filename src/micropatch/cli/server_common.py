"""What the fleet's commands share (`micropatch repo`, `server`, `server admin`,
`publish`): the check that the server's libraries are installed, the data
directory and database options, the database of a data directory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from micropatch.server.database import Database

DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="MICROPATCH_SERVER_DATA",
        help="The server's data directory: database, repository/ (the TUF repository).",
    ),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database",
        envvar="MICROPATCH_SERVER_DATABASE",
        help="SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite in the data dir).",
    ),
]
DEFAULT_DATA_DIR = Path("/var/lib/micropatch-server")


def fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(1)


# What `repo`, `server` and `publish` need beyond micropatch itself (the `server` extra).
SERVER_EXTRA = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "tuf", "argon2", "httpx", "jinja2")


def server_extra() -> None:
    """Refuse clearly, before any work, where the server's libraries are not installed."""
    import importlib.util

    missing = [m for m in SERVER_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(
            f"the fleet server's libraries are not installed ({', '.join(missing)}): "
            "pip install 'micropatch[server]'"
        )


def open_database(data_dir: Path, database: str | None) -> Database:
    """The database of a data directory (created, and migrated, if new)."""
    from micropatch.server.database import Database, database_url, private_data_dir

    private_data_dir(data_dir)
    return Database(database_url(data_dir, database))

"""The fleet: `micropatch server …` (run, install, migrate the API server; its
administration is `cli/server_admin.py`), `micropatch publish`, and the
registration of these and of `micropatch repo …` (`cli/repo.py`).

The server's packages (FastAPI, SQLAlchemy, python-tuf) are imported inside the
commands, so the rest of the CLI does not pay for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from micropatch.cli.repo import repo_app
from micropatch.cli.server_admin import admin_app
from micropatch.cli.server_common import (
    DEFAULT_DATA_DIR,
    DatabaseOption,
    DataDirOption,
    fail,
    open_database,
    server_extra,
)
from micropatch.server.install import ENVIRONMENT_FILE
from micropatch.systemd import UNIT_DIR

server_app = typer.Typer(
    help="The fleet server: API, database, repository.", no_args_is_help=True,
    callback=server_extra,
)  # fmt: skip
server_app.add_typer(admin_app, name="admin")

RepositoryUrlOption = Annotated[
    str | None,
    typer.Option(
        help="The URL agents fetch the TUF repository from (a web server or CDN serving "
        "the directory repository/public of DATA_DIR); default: this server's /repository."
    ),
]
WORKERS_HELP = (
    "Server processes sharing the port (PostgreSQL only: SQLite has one writer, so more "
    "processes would only wait for its lock). About one per CPU."
)


def register(app: typer.Typer) -> None:
    """Add `repo`, `server` and `publish` to the `micropatch` app."""
    app.add_typer(repo_app, name="repo")
    app.add_typer(server_app, name="server")
    app.command()(publish)


def publish(
    artifact: Annotated[Path, typer.Argument(help="A signed artifact (.mpatch).")],
    server: Annotated[
        str, typer.Option("--server", envvar="MICROPATCH_SERVER", help="The server's URL.")
    ],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="MICROPATCH_TOKEN",
            help="An operator's or admin's API token (default: $MICROPATCH_TOKEN).",
        ),
    ] = None,
) -> None:
    """Publish a signed artifact through a fleet server (operator credentials)."""
    server_extra()
    import httpx

    from micropatch.trust.admission import is_source

    if not token:
        raise fail("no API token: pass --token or set MICROPATCH_TOKEN")
    try:
        data = artifact.read_bytes()
    except OSError as e:
        raise fail(f"{artifact}: cannot read: {e.strerror}") from None
    if is_source(data, artifact.name):
        raise fail(
            f"{artifact} is a patch source; publish the signed artifact built from it "
            f"(micropatch build {artifact} --module MODULE_FILE --key KEY.key writes "
            "ID-vVERSION-HASH.mpatch)"
        )
    from micropatch.errors import MicropatchError
    from micropatch.trust.envelope import read_envelope

    try:  # what the server would refuse, said here with the file's own name
        envelope = read_envelope(data, str(artifact))
    except MicropatchError as e:
        raise fail(str(e)) from None
    if not envelope.signatures:
        raise fail(
            f"{artifact}: is not signed, and a fleet server takes only signed artifacts: sign "
            f"it with `micropatch sign {artifact} --key KEY.key` (or build it with --key)"
        )
    try:
        response = httpx.post(
            f"{server.rstrip('/')}/api/v1/patches",
            content=data,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=60,
        )
    except httpx.ConnectError as e:
        raise fail(f"{server}: cannot connect ({e}): is a fleet server listening there?") from None
    except httpx.HTTPError as e:
        raise fail(f"{server}: {e}") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise fail(f"{server}: {response.status_code}: {detail}")
    body = response.json()
    print(f"published {body['patch_id']} v{body['version']} as {body['target']}")


GRACE = 5  # seconds a stopping server gives the requests under way

# --- server ----------------------------------------------------------------------------


def _check_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise fail(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8600")
    return host, int(port)


def _check_workers(workers: int, database: str | None) -> None:
    if workers > 1 and not (database or "").startswith(("postgresql:", "postgres:", "postgresql+")):
        raise fail(
            f"--workers {workers} needs --database postgresql://…: SQLite has one writer, "
            "so more server processes would only wait for its lock (run one)"
        )


@server_app.command("run")
def server_run(
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve the API on.")] = "127.0.0.1:8600",
    database: DatabaseOption = None,
    checkin_interval: Annotated[
        int, typer.Option(help="Seconds between an agent's check-ins.", min=5)
    ] = 60,
    repository_url: RepositoryUrlOption = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help=WORKERS_HELP)] = 1,
) -> None:
    """Serve the fleet API (migrating the database first)."""
    import logging
    import os

    import uvicorn

    from micropatch.errors import MicropatchError
    from micropatch.server.app import create_app
    from micropatch.server.capacity import limit
    from micropatch.server.context import PARENT_VARIABLE, SETTINGS_VARIABLE, Server, Settings
    from micropatch.server.database import private_data_dir

    host, port = _check_listen(listen)
    _check_workers(workers, database)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The migrations' own INFO is setup chatter; server.database says the revision reached.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = Settings(
        data_dir=data_dir,
        database=database,
        checkin_interval=checkin_interval,
        repository_url=repository_url,
    )
    try:
        if data_dir.exists():  # else Server refuses it (no repository) before making it
            private_data_dir(data_dir)
        server = Server(settings)  # the repository checked, the database migrated
    except MicropatchError as e:
        raise fail(str(e)) from None
    # Stopped (SIGTERM, SIGINT), it finishes the requests under way for up to this long,
    # then closes: however many were queued, it does not go on serving them.
    address = host.strip("[]")
    if workers == 1:
        uvicorn.run(create_app(settings, server=server), host=address, port=port,
                    log_level="info", timeout_graceful_shutdown=GRACE,
                    limit_concurrency=limit())  # fmt: skip
        return
    server.database.dispose()  # each worker opens its own
    os.environ[SETTINGS_VARIABLE] = json.dumps(settings.to_json())
    os.environ[PARENT_VARIABLE] = str(os.getpid())
    uvicorn.run("micropatch.server.app:app_from_environment", factory=True, workers=workers,
                host=address, port=port, log_level="info",
                timeout_graceful_shutdown=GRACE, limit_concurrency=limit())  # fmt: skip


@server_app.command("install")
def server_install(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="The server's data directory (see `server run`).")
    ] = DEFAULT_DATA_DIR,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT (`server run`'s).")] = None,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            help="SQLAlchemy URL (`server run`'s); one with a password goes to a root-only "
            "environment file, not into the unit.",
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help=WORKERS_HELP)] = None,
    checkin_interval: Annotated[
        int | None, typer.Option(help="Seconds between an agent's check-ins.", min=5)
    ] = None,
    repository_url: RepositoryUrlOption = None,
    unit_dir: Annotated[Path, typer.Option(help="Where the unit goes (tests, images).")] = Path(
        UNIT_DIR
    ),
    environment_file: Annotated[
        Path, typer.Option(help="Where a database URL with a password goes (0600, root).")
    ] = Path(ENVIRONMENT_FILE),
) -> None:
    """Write the systemd unit micropatch-server.service: `server run` with these options,
    sandboxed. The data directory needs its repository first (`micropatch repo init`)."""
    from micropatch.errors import MicropatchError
    from micropatch.server.install import Options
    from micropatch.server.install import install as do_install

    port = _check_listen(listen)[1] if listen is not None else None
    _check_workers(workers or 1, database)
    options = Options(data_dir, listen, database, workers, checkin_interval, repository_url)
    try:
        done = do_install(options, unit_dir=unit_dir, environment_file=environment_file,
                          grace=GRACE, low_port=port is not None and port < 1024)  # fmt: skip
    except MicropatchError as e:
        raise fail(str(e)) from None
    except ValueError as e:  # a control character in an option
        raise fail(str(e)) from None
    for path in done.written:
        print(f"wrote {path}")
    for note in done.notes:
        print(note)


@server_app.command("uninstall")
def server_uninstall(
    unit_dir: Annotated[Path, typer.Option(help="Where the unit is.")] = Path(UNIT_DIR),
) -> None:
    """Stop and disable the service, remove its unit and environment file; the data
    directory (database, repository) stays."""
    from micropatch.server.install import uninstall as do_uninstall

    done = do_uninstall(unit_dir)
    for path in done.written:
        print(f"removed {path}")
    if not done.written:
        print("nothing to remove")


@server_app.command("migrate")
def server_migrate(
    data_dir: DataDirOption = DEFAULT_DATA_DIR, database: DatabaseOption = None
) -> None:
    """Bring the database to the newest schema (`server run` does it by itself)."""
    from micropatch.errors import MicropatchError
    from micropatch.server.database import current_revision

    try:
        db = open_database(data_dir, database)
    except MicropatchError as e:
        raise fail(str(e)) from None
    print(f"database at revision {current_revision(db.engine)}")

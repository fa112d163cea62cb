"""The fleet: `micropatch repo …` (the TUF repository and its key ceremony),
`micropatch server …` (the API server and its administration) and `micropatch publish`.

The server's packages (FastAPI, SQLAlchemy, python-tuf) are imported inside the
commands, so the rest of the CLI does not pay for them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from micropatch.server.install import ENVIRONMENT_FILE
from micropatch.systemd import UNIT_DIR

repo_app = typer.Typer(
    help="The TUF repository patches are distributed from: key ceremony, targets, timestamp.",
    no_args_is_help=True,
)
server_app = typer.Typer(help="The fleet server: API, database, repository.", no_args_is_help=True)
admin_app = typer.Typer(help="Administer a server's data directory.", no_args_is_help=True)
server_app.add_typer(admin_app, name="admin")

RepoArgument = Annotated[Path, typer.Argument(help="The repository directory.")]
KeysOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--key",
        help="A targets (patch-signing) private key (.key), repeatable; default: the targets "
        "keys in DIR/online, if the repository publishes online.",
    ),
]
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
RepositoryUrlOption = Annotated[
    str | None,
    typer.Option(
        help="The URL agents fetch the TUF repository from (a web server or CDN serving "
        "DATA_DIR/repository/public); default: this server's /repository."
    ),
]
WORKERS_HELP = (
    "Server processes sharing the port (PostgreSQL only: SQLite has one writer, so more "
    "processes would only wait for its lock). About one per CPU."
)


def _fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(1)


# What `repo`, `server` and `publish` need beyond micropatch itself (the `server` extra).
SERVER_EXTRA = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "tuf", "argon2", "httpx", "jinja2")


@repo_app.callback()
@server_app.callback()
def _server_extra() -> None:
    """Refuse clearly, before any work, where the server's libraries are not installed."""
    import importlib.util

    missing = [m for m in SERVER_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise _fail(
            f"the fleet server's libraries are not installed ({', '.join(missing)}): "
            "pip install 'micropatch[server]'"
        )


# --- repo ----------------------------------------------------------------------------


@repo_app.command("init")
def repo_init(
    directory: RepoArgument,
    offline_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the root keys (and a generated targets key) are written; move it off "
            "this machine afterwards. Default: DIR/offline-keys."
        ),
    ] = None,
    root_keys: Annotated[int, typer.Option(help="Number of root keys to generate.")] = 3,
    root_threshold: Annotated[
        int, typer.Option(help="Root signatures needed to change the root metadata.")
    ] = 2,
    targets_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--targets-key",
            help="A patch-signing private key (.key) to make a targets key, repeatable; "
            "default: generate one in the offline directory.",
        ),
    ] = None,
    targets_threshold: Annotated[int, typer.Option(help="Targets signatures needed.")] = 1,
    online_targets: Annotated[
        bool,
        typer.Option(
            "--online-targets",
            help="Also copy the targets keys into DIR/online, so the server publishes through "
            "its API (see docs/server.md for what this trades away).",
        ),
    ] = False,
    trust: Annotated[
        list[Path] | None,
        typer.Option(
            "--trust",
            help="A patch-signing public key (.pub): artifacts published to this repository "
            "must be signed by one of these; repeatable. Default: the targets keys.",
        ),
    ] = None,
    expires: Annotated[
        list[str] | None,
        typer.Option(help="ROLE=DAYS, how long a role's metadata stays valid; repeatable."),
    ] = None,
) -> None:
    """The key ceremony: create a repository, its root keys (offline), targets keys,
    and the online snapshot and timestamp keys."""
    from micropatch.errors import MicropatchError
    from micropatch.server.repository import Repository, load_keys, load_public

    expiry = {}
    for item in expires or []:
        role, _, days = item.partition("=")
        if not days.isdigit():
            raise _fail(f"--expires {item!r}: expected ROLE=DAYS, e.g. timestamp=1")
        expiry[role] = int(days)
    try:
        done = Repository.init(
            directory,
            offline_dir=offline_dir,
            root_keys=root_keys,
            root_threshold=root_threshold,
            targets_keys=load_keys(targets_key or []),
            targets_threshold=targets_threshold,
            online_targets=online_targets,
            trusted=[load_public(p) for p in trust or []],
            expiry=expiry,
        )
    except MicropatchError as e:
        raise _fail(str(e)) from None
    print(f"repository: {done.repository}  (serve {done.repository / 'public'})")
    print(f"trusted root for clients: {done.repository / 'public/metadata/1.root.json'}")
    print(f"root keys ({root_threshold} of {root_keys}): " + ", ".join(map(str, done.root_keys)))
    print("targets keys: " + ", ".join(map(str, done.targets_keys)))
    print("online keys: " + ", ".join(map(str, done.online_keys)))
    print(
        f"Move {done.offline_dir} off this machine now (to offline media): the root keys "
        "must never be online."
    )


@repo_app.command("add-target")
def repo_add_target(
    directory: RepoArgument,
    artifact: Annotated[Path, typer.Argument(help="A signed artifact (.mpatch).")],
    key: KeysOption = None,
) -> None:
    """Publish a signed artifact: checked, then added to the targets metadata."""
    from micropatch.errors import MicropatchError
    from micropatch.server.artifacts import check, describe
    from micropatch.server.repository import Repository, load_keys

    try:
        repo = Repository(directory)
        data = artifact.read_bytes()
        checked = check(data, str(artifact), repo.trusted_keys())
        keys = load_keys(key) if key else None
        repo.add_target(
            checked.file_name, data, custom={"micropatch": describe(checked)}, keys=keys
        )
    except OSError as e:
        raise _fail(f"{artifact}: cannot read: {e.strerror}") from None
    except MicropatchError as e:
        raise _fail(str(e)) from None
    print(f"published {checked.file_name}")


@repo_app.command("remove-target")
def repo_remove_target(
    directory: RepoArgument,
    name: Annotated[str, typer.Argument(help="The target name (see `micropatch repo list`).")],
    key: KeysOption = None,
) -> None:
    """Revoke a target: clients drop it at their next refresh, and agents remove it."""
    from micropatch.errors import MicropatchError
    from micropatch.server.repository import Repository, load_keys

    try:
        Repository(directory).remove_target(name, keys=load_keys(key) if key else None)
    except MicropatchError as e:
        raise _fail(str(e)) from None
    print(f"removed {name}")


@repo_app.command("refresh-timestamp")
def repo_refresh_timestamp(
    directory: RepoArgument,
    force: Annotated[bool, typer.Option(help="Re-sign even if not yet due.")] = False,
) -> None:
    """Re-sign the online roles (timestamp, snapshot; targets if its keys are online)
    whose metadata has less than half of its validity left. Run it from cron or a
    timer at least every half timestamp period; `server run` does it by itself."""
    from micropatch.errors import MicropatchError
    from micropatch.server.repository import Repository

    try:
        done = Repository(directory).refresh(force=force)
    except MicropatchError as e:
        raise _fail(str(e)) from None
    print("re-signed: " + (", ".join(done) if done else "nothing (all fresh)"))


@repo_app.command("sign-root")
def repo_sign_root(
    directory: RepoArgument,
    root_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--root-key",
            help="A root private key (.key) of the current root, repeatable: a threshold of "
            "them must sign.",
        ),
    ] = None,
    expires_in: Annotated[
        int | None,
        typer.Option(help="Days the new root stays valid (default: the root period, 365)."),
    ] = None,
    new_root_keys: Annotated[
        int, typer.Option(help="Generate this many new root keys into --offline-dir.")
    ] = 0,
    root_threshold: Annotated[
        int | None,
        typer.Option(help="Root signatures needed from now on (default: unchanged)."),
    ] = None,
    offline_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where new root keys are written (offline media, not inside the repository)."
        ),
    ] = None,
    remove_root_key: Annotated[
        list[str] | None,
        typer.Option(
            "--remove-root-key",
            help="A root key to drop (lost or exposed): its .pub file or key id; repeatable.",
        ),
    ] = None,
) -> None:
    """Renew or rotate the root: sign root version N+1 (new expiry; optionally new root
    keys and threshold, old ones removed) with a threshold of the current root keys. Run
    it on the offline machine, then copy N+1.root.json and root.json to where the
    repository is served."""
    from micropatch.errors import MicropatchError
    from micropatch.server.repository import Repository, load_keys

    if not root_key:
        raise _fail("give the current root keys to sign with: --root-key ROOT.key (repeatable)")
    try:
        done = Repository(directory).sign_root(
            load_keys(root_key),
            expires_in=expires_in,
            new_root_keys=new_root_keys,
            root_threshold=root_threshold,
            offline_dir=offline_dir,
            remove_root_keys=remove_root_key or [],
        )
    except MicropatchError as e:
        raise _fail(str(e)) from None
    print(f"root version {done.version}: {done.path}")
    print(f"expires {done.expires:%Y-%m-%d %H:%M} UTC")
    print(f"root keys: {done.threshold} of {len(done.root_keyids)} needed")
    if done.new_keys:
        print("new root keys: " + ", ".join(map(str, done.new_keys)))
        print(
            f"Move {done.offline_dir} off this machine now (to offline media): the root keys "
            "must never be online."
        )
    print(
        f"Copy {done.path.name} and root.json (only those) from {done.path.parent} into the "
        "served repository's public/metadata; agents follow from the root they trust."
    )


@repo_app.command("list")
def repo_list(directory: RepoArgument) -> None:
    """The published targets, one JSON object a line; each role's version and expiry
    (and a warning when the root expires soon) on stderr."""
    from micropatch.errors import MicropatchError
    from micropatch.server.repository import Repository

    try:
        repo = Repository(directory)
        roles = repo.roles()
        warning = repo.root_expiry_warning()
        targets = repo.target_files()
    except MicropatchError as e:
        raise _fail(str(e)) from None
    for role, version, expires in roles:
        print(f"{role}: version {version}, expires {expires:%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    for name, target in sorted(targets.items()):
        print(json.dumps({"name": name, "length": target.length, **target.custom}))


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
    _server_extra()
    import httpx

    if not token:
        raise _fail("no API token: pass --token or set MICROPATCH_TOKEN")
    try:
        data = artifact.read_bytes()
    except OSError as e:
        raise _fail(f"{artifact}: cannot read: {e.strerror}") from None
    try:
        response = httpx.post(
            f"{server.rstrip('/')}/api/v1/patches",
            content=data,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=60,
        )
    except httpx.HTTPError as e:
        raise _fail(f"{server}: {e}") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise _fail(f"{server}: {response.status_code}: {detail}")
    body = response.json()
    print(f"published {body['patch_id']} v{body['version']} as {body['target']}")


GRACE = 5  # seconds a stopping server gives the requests under way
# Connections and requests a server process takes at once; beyond, it answers 503 at
# once (an agent retries later) instead of queueing work it cannot do in time.
LIMIT_CONCURRENCY = 256

# --- server ----------------------------------------------------------------------------


def _check_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise _fail(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8600")
    return host, int(port)


def _check_workers(workers: int, database: str | None) -> None:
    if workers > 1 and not (database or "").startswith(("postgresql:", "postgres:", "postgresql+")):
        raise _fail(
            f"--workers {workers} needs --database postgresql://…: SQLite has one writer, "
            "so more server processes would only wait for its lock (run one)"
        )


def _database(data_dir: Path, database: str | None):  # type: ignore[no-untyped-def]
    from micropatch.server.database import Database, database_url

    data_dir.mkdir(parents=True, exist_ok=True)
    return Database(database_url(data_dir, database))


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
    import json
    import logging
    import os

    import uvicorn

    from micropatch.errors import MicropatchError
    from micropatch.server.app import SETTINGS_VARIABLE, Server, Settings, create_app

    host, port = _check_listen(listen)
    _check_workers(workers, database)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = Settings(
        data_dir=data_dir,
        database=database,
        checkin_interval=checkin_interval,
        repository_url=repository_url,
    )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        server = Server(settings)  # the repository checked, the database migrated
    except MicropatchError as e:
        raise _fail(str(e)) from None
    # Stopped (SIGTERM, SIGINT), it finishes the requests under way for up to this long,
    # then closes: however many were queued, it does not go on serving them.
    address = host.strip("[]")
    if workers == 1:
        uvicorn.run(create_app(settings, server=server), host=address, port=port,
                    log_level="info", timeout_graceful_shutdown=GRACE,
                    limit_concurrency=LIMIT_CONCURRENCY)  # fmt: skip
        return
    server.database.dispose()  # each worker opens its own
    os.environ[SETTINGS_VARIABLE] = json.dumps(settings.to_json())
    uvicorn.run("micropatch.server.app:app_from_environment", factory=True, workers=workers,
                host=address, port=port, log_level="info",
                timeout_graceful_shutdown=GRACE, limit_concurrency=LIMIT_CONCURRENCY)  # fmt: skip


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
        raise _fail(str(e)) from None
    except ValueError as e:  # a control character in an option
        raise _fail(str(e)) from None
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
        db = _database(data_dir, database)
    except MicropatchError as e:
        raise _fail(str(e)) from None
    print(f"database at revision {current_revision(db.engine)}")


@admin_app.command("create-user")
def admin_create_user(
    name: Annotated[str, typer.Argument(help="The user name.")],
    role: Annotated[str, typer.Option(help="admin, operator or auditor.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read a login password from stdin.")
    ] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:
    """Create a user; prints an API token for it (shown once)."""
    from micropatch.errors import MicropatchError
    from micropatch.server import fleet
    from micropatch.server.auth import Passwords

    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    if password_stdin and len(password or "") < 8:
        raise _fail("the password must be at least 8 characters")
    try:
        db = _database(data_dir, database)
        with db.session() as session:
            user, token = fleet.create_user(session, Passwords(), name, role, password, "cli")
    except MicropatchError as e:
        raise _fail(str(e)) from None
    print(f"created {user.role} {user.name}; API token (shown once):", file=sys.stderr)
    print(token)


@admin_app.command("enrollment-token")
def admin_enrollment_token(
    group: Annotated[str, typer.Option(help="The group enrolled hosts join.")] = "/",
    expires: Annotated[
        float | None, typer.Option(help="Hours until the token expires (default: never).")
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:
    """A one-time enrollment token for one host: `micropatch agent enroll URL --token TOKEN`."""
    from micropatch.errors import MicropatchError
    from micropatch.server import fleet

    try:
        db = _database(data_dir, database)
        with db.session() as session:
            token, g, _ = fleet.create_enrollment_token(
                session, group, None if expires is None else expires * 3600, "cli"
            )
    except MicropatchError as e:
        raise _fail(str(e)) from None
    print(f"one-time enrollment token for group {g.path} (shown once):", file=sys.stderr)
    print(token)

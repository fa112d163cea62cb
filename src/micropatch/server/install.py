"""`micropatch server install` / `uninstall`: the fleet server's systemd unit and,
when the database URL carries a password, the environment file that holds it.

The unit runs `micropatch server run` with the options install was given, as root
but with no capabilities at all (CAP_NET_BIND_SERVICE only for a port below 1024)
and in a sandbox where it can write nothing but its data directory. Root rather
than a user of its own: `micropatch repo init` and `micropatch server admin …`
are run as root on the same data directory (the SQLite database, the repository's
metadata and online keys), so a service user would need the ownership of every file
they create handed over, every time; uid 0 without CAP_DAC_OVERRIDE reads and writes
only what root owns, which is exactly that directory's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from micropatch.errors import ServerError
from micropatch.files import write_atomic
from micropatch.systemd import (
    UNIT_DIR,
    Installed,
    entry_point,
    join,
    quote,
    running,
    systemctl,
)

UNIT_NAME = "micropatch-server.service"
ENVIRONMENT_FILE = "/etc/micropatch/server.env"
DATABASE_VARIABLE = "MICROPATCH_SERVER_DATABASE"  # `server run --database`'s envvar
PRIVATE_TREES = ("/home", "/root", "/run/user")  # what ProtectHome= hides

UNIT_TEMPLATE = """\
# Written by `micropatch server install`; `micropatch server uninstall` removes it.
[Unit]
Description=micropatch fleet server: signed patches and policies for enrolled agents
Documentation=https://github.com/micropatch/micropatch/blob/main/docs/server.md
Wants=network-online.target
After=network-online.target postgresql.service

[Service]
# uvicorn does not tell systemd it is ready: started means executed.
Type=exec
ExecStart={exec_start}
{environment}Restart=on-failure
RestartSec=2
# Stopped, it finishes the requests under way for up to {grace} s, then closes.
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout}
LimitNOFILE=65536
# Root with no capabilities (see `micropatch.server.install`): it owns its data
# directory and may write nothing else. It never touches a process (no ptrace).
CapabilityBoundingSet={capabilities}
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data_dir}
ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
ProtectProc=invisible
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
UMask=0077

[Install]
WantedBy=multi-user.target
"""


@dataclass
class Options:
    """`server run`'s options as install was given them (None: not given)."""

    data_dir: Path
    listen: str | None = None
    database: str | None = None
    workers: int | None = None
    checkin_interval: int | None = None
    repository_url: str | None = None


def has_password(database: str) -> bool:
    """Whether a SQLAlchemy URL carries a password (user:PASSWORD@ or ?password=)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(database)
    except (ArgumentError, ValueError):
        # Not echoed: it may hold a password.
        raise ServerError(
            "--database: not a database URL (e.g. postgresql://user:password@host/db)"
        ) from None
    return bool(url.password) or "password" in url.query


def exec_start(command: str, options: Options, *, database_on_line: bool) -> list[str]:
    words = [command, "server", "run", "--data-dir", str(options.data_dir)]
    if options.listen is not None:
        words += ["--listen", options.listen]
    if options.database is not None and database_on_line:
        words += ["--database", options.database]
    if options.workers is not None:
        words += ["--workers", str(options.workers)]
    if options.checkin_interval is not None:
        words += ["--checkin-interval", str(options.checkin_interval)]
    if options.repository_url is not None:
        words += ["--repository-url", options.repository_url]
    return words


def unit_text(
    command: str,
    options: Options,
    *,
    environment_file: Path | None,
    grace: int,
    low_port: bool = False,
) -> str:
    words = exec_start(command, options, database_on_line=environment_file is None)
    private = any(
        Path(p).is_relative_to(tree) for p in (command, options.data_dir) for tree in PRIVATE_TREES
    )
    return UNIT_TEMPLATE.format(
        exec_start=join(words),
        environment="" if environment_file is None else
                    f"EnvironmentFile={quote(str(environment_file))}\n",
        grace=grace,
        stop_timeout=grace + 10,
        capabilities="CAP_NET_BIND_SERVICE" if low_port else "",
        data_dir=quote(str(options.data_dir)),
        # The command or the data under /home: readable (and the data dir writable) still.
        protect_home="read-only" if private else "yes",
    )  # fmt: skip


def environment_text(database: str) -> str:
    """The environment file: systemd reads a double-quoted value back with `\\`, `"`,
    `$` and backquote escaped."""
    if "\n" in database or "\r" in database:
        raise ServerError("--database: a URL cannot span lines")
    escaped = "".join("\\" + c if c in '\\"$`' else c for c in database)
    return (
        "# Written by `micropatch server install`: the database URL, password and all,\n"
        "# for `micropatch server run` (root only; not in the world-readable unit).\n"
        f'{DATABASE_VARIABLE}="{escaped}"\n'
    )


def check_repository(data_dir: Path) -> None:
    """Refuse, as `server run` would, a data directory without a repository yet."""
    from micropatch.server.context import REPOSITORY_DIR
    from micropatch.server.repository import Repository

    Repository(data_dir / REPOSITORY_DIR)  # raises RepositoryError, naming `repo init`


def install(
    options: Options,
    *,
    unit_dir: Path = Path(UNIT_DIR),
    environment_file: Path = Path(ENVIRONMENT_FILE),
    grace: int,
    low_port: bool = False,
    command: str | None = None,
) -> Installed:
    """Write the unit (replacing an older one) and, if the database URL has a password,
    the environment file (0600); reload systemd if it runs and the unit is where
    systemd looks. Checks everything before writing anything."""
    options.data_dir = options.data_dir.resolve()
    unit_dir, environment_file = unit_dir.absolute(), environment_file.absolute()
    check_repository(options.data_dir)
    secret = options.database is not None and has_password(options.database)
    env_text = environment_text(options.database) if secret and options.database else None
    text = unit_text(
        command or entry_point(), options,
        environment_file=environment_file if secret else None, grace=grace, low_port=low_port,
    )  # fmt: skip
    done = Installed()
    unit = unit_dir / UNIT_NAME
    stale = environment_file_of(unit)
    if env_text is not None:
        environment_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(environment_file, env_text, mode=0o600)
        done.written.append(environment_file)
    unit_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(unit, text, mode=0o644)
    done.written.append(unit)
    if stale is not None and (env_text is None or stale != environment_file) and stale.exists():
        stale.unlink()  # the password an older install kept there is no longer used
        done.notes.append(f"removed {stale} (no longer used)")
    if unit_dir == Path(UNIT_DIR) and running():
        systemctl("daemon-reload")
        done.notes.append(f"systemd reloaded; start it with `systemctl enable --now {UNIT_NAME}`")
    else:
        service = UNIT_NAME.removesuffix(".service")
        done.notes.append(f"next: systemctl daemon-reload && systemctl enable --now {service}")
    return done


def uninstall(unit_dir: Path = Path(UNIT_DIR)) -> Installed:
    """Stop and disable the service if systemd runs, remove the unit and its environment
    file. The data directory (database, repository, keys) stays."""
    done = Installed()
    unit = unit_dir.absolute() / UNIT_NAME
    managed = unit_dir == Path(UNIT_DIR) and running()
    if managed:
        systemctl("disable", "--now", UNIT_NAME)
    environment = environment_file_of(unit)
    for path in (unit, environment):
        if path is not None and path.exists():
            path.unlink()
            done.written.append(path)
    if managed:
        systemctl("daemon-reload")
    return done


def environment_file_of(unit: Path) -> Path | None:
    """The environment file a unit install wrote names, if any."""
    import shlex

    try:
        lines = unit.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        if line.startswith("EnvironmentFile="):
            [value] = shlex.split(line.removeprefix("EnvironmentFile=").lstrip("-"))
            return Path(value.replace("%%", "%").replace("$$", "$"))
    return None

"""`micropatch server admin …`: administration of a server's data directory (its
database), beside a running server or without one."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from micropatch.cli.server_common import (
    DEFAULT_DATA_DIR,
    DatabaseOption,
    DataDirOption,
    fail,
    open_database,
)

admin_app = typer.Typer(help="Administer a server's data directory.", no_args_is_help=True)


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
    from micropatch.server.auth import Passwords
    from micropatch.server.fleet import users

    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    if password_stdin and len(password or "") < 8:
        raise fail("the password must be at least 8 characters")
    try:
        db = open_database(data_dir, database)
        with db.session() as session:
            user, token = users.create_user(session, Passwords(), name, role, password, "cli")
    except MicropatchError as e:
        raise fail(str(e)) from None
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
    from micropatch.server.fleet import hosts

    try:
        db = open_database(data_dir, database)
        with db.session() as session:
            token, g, _ = hosts.create_enrollment_token(
                session, group, None if expires is None else expires * 3600, "cli"
            )
    except MicropatchError as e:
        raise fail(str(e)) from None
    print(f"one-time enrollment token for group {g.path} (shown once):", file=sys.stderr)
    print(token)

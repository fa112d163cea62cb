"""`micropatch server admin …`: administration of a server's data directory (its
database), beside a running server or without one."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from micropatch.cli.server_common import (
    DEFAULT_DATA_DIR,
    DatabaseOption,
    DataDirOption,
    fail,
    open_database,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

admin_app = typer.Typer(help="Administer a server's data directory.", no_args_is_help=True)
ACTOR = "cli"  # how the audit log names changes made here
T = TypeVar("T")
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read a login password from stdin.")
]
NameArgument = Annotated[str, typer.Argument(help="The user name.")]


def _in_session(data_dir: Path, database: str | None, work: Callable[[Session], T]) -> T:
    """`work` in a writing transaction of the data directory's database; its error, said.

    Its database in the data directory (SQLite) is used only where a repository is
    (`repo init` first, as `server run` requires): a mistyped --data-dir would
    otherwise get a new database of its own, and its users and tokens nowhere."""
    from micropatch.errors import MicropatchError

    if database is None:
        from micropatch.server.install import check_repository

        try:
            check_repository(data_dir)
        except MicropatchError as e:
            raise fail(f"{e} (is {data_dir} the server's --data-dir?)") from None
    try:
        db = open_database(data_dir, database)
        try:
            with db.session() as session:
                return work(session)
        finally:
            db.dispose()
    except MicropatchError as e:
        raise fail(str(e)) from None


def _password() -> str:
    password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        raise fail("the password must be at least 8 characters")
    return password


@admin_app.command("create-user")
def admin_create_user(
    name: NameArgument,
    role: Annotated[str, typer.Option(help="admin, operator or auditor.")],
    password_stdin: PasswordStdin = False,
    token_expires: Annotated[
        float | None,
        typer.Option(help="Days the printed API token is valid (default: until revoked)."),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:
    """Create a user; prints an API token for it (shown once)."""
    from micropatch.server.auth import Passwords
    from micropatch.server.fleet import users

    password = _password() if password_stdin else None
    if token_expires is not None and not 0 < token_expires <= 3650:
        raise fail(f"--token-expires {token_expires:g}: between 0 and 3650 days")
    ttl = None if token_expires is None else token_expires * 86400
    user, token = _in_session(data_dir, database, lambda session: users.create_user(
        session, Passwords(), name, role, password, ACTOR, token_ttl=ttl
    ))  # fmt: skip
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
    from micropatch.server.fleet import hosts

    def create(session: Session) -> tuple[str, int, str]:
        ttl = None if expires is None else expires * 3600
        token, row = hosts.create_enrollment_token(session, group, ttl, ACTOR)
        return token, row.id, row.group.path

    token, token_id, path = _in_session(data_dir, database, create)
    print(f"one-time enrollment token {token_id} for group {path} (shown once):",
          file=sys.stderr)  # fmt: skip
    print(token)


@admin_app.command("create-group")
def admin_create_group(
    path: Annotated[str, typer.Argument(help="The group's path, e.g. /prod/web.")],
    default_state: Annotated[
        str | None,
        typer.Option(help="enabled or disabled: its patches' default (default: inherited)."),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:
    """Create a group of hosts (its parent must exist); enrollment tokens name it."""
    from micropatch.server.fleet import groups

    made = _in_session(data_dir, database, lambda session: groups.create_group(
        session, path, default_state, ACTOR
    ).path)  # fmt: skip
    print(f"created group {made}")


@admin_app.command("list-users")
def admin_list_users(
    data_dir: DataDirOption = DEFAULT_DATA_DIR, database: DatabaseOption = None
) -> None:
    """The users, one JSON object a line: name, role, created, disabled (a time or null)."""
    from micropatch.server.fleet import credentials

    rows = _in_session(data_dir, database, lambda session: [
        {"name": u.name, "role": u.role, "created": u.created, "disabled": u.disabled}
        for u in credentials.users(session)
    ])  # fmt: skip
    for row in rows:
        print(json.dumps(row))


@admin_app.command("disable-user")
def admin_disable_user(
    name: NameArgument, data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:  # fmt: skip
    """Disable a user: its tokens and console sessions are refused at once, its password
    no longer logs in."""
    from micropatch.server.fleet import credentials

    _in_session(data_dir, database,
                lambda session: credentials.set_disabled(session, name, True, ACTOR))  # fmt: skip
    print(f"disabled {name}")


@admin_app.command("enable-user")
def admin_enable_user(
    name: NameArgument, data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:  # fmt: skip
    """Enable a disabled user again (its tokens not expired nor revoked work again)."""
    from micropatch.server.fleet import credentials

    _in_session(data_dir, database,
                lambda session: credentials.set_disabled(session, name, False, ACTOR))  # fmt: skip
    print(f"enabled {name}")


@admin_app.command("delete-user")
def admin_delete_user(
    name: NameArgument, data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:  # fmt: skip
    """Delete a user with its tokens and console sessions (refused at once); the audit
    log keeps what it did."""
    from micropatch.server.fleet import credentials

    _in_session(data_dir, database,
                lambda session: credentials.delete_user(session, name, ACTOR))  # fmt: skip
    print(f"deleted {name}")


@admin_app.command("set-password")
def admin_set_password(
    name: NameArgument,
    password_stdin: PasswordStdin = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:
    """Set a user's login password (read from stdin); its console sessions end."""
    from micropatch.server.auth import Passwords
    from micropatch.server.fleet import credentials

    if not password_stdin:
        raise fail("give the password on stdin: --password-stdin")
    password = _password()
    _in_session(data_dir, database, lambda session: credentials.set_password(
        session, Passwords(), name, password, ACTOR
    ))  # fmt: skip
    print(f"password set for {name}")


@admin_app.command("revoke-token")
def admin_revoke_token(
    token_id: Annotated[int | None, typer.Argument(help="The token's id.")] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Revoke every token of this user.")
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database: DatabaseOption = None,
) -> None:
    """Revoke an API token by its id (GET /api/v1/tokens lists them), or every token
    and console session of a user (--user NAME): refused at once."""
    from micropatch.server.fleet import credentials

    if (token_id is None) == (user is None):
        raise fail("give a token id, or --user NAME (not both)")
    ids = _in_session(data_dir, database, lambda session: credentials.revoke_tokens(
        session, ACTOR, token_id=token_id, name=user
    ))  # fmt: skip
    print(f"revoked {len(ids)} token(s)" + (f": {', '.join(map(str, ids))}" if ids else ""))

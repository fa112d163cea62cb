"""The lifecycle of users' credentials: disabling, enabling and deleting a user,
setting its password, creating, listing and revoking its API tokens (console
sessions are tokens too)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server.auth import Passwords, secret_hash
from micropatch.server.errors import Invalid, NotFound
from micropatch.server.fleet.records import audit
from micropatch.server.fleet.users import issue_token

MIN_PASSWORD = 8


def user(session: Session, name: str) -> m.User:
    found = session.scalar(select(m.User).where(m.User.name == name))
    if found is None:
        raise NotFound(f"no user {name!r}: `micropatch server admin list-users` lists them")
    return found


def users(session: Session) -> Sequence[m.User]:
    return session.scalars(select(m.User).order_by(m.User.name)).all()


def set_disabled(session: Session, name: str, disabled: bool, actor: str) -> m.User:
    """Disable a user (its tokens and console sessions are refused from the next
    request on; its password no longer logs in) or enable it again (its tokens that
    have not expired work again)."""
    row = user(session, name)
    if disabled and actor == f"user:{name}":
        raise Invalid(f"{actor} cannot disable itself: ask another administrator")
    if (row.disabled is not None) != disabled:
        row.disabled = time.time() if disabled else None
        audit(session, actor, "user.disable" if disabled else "user.enable", f"user:{name}")
    return row


def set_password(
    session: Session, passwords: Passwords, name: str, password: str, actor: str
) -> m.User:
    """A new login password for a user; its console sessions and login tokens end
    (its API tokens made otherwise stay)."""
    if len(password) < MIN_PASSWORD:
        raise Invalid(f"the password must be at least {MIN_PASSWORD} characters")
    row = user(session, name)
    row.password_hash = passwords.hash(password)
    sessions = m.ApiToken.label.in_(("login", "console"))
    session.execute(delete(m.ApiToken).where(m.ApiToken.user_id == row.id, sessions))
    audit(session, actor, "user.password", f"user:{name}")
    return row


def tokens(
    session: Session, name: str | None = None, *, unexpired: bool = False
) -> Sequence[m.ApiToken]:
    """Users' API tokens (of one user with `name`; those not expired with `unexpired`),
    the newest first."""
    query = select(m.ApiToken).order_by(m.ApiToken.id.desc())
    if unexpired:
        query = query.where(or_(m.ApiToken.expires.is_(None), m.ApiToken.expires > time.time()))
    if name is not None:
        query = query.where(m.ApiToken.user_id == user(session, name).id)
    return session.scalars(query).all()


def revoke_tokens(
    session: Session, actor: str, *, token_id: int | None = None, name: str | None = None
) -> list[int]:
    """Revoke one API token by id, or every token of a user (its console sessions
    included): refused from the next request on. The ids revoked."""
    if (token_id is None) == (name is None):
        raise Invalid("revoke a token by its id, or every token of a user by its name")
    if token_id is not None:
        row = session.get(m.ApiToken, token_id)
        if row is None:
            raise NotFound(f"no API token {token_id}: `GET /api/v1/tokens` lists them")
        rows = [row]
    else:
        rows = list(tokens(session, name))
    for row in rows:
        session.delete(row)
        audit(session, actor, "token.revoke", f"user:{row.user.name}", token=row.id,
              label=row.label)  # fmt: skip
    return [row.id for row in rows]


def create_token(
    session: Session, name: str, label: str, ttl: float | None, actor: str
) -> tuple[str, m.ApiToken]:
    """A new API token for a user (its secret returned once; valid for `ttl` seconds,
    or until revoked)."""
    row = user(session, name)
    if row.disabled is not None:
        raise Invalid(f"user {name!r} is disabled: enable it first")
    label = " ".join(label.split())[:64] or "api"
    if label in ("login", "console"):
        raise Invalid(f"the label {label!r} is kept for sessions: choose another")
    secret = issue_token(session, row, label, ttl=ttl)
    session.flush()
    token = session.scalar(select(m.ApiToken).where(m.ApiToken.token_hash == secret_hash(secret)))
    assert token is not None
    audit(session, actor, "token.create", f"user:{name}", token=token.id, label=label,
          expires=token.expires)  # fmt: skip
    return secret, token


def delete_user(session: Session, name: str, actor: str) -> None:
    """Delete a user and its tokens and sessions (the audit log keeps what it did)."""
    row = user(session, name)
    if actor == f"user:{name}":
        raise Invalid(f"{actor} cannot delete itself: ask another administrator")
    session.execute(delete(m.ApiToken).where(m.ApiToken.user_id == row.id))
    session.delete(row)
    audit(session, actor, "user.delete", f"user:{name}", role=row.role)

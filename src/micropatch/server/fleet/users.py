"""Users and their credentials: creation, API tokens, logins, and who a bearer
secret belongs to."""

from __future__ import annotations

import math
import time

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server.auth import (
    HOST_PREFIX,
    USER_PREFIX,
    LoginThrottle,
    Passwords,
    Principal,
    new_secret,
    secret_hash,
)
from micropatch.server.errors import Conflict, Invalid, TooManyAttempts, Unauthorized
from micropatch.server.fleet.records import audit


def create_user(
    session: Session,
    passwords: Passwords,
    name: str,
    role: str,
    password: str | None,
    actor: str,
) -> tuple[m.User, str]:
    """A new user and an API token for it (returned once)."""
    if role not in m.ROLES:
        raise Invalid(f"role {role!r}: must be one of {', '.join(m.ROLES)}")
    if session.scalar(select(m.User).where(m.User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    user = m.User(
        name=name,
        role=role,
        password_hash=passwords.hash(password) if password else None,
        created=time.time(),
    )
    session.add(user)
    session.flush()
    token = issue_token(session, user, "created with the user")
    audit(session, actor, "user.create", f"user:{name}", role=role)
    return user, token


def issue_token(session: Session, user: m.User, label: str, ttl: float | None = None) -> str:
    token = new_secret(USER_PREFIX)
    now = time.time()
    session.add(
        m.ApiToken(user_id=user.id, token_hash=secret_hash(token), label=label, created=now,
                   expires=None if ttl is None else now + ttl)
    )  # fmt: skip
    return token


def login(
    session: Session,
    passwords: Passwords,
    name: str,
    password: str,
    *,
    via: str = "api",
    throttle: LoginThrottle | None = None,
) -> tuple[m.User, str]:
    """A 12-hour token for a user name and password: an API token, or (via="console")
    the console's session, which logging out deletes. With a `throttle`, a name with
    too many failed logins lately is refused (TooManyAttempts) unchecked."""
    wait = throttle.wait(name) if throttle else 0.0
    if wait:
        seconds = math.ceil(wait)
        raise TooManyAttempts(
            f"too many failed logins for {name!r}: try again in {seconds} s", seconds
        )
    user = session.scalar(select(m.User).where(m.User.name == name))
    if user is None or not passwords.verify(user.password_hash, password):
        if throttle:
            throttle.failed(name)
        raise Unauthorized("wrong user name or password")
    if throttle:
        throttle.succeeded(name)
    token = issue_token(session, user, "login" if via == "api" else via, ttl=12 * 3600)
    details = {} if via == "api" else {"via": via}
    audit(session, f"user:{name}", "user.login", f"user:{name}", **details)
    return user, token


# Built once: every check-in authenticates.
_HOST_BY_CREDENTIAL = select(m.Host.id, m.Host.name).where(
    m.Host.credential_hash == bindparam("digest")
)


def authenticate(session: Session, secret: str) -> Principal:
    """The user or host a bearer secret belongs to; Unauthorized otherwise."""
    digest = secret_hash(secret)
    if secret.startswith(USER_PREFIX):
        token = session.scalar(select(m.ApiToken).where(m.ApiToken.token_hash == digest))
        if token is not None and (token.expires is None or token.expires > time.time()):
            return Principal("user", token.user.id, token.user.name, token.user.role)
    elif secret.startswith(HOST_PREFIX):
        host = session.connection().execute(_HOST_BY_CREDENTIAL, {"digest": digest}).one_or_none()
        if host is not None:
            return Principal("host", host.id, host.name)
    raise Unauthorized("unknown or expired credentials")

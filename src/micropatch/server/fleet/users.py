"""Users and their credentials: creation, API tokens, logins, and who a bearer
secret belongs to."""

from __future__ import annotations

import math
import re
import time

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server.auth import (
    HOST_PREFIX,
    USER_PREFIX,
    Passwords,
    Principal,
    new_secret,
    secret_hash,
)
from micropatch.server.database import Database
from micropatch.server.errors import Conflict, Invalid, TooManyAttempts, Unauthorized
from micropatch.server.fleet.records import audit
from micropatch.server.throttle import LoginThrottle

USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the API's and the CLI's


def create_user(
    session: Session,
    passwords: Passwords,
    name: str,
    role: str,
    password: str | None,
    actor: str,
    *,
    token_ttl: float | None = None,
) -> tuple[m.User, str]:
    """A new user and an API token for it (returned once; valid for `token_ttl`
    seconds, or until revoked)."""
    if not USER_NAME.fullmatch(name):
        raise Invalid(
            f"user name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', not starting "
            "with a '.', '_' or '-'"
        )
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
    token = issue_token(session, user, "created with the user", ttl=token_ttl)
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
    database: Database,
    passwords: Passwords,
    throttle: LoginThrottle,
    name: str,
    password: str,
    address: str,
    *,
    via: str = "api",
) -> tuple[m.User, str]:
    """A 12-hour token for a user name and password: an API token, or (via="console")
    the console's session, which logging out deletes. A name or an address with too
    many failed logins lately is refused unchecked (TooManyAttempts); an unknown name
    takes as long as a wrong password (argon2 verifies a dummy hash). Failures are
    stored (`server.throttle`) and audited: the first of a name in the throttle's window,
    and the one that reaches its limit, so a flood of guesses writes two entries."""
    now = time.time()
    with database.reading() as session:
        wait = throttle.wait(session, name, address, now)
        user = None if wait else session.scalar(select(m.User).where(m.User.name == name))
    if wait:
        seconds = math.ceil(wait)
        raise TooManyAttempts(
            f"too many failed logins for {name!r} or from {address}: try again in {seconds} s",
            seconds,
        )
    if passwords.verify(user.password_hash if user else None, password) and user:
        with database.session() as session:
            throttle.succeeded(session, name)
            if user.disabled is not None:
                raise Unauthorized(f"user {name!r} is disabled: ask an administrator")
            token = issue_token(session, user, "login" if via == "api" else via, ttl=12 * 3600)
            details = {} if via == "api" else {"via": via}
            audit(session, f"user:{name}", "user.login", f"user:{name}", **details)
        return user, token
    with database.session() as session:
        failures = throttle.failed(session, name, address, now)
        if failures in (1, throttle.name_limit):
            audit(session, f"address:{address}", "user.login-failed", f"user:{name}",
                  failures=failures, throttled=failures >= throttle.name_limit,
                  address=address, via=via)  # fmt: skip
    raise Unauthorized("wrong user name or password")


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
            if token.user.disabled is not None:
                raise Unauthorized(f"user {token.user.name!r} is disabled")
            return Principal("user", token.user.id, token.user.name, token.user.role)
    elif secret.startswith(HOST_PREFIX):
        host = session.connection().execute(_HOST_BY_CREDENTIAL, {"digest": digest}).one_or_none()
        if host is not None:
            return Principal("host", host.id, host.name)
    raise Unauthorized("unknown or expired credentials")

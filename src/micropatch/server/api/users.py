"""/api/v1/auth/token, /api/v1/users and /api/v1/tokens: logins, user accounts and
their credentials."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam

from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Administrator, ServerDep
from micropatch.server.context import client_address
from micropatch.server.fleet import credentials, users

router = APIRouter(prefix=PREFIX, tags=["users"])
UserName = Annotated[str, PathParam(min_length=1, max_length=64)]
TokenId = Annotated[int, PathParam(ge=1, le=s.INT_MAX)]


def user_out(user: m.User) -> s.UserOut:
    return s.UserOut(
        id=user.id, name=user.name, role=user.role, created=user.created, disabled=user.disabled
    )


@router.post("/auth/token", response_model=s.TokenOut)
def token(body: s.TokenRequest, request: Request, server: ServerDep) -> s.TokenOut:
    """A 12-hour API token for a user name and password (failures throttled per name
    and per address: 429)."""
    user, secret = users.login(server.database, server.passwords, server.logins, body.name,
                               body.password, client_address(request))  # fmt: skip
    return s.TokenOut(token=secret, name=user.name, role=user.role)


@router.get("/users", response_model=list[s.UserOut])
def list_users(_who: Administrator, server: ServerDep) -> list[s.UserOut]:
    with server.database.reading() as session:
        return [user_out(u) for u in credentials.users(session)]


@router.post("/users", response_model=s.UserCreated, status_code=201)
def create_user(body: s.UserIn, who: Administrator, server: ServerDep) -> s.UserCreated:
    with server.database.session() as session:
        user, secret = users.create_user(session, server.passwords, body.name, body.role,
                                         body.password, who.actor,
                                         token_ttl=body.token_expires_in)  # fmt: skip
        return s.UserCreated(**user_out(user).model_dump(), token=secret)


@router.post("/users/{name}/disable", response_model=s.UserOut)
def disable_user(name: UserName, who: Administrator, server: ServerDep) -> s.UserOut:
    """Its tokens and console sessions are refused from the next request on, and its
    password no longer logs in."""
    with server.database.session() as session:
        return user_out(credentials.set_disabled(session, name, True, who.actor))


@router.post("/users/{name}/enable", response_model=s.UserOut)
def enable_user(name: UserName, who: Administrator, server: ServerDep) -> s.UserOut:
    with server.database.session() as session:
        return user_out(credentials.set_disabled(session, name, False, who.actor))


@router.delete("/users/{name}", status_code=204)
def delete_user(name: UserName, who: Administrator, server: ServerDep) -> None:
    """Delete a user with its tokens and console sessions (refused at once); the audit
    log keeps what it did. An administrator cannot delete itself."""
    with server.database.session() as session:
        credentials.delete_user(session, name, who.actor)


@router.put("/users/{name}/password", response_model=s.UserOut)
def set_password(
    name: UserName, body: s.PasswordIn, who: Administrator, server: ServerDep
) -> s.UserOut:
    """A new login password; the user's console sessions and login tokens end."""
    with server.database.session() as session:
        return user_out(
            credentials.set_password(session, server.passwords, name, body.password, who.actor)
        )


@router.get("/tokens", response_model=list[s.TokenInfo])
def list_tokens(
    _who: Administrator, server: ServerDep, user: str | None = None
) -> list[s.TokenInfo]:
    """Users' API tokens and console sessions (without their secrets), the newest first."""
    with server.database.reading() as session:
        return [
            s.TokenInfo(id=t.id, user=t.user.name, label=t.label, created=t.created,
                        expires=t.expires)
            for t in credentials.tokens(session, user)
        ]  # fmt: skip


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(token_id: TokenId, who: Administrator, server: ServerDep) -> None:
    with server.database.session() as session:
        credentials.revoke_tokens(session, who.actor, token_id=token_id)


@router.delete("/users/{name}/tokens", response_model=list[int])
def revoke_user_tokens(name: UserName, who: Administrator, server: ServerDep) -> list[int]:
    """Revoke every API token and console session of a user; the ids revoked."""
    with server.database.session() as session:
        return credentials.revoke_tokens(session, who.actor, name=name)

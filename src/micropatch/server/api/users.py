"""/api/v1/auth/token and /api/v1/users: logins and user accounts."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select

from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Administrator, ServerDep
from micropatch.server.context import client_address
from micropatch.server.fleet import users

router = APIRouter(prefix=PREFIX, tags=["users"])


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
        return [
            s.UserOut(id=u.id, name=u.name, role=u.role, created=u.created)
            for u in session.scalars(select(m.User).order_by(m.User.name))
        ]


@router.post("/users", response_model=s.UserCreated, status_code=201)
def create_user(body: s.UserIn, who: Administrator, server: ServerDep) -> s.UserCreated:
    with server.database.session() as session:
        user, secret = users.create_user(
            session, server.passwords, body.name, body.role, body.password, who.actor
        )
        return s.UserCreated(
            id=user.id, name=user.name, role=user.role, created=user.created, token=secret
        )

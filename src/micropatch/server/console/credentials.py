"""/console/tokens (admin): users' API tokens and console sessions not expired yet,
without their secrets (expired ones are only counted: they no longer work); creating
one with a lifetime (its secret shown once), revoking one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from micropatch.errors import ServerError
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.auth import ADMIN
from micropatch.server.console.pages import (
    PREFIX,
    FormDep,
    ServerDep,
    Viewer,
    ViewerDep,
    admin_only,
    back,
    changer,
    days_of,
    failed,
    render,
)
from micropatch.server.context import Server
from micropatch.server.fleet import credentials

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _page(request: Request, viewer: Viewer, server: Server, **extra: Any) -> Response:
    with server.database.reading() as session:
        tokens = list(credentials.tokens(session, unexpired=True))
        expired = session.scalar(select(func.count()).select_from(m.ApiToken)) or 0
        expired -= len(tokens)
        names = [u.name for u in credentials.users(session) if u.disabled is None]
        return render(request, "tokens.html", viewer, tokens=tokens, names=names,
                      expired=expired, **extra)  # fmt: skip


@router.get("/tokens")
def token_list(request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    admin_only(viewer, "the API tokens")
    return _page(request, viewer, server)


@router.post("/tokens")
def create(request: Request, viewer: ViewerDep, form: FormDep, server: ServerDep) -> Response:
    changer(viewer, form, ADMIN)
    user = form.get("user", "")
    try:
        ttl = days_of(form.get("expires_days", ""), "token lifetime")
        with server.database.session() as session:
            secret, _ = credentials.create_token(
                session, user, form.get("label", ""), ttl, viewer.who.actor
            )
    except ServerError as exc:
        return failed(request, viewer, exc)
    return _page(request, viewer, server, secret=secret, created=user)


@router.post("/tokens/{token_id}/revoke")
def revoke(token_id: int, request: Request, viewer: ViewerDep, form: FormDep,
           server: ServerDep) -> Response:  # fmt: skip
    """Refused from the next request on (a console session: logged out at once)."""
    changer(viewer, form, ADMIN)
    try:
        with server.database.session() as session:
            credentials.revoke_tokens(session, viewer.who.actor,
                                      token_id=max(0, min(token_id, s.INT_MAX)))  # fmt: skip
    except ServerError as exc:
        return failed(request, viewer, exc)
    target = form.get("back", "")
    return back(target if target.startswith("/users/") else "/tokens",
                f"token {token_id} revoked")  # fmt: skip

"""/console/enrollment (admin): one-time enrollment tokens (every unused one, the
newest used ones: a fleet uses one per host); creating one
for a group with a lifetime (its secret and the enroll command shown once), revoking
one no host used yet."""

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
    failed,
    render,
)
from micropatch.server.context import Server
from micropatch.server.errors import Invalid
from micropatch.server.fleet import hosts

router = APIRouter(prefix=PREFIX, include_in_schema=False)
MAX_HOURS = 24 * 365
USED_SHOWN = 50  # a fleet uses one token per host: only the newest used ones are listed


def _page(request: Request, viewer: Viewer, server: Server, **extra: Any) -> Response:
    with server.database.reading() as session:
        unused = hosts.enrollment_tokens(session, unused=True)
        used = [t for t in hosts.enrollment_tokens(session, limit=USED_SHOWN + len(unused))
                if t.used is not None][:USED_SHOWN]  # fmt: skip
        used_total = session.scalar(select(func.count()).where(m.EnrollmentToken.used.is_not(None)))
        group_paths = list(session.scalars(select(m.Group.path).order_by(m.Group.path)))
    base = str(request.base_url).rstrip("/")
    return render(request, "enrollment.html", viewer, tokens=unused + used, groups=group_paths,
                  server_url=base, used_total=used_total or 0, used_shown=len(used),
                  **extra)  # fmt: skip


@router.get("/enrollment")
def token_list(request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    admin_only(viewer, "the enrollment tokens")
    return _page(request, viewer, server)


@router.post("/enrollment")
def create(request: Request, viewer: ViewerDep, form: FormDep, server: ServerDep) -> Response:
    changer(viewer, form, ADMIN)
    hours = form.get("expires_hours", "").strip()
    try:
        if hours and (not hours.isdigit() or not 0 < int(hours) <= MAX_HOURS):
            raise Invalid(f"lifetime: a whole number of hours from 1 to {MAX_HOURS}, or empty")
        with server.database.session() as session:
            secret, row = hosts.create_enrollment_token(
                session, form.get("group", "/"), int(hours) * 3600.0 if hours else None,
                viewer.who.actor,
            )  # fmt: skip
            group = row.group.path
    except ServerError as exc:
        return failed(request, viewer, exc)
    return _page(request, viewer, server, secret=secret, created=group)


@router.post("/enrollment/{token_id}/revoke")
def revoke(token_id: int, request: Request, viewer: ViewerDep, form: FormDep,
           server: ServerDep) -> Response:  # fmt: skip
    changer(viewer, form, ADMIN)
    try:
        with server.database.session() as session:
            hosts.revoke_enrollment_token(session, max(0, min(token_id, s.INT_MAX)),
                                          viewer.who.actor)  # fmt: skip
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back("/enrollment", f"enrollment token {token_id} revoked")

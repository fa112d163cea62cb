"""/console/hosts: hosts a page at a time, and one host: its inventory, patches per
process, relevant patches with their effective state, exclusions, events."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.checkin import host_modules
from micropatch.server.console.pages import PREFIX, ServerDep, ViewerDep, failed, render
from micropatch.server.errors import NotFound
from micropatch.server.fleet import groups, hosts, records

router = APIRouter(prefix=PREFIX, include_in_schema=False)
HOSTS_PER_PAGE = 100


@router.get("/hosts")
def host_list(request: Request, viewer: ViewerDep, server: ServerDep, page: int = 1) -> Response:
    page = max(1, min(page, s.INT_MAX // HOSTS_PER_PAGE))
    with server.database.reading() as session:
        rows, total = hosts.hosts_out(
            session, offset=(page - 1) * HOSTS_PER_PAGE, limit=HOSTS_PER_PAGE
        )
    pages = max(1, -(-total // HOSTS_PER_PAGE))
    return render(request, "hosts.html", viewer, hosts=rows, total=total, page=page,
                  pages=pages)  # fmt: skip


@router.get("/hosts/{host_id}")
def host_page(host_id: int, request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    with server.database.reading() as session:
        try:
            found = hosts.host(session, host_id)
        except NotFound as exc:
            return failed(request, viewer, exc)
        out = hosts.host_out(session, found, detail=True)
        effective, relevant, revoked = hosts.host_policy(
            server.catalogues.current(session), found.group_id,
            host_modules(session, found.id),
        )  # fmt: skip
        modules = session.scalars(
            select(m.HostModule).where(m.HostModule.host_id == host_id).order_by(m.HostModule.name)
        ).all()
        events = records.events(session, host_id=host_id, limit=20)
    return render(
        request, "host.html", viewer, host=out,
        policy=groups.policy_out(effective, [r.patch_id for r in relevant]),
        relevant=relevant, revoked=revoked, modules=modules, events=events,
    )  # fmt: skip

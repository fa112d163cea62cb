"""/console/hosts: hosts searched, filtered, sorted and a page at a time, each with
its online state and compliance; one host: its inventory, patches per process,
relevant patches with their effective state and compliance, exclusions, events;
moving it to another group, retiring it (after a confirmation)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from micropatch.errors import ServerError
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.auth import ADMIN
from micropatch.server.checkin import host_modules
from micropatch.server.console.listing import SORTS, HostQuery, find_hosts
from micropatch.server.console.liveness import (
    ONLINE_INTERVALS,
    STALE_INTERVALS,
    STATES,
    liveness,
)
from micropatch.server.console.pages import (
    PREFIX,
    FormDep,
    ServerDep,
    ViewerDep,
    back,
    changer,
    failed,
    render,
)
from micropatch.server.errors import NotFound
from micropatch.server.fleet import compliance, groups, hosts, records

router = APIRouter(prefix=PREFIX, include_in_schema=False)
HOSTS_PER_PAGE = 100


@router.get("/hosts")
def host_list(
    request: Request,
    viewer: ViewerDep,
    server: ServerDep,
    q: str = "",
    group: str = "",
    state: str = "",
    sort: str = "name",
    order: str = "asc",
    patch: str = "",
    page: int = 1,
) -> Response:
    query = HostQuery(
        q=q.strip()[:255], group=group[:255],
        state=state if state in STATES + compliance.STATES else "", patch=patch[:128],
        sort=sort if sort in SORTS else "name", descending=order == "desc",
        page=max(1, min(page, s.INT_MAX // HOSTS_PER_PAGE)),
    )  # fmt: skip
    now, interval = time.time(), server.settings.checkin_interval
    with server.database.reading() as session:
        catalogue = server.catalogues.current(session)
        found, total = find_hosts(session, catalogue, query, interval=interval, now=now,
                                  per_page=HOSTS_PER_PAGE)  # fmt: skip
        ids = [h.id for h, _ in found]
        modules = dict(
            session.execute(
                select(m.HostModule.host_id, func.count())
                .where(m.HostModule.host_id.in_(ids)).group_by(m.HostModule.host_id)
            ).all()
        )  # fmt: skip
        states = compliance.host_states(catalogue, session, ids)
        group_paths = list(session.scalars(select(m.Group.path).order_by(m.Group.path)))
    rows = [
        dict(host=h, group=path, modules=modules.get(h.id, 0),
             liveness=liveness(h.last_seen, interval, now),
             compliance=compliance.worst(states.get(h.id, {})), patches=states.get(h.id, {}))
        for h, path in found
    ]  # fmt: skip
    pages = max(1, -(-total // HOSTS_PER_PAGE))

    def link(**changed: Any) -> str:
        return f"{PREFIX}/hosts?{urlencode(query.params(**changed))}"

    return render(request, "hosts.html", viewer, rows=rows, total=total, pages=pages,
                  query=query, link=link, groups=group_paths, liveness_states=STATES,
                  compliance_states=compliance.STATES, online_after=ONLINE_INTERVALS,
                  stale_after=STALE_INTERVALS)  # fmt: skip


@router.get("/hosts/{host_id}")
def host_page(host_id: int, request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    now, interval = time.time(), server.settings.checkin_interval
    with server.database.reading() as session:
        try:
            found = hosts.host(session, min(host_id, s.INT_MAX))
        except NotFound as exc:
            return failed(request, viewer, exc)
        catalogue = server.catalogues.current(session)
        out = hosts.host_out(session, found, detail=True)
        effective, relevant, revoked = hosts.host_policy(
            catalogue, found.group_id, host_modules(session, found.id)
        )
        modules = session.scalars(
            select(m.HostModule).where(m.HostModule.host_id == found.id).order_by(m.HostModule.name)
        ).all()
        events = records.events(session, host_id=found.id, limit=20)
        states = compliance.host_states(catalogue, session, [found.id]).get(found.id, {})
        group_paths = list(session.scalars(select(m.Group.path).order_by(m.Group.path)))
    return render(
        request, "host.html", viewer, host=out,
        policy=groups.policy_out(effective, [r.patch_id for r in relevant]),
        relevant=relevant, revoked=revoked, modules=modules, events=events,
        liveness=liveness(out.last_seen, interval, now), states=states,
        compliance=compliance.worst(states), groups=group_paths,
    )  # fmt: skip


@router.post("/hosts/{host_id}/group")
def move(host_id: int, request: Request, viewer: ViewerDep, form: FormDep,
         server: ServerDep) -> Response:  # fmt: skip
    """Move a host to another group (admin, as PUT /api/v1/hosts/ID/group)."""
    changer(viewer, form, ADMIN)
    try:
        with server.database.session() as session:
            found = hosts.host(session, min(host_id, s.INT_MAX))
            hosts.move_host(session, found, form.get("group", ""), viewer.who.actor)
            done = f"{found.name} moved to {found.group.path}"
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back(f"/hosts/{host_id}", done)


@router.get("/hosts/{host_id}/retire")
def retire_page(host_id: int, request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    """What retiring a host does, and the button that does it."""
    with server.database.reading() as session:
        try:
            found = hosts.host(session, min(host_id, s.INT_MAX))
        except NotFound as exc:
            return failed(request, viewer, exc)
        out = hosts.host_out(session, found)
    return render(request, "retire.html", viewer, host=out)


@router.post("/hosts/{host_id}/retire")
def retire(host_id: int, request: Request, viewer: ViewerDep, form: FormDep,
           server: ServerDep) -> Response:  # fmt: skip
    """Forget a host (admin, as DELETE /api/v1/hosts/ID): its credential stops working."""
    changer(viewer, form, ADMIN)
    try:
        with server.database.session() as session:
            found = hosts.host(session, min(host_id, s.INT_MAX))
            name = found.name
            hosts.delete_host(session, found, viewer.who.actor)
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back("/hosts", f"host {name} retired: it must enroll again with a new token")

"""/console/events (the timeline, filtered, a page at a time; htmx replaces the table)
and /console/audit (the audit log, admin and auditor only, a page at a time)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.console.pages import (
    PREFIX,
    Forbidden,
    ServerDep,
    ViewerDep,
    event_kinds,
    host_names,
    patch_ids,
    render,
)
from micropatch.server.fleet import records

router = APIRouter(prefix=PREFIX, include_in_schema=False)
EVENTS_PER_PAGE = 200
AUDIT_PER_PAGE = 100


@router.get("/events")
def timeline(
    request: Request,
    viewer: ViewerDep,
    server: ServerDep,
    kind: str = "",
    host: str = "",
    patch: str = "",
    before: str = "",
) -> Response:
    """The host filter is typed (a name or an id), not picked from a list: a fleet has
    thousands."""
    host = host.strip()[:255]
    after = int(before) if before.isdigit() and int(before) <= s.INT_MAX else None
    with server.database.reading() as session:
        host_id = session.scalar(select(m.Host.id).where(m.Host.name == host)) if host else None
        if host_id is None and host.isdigit() and int(host) <= s.INT_MAX:
            host_id = int(host)
        if host and host_id is None:
            host_id = 0  # no such host: no events, said so
        rows = records.events(
            session, host_id=host_id, kind=kind or None, patch_id=patch or None,
            before=after, limit=EVENTS_PER_PAGE,
        )  # fmt: skip
        names = host_names(session, {e.host_id for e in rows})
        ids = patch_ids(session)
    older = None
    if len(rows) == EVENTS_PER_PAGE:
        older = "?" + urlencode({"kind": kind, "host": host, "patch": patch,
                                 "before": rows[-1].id})  # fmt: skip
    context: dict[str, Any] = dict(events=rows, names=names, kind=kind, host=host, patch=patch,
                   kinds=event_kinds(), patch_ids=ids, unknown_host=host_id == 0,
                   older=older, newest=after is None)  # fmt: skip
    if request.headers.get("hx-request") == "true":  # htmx: the table alone
        return render(request, "_events.html", viewer, **context)
    return render(request, "events.html", viewer, **context)


@router.get("/audit")
def audit(request: Request, viewer: ViewerDep, server: ServerDep, before: str = "") -> Response:
    """The newest entries first, a page at a time ("older →": `before` an entry's id)."""
    if not viewer.can_audit:
        raise Forbidden(f"{viewer.who.actor} may not read the audit log (admin or auditor)")
    below = int(before) if before.isdigit() and int(before) <= s.INT_MAX else None
    with server.database.reading() as session:
        entries = records.audit_entries(session, before=below, limit=AUDIT_PER_PAGE)
    older = entries[-1].id if len(entries) == AUDIT_PER_PAGE else None
    return render(request, "audit.html", viewer, entries=entries, older=older,
                  newest=below is None)  # fmt: skip

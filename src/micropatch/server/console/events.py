"""/console/events (the timeline, filtered, a page at a time; htmx replaces the table)
and /console/audit (the audit log, admin and auditor only)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

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
    host_id = int(host) if host.isdigit() and int(host) <= s.INT_MAX else None
    after = int(before) if before.isdigit() and int(before) <= s.INT_MAX else None
    with server.database.reading() as session:
        rows = records.events(
            session, host_id=host_id, kind=kind or None, patch_id=patch or None,
            before=after, limit=EVENTS_PER_PAGE,
        )  # fmt: skip
        names = host_names(session)
        ids = patch_ids(session)
    older = None
    if len(rows) == EVENTS_PER_PAGE:
        older = "?" + urlencode({"kind": kind, "host": host, "patch": patch,
                                 "before": rows[-1].id})  # fmt: skip
    context: dict[str, Any] = dict(events=rows, names=names, kind=kind, host=host, patch=patch,
                   kinds=event_kinds(), hosts=sorted(names.items()), patch_ids=ids,
                   older=older, newest=after is None)  # fmt: skip
    if request.headers.get("hx-request") == "true":  # htmx: the table alone
        return render(request, "_events.html", viewer, **context)
    return render(request, "events.html", viewer, **context)


@router.get("/audit")
def audit(request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    if not viewer.can_audit:
        raise Forbidden(f"{viewer.who.actor} may not read the audit log (admin or auditor)")
    with server.database.reading() as session:
        entries = records.audit_entries(session, limit=500)
    return render(request, "audit.html", viewer, entries=entries)

"""/api/v1/events and /api/v1/audit: what agents reported, and every change by whom."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Anyone, AuditReader, ServerDep
from micropatch.server.auth import READ
from micropatch.server.fleet import records

router = APIRouter(prefix=PREFIX, tags=["events"])


@router.get("/events", response_model=list[s.EventOut])
def list_events(
    who: Anyone,
    server: ServerDep,
    host_id: Annotated[int | None, Query(ge=1, le=s.INT_MAX)] = None,
    kind: str | None = None,
    patch_id: str | None = None,
    since: float | None = None,
    before: Annotated[int | None, Query(ge=1, le=s.INT_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[s.EventOut]:
    """Events, newest first; the next page: `before` the last one's id. A host
    credential sees only its own."""
    if who.kind == "host":
        if host_id is not None and host_id != who.id:
            raise HTTPException(403, f"{who.actor} may read only its own data")
        host_id = who.id
    elif who.role not in READ:
        raise HTTPException(403, f"{who.actor} may not read events")
    with server.database.reading() as session:
        rows = records.events(
            session, host_id=host_id, kind=kind, patch_id=patch_id, since=since, before=before,
            limit=limit,
        )  # fmt: skip
        return [
            s.EventOut(id=e.id, host_id=e.host_id, kind=e.kind, time=e.time, pid=e.pid,
                       exe=e.exe, patch_id=e.patch_id, version=e.version, module=e.module,
                       message=e.message, data=e.data)
            for e in rows
        ]  # fmt: skip


@router.get("/audit", response_model=list[s.AuditOut])
def audit_log(
    _who: AuditReader,
    server: ServerDep,
    since: float | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[s.AuditOut]:
    """Every change, by whom, newest first (admin and auditor)."""
    with server.database.reading() as session:
        return [
            s.AuditOut(id=a.id, time=a.time, actor=a.actor, action=a.action, subject=a.subject,
                       details=a.details)
            for a in records.audit_entries(session, since=since, limit=limit)
        ]  # fmt: skip

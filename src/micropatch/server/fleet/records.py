"""Events (what agents reported) and the audit log (every change, by whom)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from micropatch.server import models as m


def audit(session: Session, actor: str, action: str, subject: str, **details: Any) -> None:
    """Record a change in the audit log, in the transaction that makes it."""
    session.add(
        m.AuditEntry(time=time.time(), actor=actor, action=action, subject=subject,
                     details=details)
    )  # fmt: skip


def events(
    session: Session,
    *,
    host_id: int | None = None,
    kind: str | None = None,
    patch_id: str | None = None,
    since: float | None = None,
    before: int | None = None,
    limit: int = 1000,
) -> Sequence[m.Event]:
    """Events, newest first, optionally of one host, kind or patch (the API and the
    console's timeline); `before`: only those after the event of that id in this
    order (the next page)."""
    query = select(m.Event).order_by(m.Event.time.desc(), m.Event.id.desc()).limit(limit)
    if before is not None:
        last = session.get(m.Event, before)
        if last is not None:
            query = query.where(
                or_(m.Event.time < last.time, (m.Event.time == last.time) & (m.Event.id < last.id))
            )
    if host_id is not None:
        query = query.where(m.Event.host_id == host_id)
    if kind is not None:
        query = query.where(m.Event.kind == kind)
    if patch_id is not None:
        query = query.where(m.Event.patch_id == patch_id)
    if since is not None:
        query = query.where(m.Event.time >= since)
    return session.scalars(query).all()


def audit_entries(
    session: Session, *, since: float | None = None, before: int | None = None, limit: int = 1000
) -> Sequence[m.AuditEntry]:
    """The audit log, newest first; `before`: only entries older than that id (the
    next page)."""
    query = select(m.AuditEntry).order_by(m.AuditEntry.id.desc()).limit(limit)
    if since is not None:
        query = query.where(m.AuditEntry.time >= since)
    if before is not None:
        query = query.where(m.AuditEntry.id < before)
    return session.scalars(query).all()

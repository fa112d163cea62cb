"""The hosts listing's query: search by name, a group (and the groups below it),
online / stale / offline, a compliance state, a sort, a page. Filtering, sorting and
paging happen in the database; the page's hosts alone are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server.catalogue import Catalogue
from micropatch.server.console.liveness import thresholds
from micropatch.server.fleet import compliance

SORTS: dict[str, Any] = {
    "name": m.Host.name,
    "group": m.Group.path,
    "last_seen": m.Host.last_seen,
    "id": m.Host.id,
}


@dataclass(frozen=True)
class HostQuery:
    """What the hosts page was asked for (its URL's parameters, checked)."""

    q: str = ""
    group: str = ""
    state: str = ""  # online, stale, offline, or a compliance state
    patch: str = ""  # with a compliance state: that state for this patch
    sort: str = "name"
    descending: bool = False
    page: int = 1

    def params(self, **changed: Any) -> dict[str, Any]:
        """The URL parameters of this query with some changed (links, the pager)."""
        values = {"q": self.q, "group": self.group, "state": self.state, "patch": self.patch,
                  "sort": self.sort,
                  "order": "desc" if self.descending else "asc", "page": self.page}  # fmt: skip
        values.update(changed)
        return {k: v for k, v in values.items() if v not in ("", None)}


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filters(
    query: HostQuery, catalogue: Catalogue, session: Session, interval: float, now: float
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if query.q:
        where.append(m.Host.name.ilike(f"%{_escape_like(query.q)}%", escape="\\"))
    if query.group and query.group != "/":  # a group and the groups below it
        below = _escape_like(query.group.rstrip("/")) + "/%"
        where.append(or_(m.Group.path == query.group, m.Group.path.like(below, escape="\\")))
    online, stale = thresholds(interval, now)
    if query.state == "online":
        where.append(m.Host.last_seen >= online)
    elif query.state == "stale":
        where.append((m.Host.last_seen < online) & (m.Host.last_seen >= stale))
    elif query.state == "offline":
        where.append(or_(m.Host.last_seen.is_(None), m.Host.last_seen < stale))
    if query.state in compliance.STATES or query.patch:
        state = query.state if query.state in compliance.STATES else None
        chosen = compliance.hosts_in_state(catalogue, session, state, query.patch or None)
        where.append(m.Host.id.in_(chosen))
    return where


def find_hosts(
    session: Session,
    catalogue: Catalogue,
    query: HostQuery,
    *,
    interval: float,
    now: float,
    per_page: int,
) -> tuple[list[tuple[m.Host, str]], int]:
    """A page of (host, group path) and how many hosts match: one statement (the
    count is a window over the filtered hosts), a second only for a page past the end."""
    where = _filters(query, catalogue, session, interval, now)
    base = (
        select(m.Host, m.Group.path, func.count().over().label("total"))
        .join(m.Group, m.Host.group_id == m.Group.id)
        .where(*where)
    )
    column = SORTS.get(query.sort, m.Host.name)
    order = column.desc() if query.descending else column.asc()
    if query.sort == "last_seen":  # never checked in: last when ascending
        order = column.desc().nulls_last() if query.descending else column.asc().nulls_first()
    page = session.execute(
        base.order_by(order, m.Host.id).offset((query.page - 1) * per_page).limit(per_page)
    ).all()
    if page:
        return [(h, path) for h, path, _ in page], page[0].total
    counted = select(func.count()).select_from(base.subquery())
    return [], (session.scalar(counted) or 0) if query.page > 1 else 0

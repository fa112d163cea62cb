"""/console/: the dashboard: hosts (online, stale, offline), how many are
vulnerable, outdated, protected (`fleet.compliance`, counted by the database),
protected processes, published patches, blocked attempts per hour as an SVG chart
drawn here (no script), recent events."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server.console.liveness import thresholds
from micropatch.server.console.pages import PREFIX, ServerDep, ViewerDep, host_names, render
from micropatch.server.fleet import compliance, records

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/")
def dashboard(request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    now = time.time()
    online_after, stale_after = thresholds(server.settings.checkin_interval, now)
    with server.database.reading() as session:
        hosts = session.scalar(select(func.count()).select_from(m.Host)) or 0
        online = session.scalar(select(func.count()).where(m.Host.last_seen >= online_after)) or 0
        stale = (
            session.scalar(
                select(func.count()).where(
                    m.Host.last_seen < online_after, m.Host.last_seen >= stale_after
                )
            )
            or 0
        )
        counts = compliance.fleet_counts(server.catalogues.current(session), session)
        protected = (
            session.scalar(
                select(func.count()).select_from(
                    select(m.ProcessPatch.host_id, m.ProcessPatch.pid)
                    .where(m.ProcessPatch.state == "applied")
                    .distinct()
                    .subquery()
                )
            )
            or 0
        )
        series = blocked_series(session, now=now)
        patches = (
            session.scalar(
                select(func.count(func.distinct(m.Patch.patch_id))).where(
                    m.Patch.revoked.is_(False)
                )
            )
            or 0
        )
        events = records.events(session, limit=10)
        names = host_names(session, {e.host_id for e in events})
    return render(
        request, "dashboard.html", viewer, hosts=hosts, online=online, stale=stale,
        offline=hosts - online - stale, compliance=counts, protected=protected,
        patches=patches, blocked=sum(n for _, n in series), chart=chart_svg(series),
        events=events, names=names,
    )  # fmt: skip


def blocked_series(
    session: Session, *, hours: int = 24, now: float | None = None
) -> list[tuple[float, int]]:
    """Blocked exploit attempts per hour over the last `hours`, oldest first: each
    `blocked` event counts its data["count"] (the agent's increment), else 1."""
    now = time.time() if now is None else now
    end = math.floor(now / 3600) * 3600 + 3600
    start = end - hours * 3600
    buckets = [0] * hours
    rows = session.execute(
        select(m.Event.time, m.Event.data).where(
            m.Event.kind == "blocked", m.Event.time >= start, m.Event.time < end
        )
    )
    for at, data in rows:
        count = data.get("count", 1) if isinstance(data, dict) else 1
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            count = 1
        buckets[int((at - start) // 3600)] += count
    return [(start + i * 3600, n) for i, n in enumerate(buckets)]


def chart_svg(series: list[tuple[float, int]]) -> Markup:
    """The series as an inline SVG bar chart, drawn here (no script)."""
    width, height, left, bottom, top = 720, 200, 40, 24, 12
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max((n for _, n in series), default=0)
    scale = max(1, peak)
    bar = plot_w / max(1, len(series))
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-labelledby="chart-title">',
        f'<title id="chart-title">Blocked attempts per hour, last {len(series)} hours '
        f"(peak {peak})</title>",
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 8}" '
        f'y2="{top + plot_h}"/>',
        f'<text class="label" x="{left - 6}" y="{top + 4}" text-anchor="end">{scale}</text>',
        f'<text class="label" x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for i, (at, n) in enumerate(series):
        h = plot_h * n / scale
        x = left + i * bar
        hour = time.strftime("%H:00", time.gmtime(at))
        parts.append(
            f'<rect class="bar" data-count="{n}" x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" '
            f'width="{max(1.0, bar - 2):.1f}" height="{h:.1f}"><title>{hour} UTC: {n} blocked'
            "</title></rect>"
        )
        if i % 4 == 0:
            parts.append(
                f'<text class="label" x="{x + bar / 2:.1f}" y="{height - 6}" '
                f'text-anchor="middle">{hour}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))

"""Online, stale or offline, from a host's last check-in and the check-in interval
(`server run --checkin-interval`, 60 s by default): *online* within 3 intervals
(two missed check-ins are tolerated: a restart, a slow network), *stale* within 60
intervals (an hour by default: the agent is down or cut off, its patches stay
applied but it hears of nothing new), *offline* beyond that or never."""

from __future__ import annotations

ONLINE_INTERVALS = 3
STALE_INTERVALS = 60
STATES = ("online", "stale", "offline")


def thresholds(interval: float, now: float) -> tuple[float, float]:
    """The check-in times after which a host is online, and stale."""
    return now - ONLINE_INTERVALS * interval, now - STALE_INTERVALS * interval


def liveness(last_seen: float | None, interval: float, now: float) -> str:
    online, stale = thresholds(interval, now)
    if last_seen is not None and last_seen >= online:
        return "online"
    if last_seen is not None and last_seen >= stale:
        return "stale"
    return "offline"

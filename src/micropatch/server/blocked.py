"""Blocked counts bounded per check-in (issue 17.7): a host speaks only for itself,
and cannot report a million blocked attempts in one check-in.

A `blocked` event carries `data["count"]`, the attempts blocked since the agent's
last report. The counts of one check-in may add up to at most RATE a second since
the host's previous check-in (FIRST seconds' worth for its first one), plus BURST,
and never more than PER_CHECKIN. What is past the allowance is dropped from the
count and said in the event itself: `data["count"]` is what was kept,
`data["reported"]` what the agent sent, `data["dropped"]` why; the server logs it
once per check-in. The event's other fields are kept as sent (a batch sent again
is still recognised).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
RATE = 1000.0  # blocked attempts a second a host may report
BURST = 1000  # and this many beyond, in any check-in
PER_CHECKIN = 100_000  # at most, in one check-in
FIRST = 60.0  # seconds' worth allowed in a host's first check-in


def allowance(elapsed: float | None) -> int:
    """How many blocked attempts a check-in `elapsed` seconds after the previous one
    (None: the first) may report."""
    seconds = FIRST if elapsed is None else max(0.0, elapsed)
    return int(min(PER_CHECKIN, RATE * seconds + BURST))


def bound(events: list[dict[str, Any]], elapsed: float | None, host_id: int) -> int:
    """Clamp the counts of the `blocked` events (in place, in order) to the allowance;
    the attempts dropped."""
    left = allowance(elapsed)
    dropped = 0
    for event in events:
        if event["kind"] != "blocked":
            continue
        data = event["data"]
        count = data.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            count = 1
        kept = min(count, left)
        left -= kept
        if kept < count:
            dropped += count - kept
            event["data"] = data | {
                "count": kept, "reported": data.get("count"),
                "dropped": f"over {allowance(elapsed)} blocked attempts in one check-in "
                           f"({RATE:g} a second since the previous one, at most {PER_CHECKIN})",
            }  # fmt: skip
    if dropped:
        log.warning("host %d reported %d blocked attempts too many: dropped", host_id, dropped)
    return dropped

"""How long the agent waits before its next check-in after a failed one (docs/agent.md,
"Offline").

Two kinds of failure, two backoffs:

- **Busy**: the server answered 503 (or 429) with `Retry-After`: it is up, and says
  when to come back. Its push (docs/server.md, "Push") reaches an agent only while
  it holds a check-in, so an agent in a long backoff would miss a change by that
  long: it comes back after Retry-After plus a jitter that doubles with each busy
  answer in a row, from Retry-After to at most BUSY_SPREAD seconds — seconds, not
  the interval — so that a fleet a burst refused comes back spread, not at once.
- **Down or failing**: unreachable, or any other error: the interval doubled at each
  failure, at most MAX_BACKOFF, half to all of it (a fleet cut off at once comes
  back spread).
"""

from __future__ import annotations

import random

MAX_BACKOFF = 600.0  # seconds, the longest wait after failures (down or failing)
BUSY_SPREAD = 30.0  # seconds, the widest jitter after busy answers in a row
MAX_RETRY_AFTER = 300.0  # seconds: a larger Retry-After is taken as this
BUSY = (429, 503)  # statuses whose Retry-After says when to come back


def failed(interval: float, failures: int, rng: random.Random | None = None) -> float:
    """After `failures` failed check-ins in a row (down or failing): half to all of
    the interval doubled per failure, at most MAX_BACKOFF."""
    backoff = min(MAX_BACKOFF, interval * 2 ** min(failures, 16))
    return float(backoff * (rng or random).uniform(0.5, 1.0))


def busy(retry_after: float, streak: int, rng: random.Random | None = None) -> float:
    """After the `streak`-th busy answer in a row, which said `retry_after` seconds:
    that, plus up to retry_after doubled per busy answer before it (at most
    BUSY_SPREAD)."""
    floor = min(max(retry_after, 0.0), MAX_RETRY_AFTER)
    spread = min(BUSY_SPREAD, max(floor, 1.0) * 2 ** min(max(streak - 1, 0), 16))
    return floor + (rng or random).uniform(0.0, spread)


def retry_after(value: str | None) -> float | None:
    """A Retry-After header's seconds (its HTTP-date form is not sent by our server:
    None, as for no header)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None

"""Requests at work bounded, held check-ins apart (issue 17.1 and 17.8).

A server process takes at most REQUESTS requests at work at once: past that it
answers 503 at once (the agent retries with backoff) instead of queueing work it
cannot do in time. A check-in held until its answer changes (`server.push`) is
not at work: it waits on the event loop, with no thread and no database
connection, so it does not count, nor does one queued for its turn to be stored
(`Push.turn`); those have their own limit (`Push.capacity`).
uvicorn's own limit (`limit`) is the sum: every connection it accepts is either.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from micropatch.server.push import MAX_HELD, Push

REQUESTS = 256  # requests at work in one server process
RETRY_AFTER = 2  # seconds, said with a 503


def limit() -> int:
    """uvicorn's limit_concurrency: the requests at work and the held check-ins."""
    return REQUESTS + MAX_HELD


class Capacity:
    """ASGI middleware: 503 at once for a request past REQUESTS at work."""

    def __init__(self, app: ASGIApp, push: Push, requests: int = REQUESTS) -> None:
        self.app = app
        self.push = push
        self.requests = requests
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight - self.push.held - self.push.queued >= self.requests:
            await _busy(send, self.requests)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _busy(send: Send, requests: int) -> None:
    detail = f"the server is at work on {requests} requests: retry in a few seconds"
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"),
                          (b"content-length", str(len(body)).encode()),
                          (b"retry-after", str(RETRY_AFTER).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""Request bodies limited while they are read, before any work (issue 17.3).

Each route has a limit (`limit_for`): small for enrollment and logins (anyone may
call them), larger for a check-in's inventory, the largest artifact for a publish
(whose route reads its body only after authenticating). A body that declares a
larger Content-Length is refused at once, unread; a body sent without one
(chunked) is counted as it arrives and refused once past the limit, so no more
than the limit is ever held in memory.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from micropatch.server.api import PREFIX

KIB, MIB = 1 << 10, 1 << 20
MAX_ARTIFACT = 64 * MIB
LIMITS = {
    f"{PREFIX}/enroll": 64 * KIB,
    f"{PREFIX}/auth/token": 64 * KIB,
    f"{PREFIX}/checkin": 16 * MIB,
    f"{PREFIX}/patches": MAX_ARTIFACT,
}
DEFAULT = 1 * MIB  # every other route's JSON body, and the console's forms
# Routes that authenticate before they read their body: a declared length is checked
# by the route (`declared_too_large`), so that a caller without credentials gets 401.
AUTHENTICATED_FIRST = {f"{PREFIX}/patches"}


def limit_for(path: str) -> int:
    return LIMITS.get(path.rstrip("/"), DEFAULT)


def declared_too_large(scope: Scope, limit: int) -> bool:
    """Whether the request's Content-Length is over `limit`."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    return declared.isdigit() and int(declared) > limit


class TooLarge(HTTPException):
    """Raised from `receive` once a body passes its limit: an HTTPException, so that
    FastAPI's body parsing passes it on and the app answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over {_size(limit)} (the limit of this route)")


class BodyLimit:
    """ASGI middleware: 413 for a body over its route's limit, read no further."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = limit_for(scope["path"])
        if scope["path"] not in AUTHENTICATED_FIRST and declared_too_large(scope, limit):
            await _too_large(send, limit)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except TooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": TooLarge(limit).detail}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"),
                          (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"

"""The fleet server's API as the agent calls it: JSON over HTTP with the standard
library (urllib), so the client costs no dependency, and errors that say what the
server said (docs/server.md, "Agent protocol")."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from micropatch.agent.fleet import backoff
from micropatch.errors import AgentError

HTTP_TIMEOUT = 30.0
SHOWN_PROBLEMS = 3  # of a validation error's list, in a message


class HttpError(AgentError):
    """The server answered with an error status; `detail` is what it said."""

    def __init__(
        self, status: int, message: str, detail: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after  # seconds, from the answer's Retry-After

    @property
    def refused(self) -> bool:
        """A 4xx: the server refused this request (retrying it unchanged will not do)."""
        return 400 <= self.status < 500


def describe_detail(detail: Any) -> str:
    """The server's `detail`, readable: a string as it is; a validation error's list
    as `where: what` for its first few problems."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        problems = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
                problems.append(f"{where or 'body'}: {item.get('msg', item)}")
            else:
                problems.append(str(item))
        more = len(problems) - SHOWN_PROBLEMS
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        return shown + (f"; and {more} more" if more > 0 else "")
    return "" if detail is None else json.dumps(detail)[:500]


class Cancel:
    """Cuts short, from another thread, a request that may wait long (a held check-in):
    its socket is shut down, and the request fails at once with an OSError."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.cancelled = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._socket = sock
            if self.cancelled:
                self._shut()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)


def _opener(cancel: Cancel) -> urllib.request.OpenerDirector:
    """urllib (its proxies, its TLS) with each connection's socket handed to `cancel`."""

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            cancel.attach(self.sock)

    class TlsConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            cancel.attach(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Connection, req)

    class TlsHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(TlsConnection, req, context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(Handler, TlsHandler)


def post_json(
    url: str,
    body: dict[str, Any],
    credential: str | None = None,
    *,
    timeout: float = HTTP_TIMEOUT,
    cancel: Cancel | None = None,
) -> dict[str, Any]:
    """POST JSON, the answer's JSON. URLError/OSError when the server cannot be reached
    (or the answer takes more than `timeout` s between two reads, or `cancel` cut it
    short), HttpError for an error status (with the server's message)."""
    request = urllib.request.Request(
        url, data=json.dumps(body, default=str).encode(), method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json",
                 **({"Authorization": f"Bearer {credential}"} if credential else {})},
    )  # fmt: skip
    try:
        opened = _opener(cancel).open if cancel is not None else urllib.request.urlopen
        with opened(request, timeout=timeout) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            raw = json.loads(e.read() or b"{}")
            detail = describe_detail(raw.get("detail") if isinstance(raw, dict) else raw)
        except (ValueError, OSError):
            detail = ""
        detail = detail or str(e.reason)
        later = backoff.retry_after(e.headers.get("Retry-After") if e.headers else None)
        raise HttpError(e.code, f"{url}: HTTP {e.code}: {detail}", detail, later) from None
    if not isinstance(answer, dict):
        raise HttpError(200, f"{url}: the answer is not a JSON object")
    return answer


def agent_version() -> str:
    from micropatch import __version__

    return str(__version__)


def machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            value = Path(path).read_text().strip()
            if value:
                return value[:64]
    return None

"""What every console page shares: the templates, who is looking (`Viewer`, from the
session cookie), forms and their CSRF check, rendering and redirects.

Sessions are server-side: logging in issues a 12-hour user token (a row of
`api_tokens`) kept in an HttpOnly, SameSite=Strict cookie; logging out deletes the
row. Every state-changing form is a POST carrying a CSRF token derived from the
session (HMAC-SHA256 of the session's secret), checked before anything changes
(`changer`).

As in the API (`server.api`), a page's database work runs in one thread in a
transaction of its own; finding the viewer reads in another.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.orm import Session

from micropatch import __version__
from micropatch.errors import ServerError
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.auth import ADMIN, PUBLISH, READ, USER_PREFIX, Principal
from micropatch.server.context import Server, reached, server_of
from micropatch.server.errors import Invalid, NotFound, Unauthorized
from micropatch.server.fleet import users

PREFIX = "/console"
SESSION_COOKIE = "mp_session"
LOGIN_COOKIE = "mp_login"
MAX_FORM = 64 << 10
SERVER_DIR = Path(__file__).resolve().parent.parent  # templates/ and static/
_CSRF_KEY = b"micropatch console csrf v1"
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = Environment(
    loader=FileSystemLoader(SERVER_DIR / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


class LoginNeeded(Exception):
    """No valid session: the browser goes to the login page."""

    def __init__(self, path: str) -> None:
        self.path = path


class Forbidden(Exception):
    """A logged-in user whose role may not do this (HTTP 403, an HTML page)."""

    def __init__(self, message: str) -> None:
        self.message = message


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the user, and the session's CSRF token for its forms."""

    who: Principal
    csrf: str

    @property
    def role(self) -> str:
        return self.who.role or ""

    @property
    def can_change(self) -> bool:
        return self.role in PUBLISH

    @property
    def is_admin(self) -> bool:
        return self.role in ADMIN

    @property
    def can_audit(self) -> bool:
        return self.role in ADMIN | {"auditor"}


def csrf_token(session_secret: str) -> str:
    """The CSRF token of a session: only who holds the session's secret can make it."""
    return hmac.new(_CSRF_KEY, session_secret.encode(), hashlib.sha256).hexdigest()


def _when(value: float | None) -> str:
    if value is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))


def _ago(value: float | None) -> str:
    if value is None:
        return "never"
    delta = max(0.0, time.time() - value)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if delta >= size:
            return f"{int(delta // size)} {unit} ago"
    return f"{int(delta)} s ago"


_TIMES = frozenset({"expires", "time", "created", "used", "disabled"})


def _text(key: str, value: Any) -> str:
    """One audit detail as a person reads it: times as dates, lists and mappings
    spelled out (not JSON)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in _TIMES and isinstance(value, int | float):
        return _when(value) + " UTC"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_text(str(k), v)}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(_text(key, v) for v in value) or "none"
    return "" if value is None else str(value)


def _readable(details: Any) -> list[tuple[str, str]]:
    """An audit entry's details as (name, text) pairs; empty ones left out."""
    if not isinstance(details, dict):
        return [("details", str(details))] if details else []
    return [(str(k), _text(str(k), v)) for k, v in details.items() if v not in (None, [], {}, "")]


templates.filters["when"] = _when
templates.filters["ago"] = _ago
templates.filters["readable"] = _readable


def render(
    request: Request, template: str, viewer: Viewer | None, status: int = 200, **context: Any
) -> HTMLResponse:
    page = templates.get_template(template).render(
        request=request, viewer=viewer, prefix=PREFIX, version=__version__,
        notice=request.query_params.get("done"), **context,
    )  # fmt: skip
    return HTMLResponse(page, status_code=status, headers=HEADERS)


def back(path: str, message: str) -> RedirectResponse:
    """After a POST: see the page again (303), with what was done."""
    sep = "&" if "?" in path else "?"
    return RedirectResponse(f"{PREFIX}{path}{sep}{urlencode({'done': message})}", 303)


def failed(request: Request, viewer: Viewer, exc: ServerError) -> HTMLResponse:
    """A refused change or a missing thing, as an error page."""
    status = 404 if isinstance(exc, NotFound) else 422 if isinstance(exc, Invalid) else 409
    return render(request, "error.html", viewer, status, title="Not done", message=str(exc))


ServerDep = Annotated[Server, Depends(reached)]


def find_viewer(request: Request) -> Viewer | None:
    """Who holds the request's session cookie, if anyone (a page that shows to
    everyone, such as the 404, still shows the logged-in user's menu)."""
    secret = request.cookies.get(SESSION_COOKIE, "")
    if secret.startswith(USER_PREFIX):
        with server_of(request).database.reading() as session:
            try:
                who = users.authenticate(session, secret)
            except Unauthorized:
                return None
            if who.kind == "user" and who.role in READ:
                return Viewer(who, csrf_token(secret))
    return None


def _viewer(request: Request) -> Viewer:
    viewer = find_viewer(request)
    if viewer is not None:
        return viewer
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise LoginNeeded(target)


ViewerDep = Annotated[Viewer, Depends(_viewer)]


async def _form(request: Request) -> dict[str, str]:
    """A url-encoded form (what every console form sends), its last value per name."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise HTTPException(413, "form too large")
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if body and kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "the console's forms are application/x-www-form-urlencoded")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "malformed form") from None
    return {k: v[-1] for k, v in fields.items()}


FormDep = Annotated[dict[str, str], Depends(_form)]


def changer(viewer: Viewer, form: dict[str, str], allowed: frozenset[str] = PUBLISH) -> None:
    """A state-changing POST: the CSRF token first, then the role; nothing changed
    before both pass."""
    if not hmac.compare_digest(form.get("csrf", ""), viewer.csrf):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")
    if viewer.role not in allowed:
        raise Forbidden(
            f"{viewer.who.actor} may not do this (needs the role {' or '.join(sorted(allowed))})"
        )


def set_cookie(response: Response, request: Request, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name, value, max_age=age, path=PREFIX, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def state_of(text: str) -> str | None:
    """A state chosen in a form: enabled, disabled, or inherit (None)."""
    if text in ("", "inherit"):
        return None
    if text not in m.STATES:
        raise Invalid(f"state {text!r}: enabled, disabled or inherit")
    return text


def patch_ids(session: Session) -> list[str]:
    return list(session.scalars(select(m.Patch.patch_id).distinct().order_by(m.Patch.patch_id)))


def host_names(session: Session, ids: Iterable[int]) -> dict[int, str]:
    """The names of these hosts (those a page shows: never the whole fleet)."""
    wanted = list(ids)
    if not wanted:
        return {}
    query = select(m.Host.id, m.Host.name).where(m.Host.id.in_(wanted))
    return {i: n for i, n in session.execute(query)}


def event_kinds() -> list[str]:
    from typing import get_args

    return list(get_args(s.EventKind))


def safe_next(target: str) -> str:
    """Only a console path: never another site (an open redirect)."""
    if target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/"


def admin_only(viewer: Viewer, what: str) -> None:
    """A page only an admin reads (users, tokens, enrollment)."""
    if not viewer.is_admin:
        raise Forbidden(f"{viewer.who.actor} may not see {what} (needs the role admin)")


MAX_DAYS = 3650


def days_of(text: str, what: str) -> float | None:
    """A lifetime typed in days ("" or "0": none) as seconds."""
    text = text.strip()
    if text in ("", "0"):
        return None
    if not text.isdigit() or not 0 < int(text) <= MAX_DAYS:
        raise Invalid(f"{what}: a whole number of days from 1 to {MAX_DAYS}, or empty for none")
    return int(text) * 86400.0

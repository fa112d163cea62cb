"""The web console: server-rendered HTML pages under /console (Jinja2 templates, htmx
served from this package, a hand-written stylesheet; no build step, no CDN).

Sessions are server-side: logging in with a user's name and argon2-checked password
issues a 12-hour user token (`fleet.login(via="console")`, a row of `api_tokens`)
kept in an HttpOnly, SameSite=Strict cookie; logging out deletes the row, so the
cookie is worthless from then on. Every state-changing form is a POST that carries a
CSRF token derived from the session (HMAC-SHA256 of the session's secret), checked
here before anything changes; the login form carries a random token that must match
a cookie set with it (double submit). Changes go through `server.fleet`, as the API's
do, and so write the same audit entries.

Who may do what follows the API's matrix (`server.app`): every role reads; admin and
operator change policies and revoke patches; admin creates groups; the audit log is
for admin and auditor.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from micropatch import __version__
from micropatch.errors import ServerError
from micropatch.server import fleet
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.auth import ADMIN, PUBLISH, READ, USER_PREFIX, Principal, secret_hash
from micropatch.server.checkin import host_modules

PREFIX = "/console"
SESSION_COOKIE = "mp_session"
LOGIN_COOKIE = "mp_login"
MAX_FORM = 64 << 10
HERE = Path(__file__).parent
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
    loader=FileSystemLoader(HERE / "templates"),
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


# --- helpers ----------------------------------------------------------------------------


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


templates.filters["when"] = _when
templates.filters["ago"] = _ago


def render(
    request: Request, template: str, viewer: Viewer | None, status: int = 200, **context: Any
) -> HTMLResponse:
    page = templates.get_template(template).render(
        request=request, viewer=viewer, prefix=PREFIX, version=__version__,
        notice=request.query_params.get("done"), **context,
    )  # fmt: skip
    return HTMLResponse(page, status_code=status, headers=HEADERS)


def _back(path: str, message: str) -> RedirectResponse:
    """After a POST: see the page again (303), with what was done."""
    sep = "&" if "?" in path else "?"
    return RedirectResponse(f"{PREFIX}{path}{sep}{urlencode({'done': message})}", 303)


HOSTS_PER_PAGE = 100
EVENTS_PER_PAGE = 200


def _db(request: Request) -> Iterator[Session]:
    with request.app.state.server.database.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(_db, scope="function")]


def _viewer(request: Request, session: SessionDep) -> Viewer:
    secret = request.cookies.get(SESSION_COOKIE, "")
    if secret.startswith(USER_PREFIX):
        try:
            who = fleet.authenticate(session, secret)
        except fleet.Unauthorized:
            pass
        else:
            if who.kind == "user" and who.role in READ:
                return Viewer(who, csrf_token(secret))
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


def _changer(viewer: Viewer, form: dict[str, str], allowed: frozenset[str] = PUBLISH) -> None:
    """A state-changing POST: the CSRF token first, then the role; nothing changed
    before both pass."""
    if not hmac.compare_digest(form.get("csrf", ""), viewer.csrf):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")
    if viewer.role not in allowed:
        raise Forbidden(
            f"{viewer.who.actor} may not do this (needs the role {' or '.join(sorted(allowed))})"
        )


def _cookie(response: Response, request: Request, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name, value, max_age=age, path=PREFIX, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


# --- what the pages show ------------------------------------------------------------------


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


def _group_form_policy(g: m.Group) -> dict[str, Any]:
    """What a group sets, as the API's PolicyIn takes it (to change one part)."""
    return {
        "default_state": g.default_state,
        "patches": {x.patch_id: x.state for x in g.patch_states},
        "exclusions": [
            {"kind": e.kind, "value": e.value, "patch_id": e.patch_id} for e in g.exclusions
        ],
    }


def _set_policy(session: Session, path: str, change: dict[str, Any], actor: str) -> None:
    """Apply a changed policy through the API's own operation (and audit entry)."""
    try:
        body = s.PolicyIn.model_validate(change)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fleet.Invalid(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    fleet.set_policy(session, path, body, actor)


def _patch_ids(session: Session) -> list[str]:
    return list(session.scalars(select(m.Patch.patch_id).distinct().order_by(m.Patch.patch_id)))


# --- the routes ---------------------------------------------------------------------------


def mount_console(app: FastAPI, server: Any) -> None:
    """Add the console's routes, its static files and its error pages to `app`."""
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    @app.exception_handler(LoginNeeded)
    async def _login_needed(_request: Request, exc: LoginNeeded) -> Response:
        return RedirectResponse(f"{PREFIX}/login?next={quote(exc.path)}", 303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return render(request, "error.html", None, 403, title="Forbidden", message=exc.message)

    def failed(request: Request, viewer: Viewer, exc: ServerError) -> HTMLResponse:
        status = 404 if isinstance(exc, fleet.NotFound) else 409
        if isinstance(exc, fleet.Invalid):
            status = 422
        return render(request, "error.html", viewer, status, title="Not done", message=str(exc))

    # --- login and logout ---------------------------------------------------------------

    @router.get("/login")
    def login_page(request: Request, next: str = f"{PREFIX}/") -> Response:
        nonce = secrets.token_urlsafe(24)
        response = render(request, "login.html", None, csrf=nonce, next=_safe_next(next))
        _cookie(response, request, LOGIN_COOKIE, nonce, 3600)
        return response

    @router.post("/login")
    def login(request: Request, form: FormDep, session: SessionDep) -> Response:
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(form.get("csrf", ""), nonce):
            raise Forbidden("missing or wrong CSRF token: reload the login page and try again")
        target = _safe_next(form.get("next", ""))
        try:
            _, secret = fleet.login(
                session, server.passwords, form.get("name", ""), form.get("password", ""),
                via="console", throttle=server.logins,
            )  # fmt: skip
        except (fleet.Unauthorized, fleet.TooManyAttempts) as exc:
            status = 429 if isinstance(exc, fleet.TooManyAttempts) else 401
            return render(request, "login.html", None, status, csrf=nonce, next=target,
                          error=str(exc), name=form.get("name", ""))  # fmt: skip
        response = RedirectResponse(target, 303)
        _cookie(response, request, SESSION_COOKIE, secret, 12 * 3600)
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    @router.post("/logout")
    def logout(request: Request, viewer: ViewerDep, form: FormDep, session: SessionDep) -> Response:
        _changer(viewer, form, READ)
        secret = request.cookies.get(SESSION_COOKIE, "")
        token = session.scalar(
            select(m.ApiToken).where(m.ApiToken.token_hash == secret_hash(secret))
        )
        if token is not None:
            session.delete(token)
        fleet.audit(session, viewer.who.actor, "user.logout", viewer.who.actor, via="console")
        response = RedirectResponse(f"{PREFIX}/login", 303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    # --- dashboard ------------------------------------------------------------------------

    @router.get("/")
    def dashboard(request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
        now = time.time()
        fresh = now - 3 * server.settings.checkin_interval
        hosts = session.scalar(select(func.count()).select_from(m.Host)) or 0
        online = session.scalar(select(func.count()).where(m.Host.last_seen >= fresh)) or 0
        protected = session.scalar(
            select(func.count()).select_from(
                select(m.ProcessPatch.host_id, m.ProcessPatch.pid)
                .where(m.ProcessPatch.state == "applied")
                .distinct()
                .subquery()
            )
        ) or 0
        series = blocked_series(session, now=now)
        patches = session.scalar(
            select(func.count(func.distinct(m.Patch.patch_id))).where(m.Patch.revoked.is_(False))
        ) or 0
        return render(
            request, "dashboard.html", viewer, hosts=hosts, online=online, protected=protected,
            patches=patches, blocked=sum(n for _, n in series), chart=chart_svg(series),
            events=fleet.events(session, limit=10), names=_host_names(session),
        )  # fmt: skip

    # --- hosts ----------------------------------------------------------------------------

    @router.get("/hosts")
    def hosts(
        request: Request, viewer: ViewerDep, session: SessionDep, page: int = 1
    ) -> Response:
        page = max(1, min(page, s.INT_MAX // HOSTS_PER_PAGE))
        rows, total = fleet.hosts_out(
            session, offset=(page - 1) * HOSTS_PER_PAGE, limit=HOSTS_PER_PAGE
        )
        pages = max(1, -(-total // HOSTS_PER_PAGE))
        return render(request, "hosts.html", viewer, hosts=rows, total=total, page=page,
                      pages=pages)  # fmt: skip

    @router.get("/hosts/{host_id}")
    def host(host_id: int, request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
        try:
            found = fleet.host(session, host_id)
        except fleet.NotFound as exc:
            return failed(request, viewer, exc)
        out = fleet.host_out(session, found, detail=True)
        effective, relevant, revoked = fleet.host_policy(
            server.catalogues.current(session), found.group_id,
            host_modules(session, found.id),
        )  # fmt: skip
        modules = session.scalars(
            select(m.HostModule).where(m.HostModule.host_id == host_id).order_by(m.HostModule.name)
        ).all()
        return render(
            request, "host.html", viewer, host=out,
            policy=fleet.policy_out(effective, [r.patch_id for r in relevant]),
            relevant=relevant, revoked=revoked, modules=modules,
            events=fleet.events(session, host_id=host_id, limit=20),
        )  # fmt: skip

    # --- groups and policies ----------------------------------------------------------------

    @router.get("/groups")
    def groups(request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
        rows = [
            (fleet.group_out(session, g), g.path.count("/") - (g.path == "/"))
            for g in session.scalars(select(m.Group).order_by(m.Group.path))
        ]
        return render(request, "groups.html", viewer, groups=rows)

    @router.post("/groups")
    def create_group(
        request: Request, viewer: ViewerDep, form: FormDep, session: SessionDep
    ) -> Response:
        _changer(viewer, form, ADMIN)
        state = form.get("default_state") or None
        try:
            if state not in (None, *m.STATES):
                raise fleet.Invalid(f"default state {state!r}: enabled, disabled or inherit")
            g = fleet.create_group(session, form.get("path", ""), state, viewer.who.actor)
        except ServerError as exc:
            return failed(request, viewer, exc)
        return _back(f"/groups/policy?path={quote(g.path)}", f"group {g.path} created")

    @router.get("/groups/policy")
    def group(path: str, request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
        try:
            g = fleet.group(session, path)
        except ServerError as exc:
            return failed(request, viewer, exc)
        ids = _patch_ids(session)
        members = select(m.Host).where(m.Host.group_id == g.id).order_by(m.Host.id)
        return render(
            request, "group.html", viewer, group=fleet.group_out(session, g),
            effective=fleet.policy_out(fleet.effective_policy(session, g), ids),
            patch_ids=ids, hosts=session.scalars(members).all(),
        )  # fmt: skip

    @router.post("/groups/policy")
    def change_policy(
        request: Request, viewer: ViewerDep, form: FormDep, session: SessionDep
    ) -> Response:
        """One change to a group's policy: `action` is default | patch | exclude |
        unexclude; the rest of what the group sets stays."""
        _changer(viewer, form)
        path = form.get("path", "")
        action = form.get("action", "")
        try:
            g = fleet.group(session, path)
            policy = _group_form_policy(g)
            if action == "default":
                policy["default_state"] = _state(form.get("state", ""))
                done = f"default state of {g.path}: {policy['default_state'] or 'inherited'}"
            elif action == "patch":
                patch_id = form.get("patch_id", "").strip()
                if not patch_id:
                    raise fleet.Invalid("which patch?")
                state = _state(form.get("state", ""))
                if state is None:
                    policy["patches"].pop(patch_id, None)
                else:
                    policy["patches"][patch_id] = state
                done = f"{patch_id} in {g.path}: {state or 'inherited'}"
            elif action == "exclude":
                policy["exclusions"].append({
                    "kind": form.get("kind", ""), "value": form.get("value", "").strip(),
                    "patch_id": form.get("patch_id", "").strip() or None,
                })  # fmt: skip
                done = f"exclusion added to {g.path}"
            elif action == "unexclude":
                index = int(form.get("index", "-1")) if form.get("index", "").isdigit() else -1
                if not 0 <= index < len(policy["exclusions"]):
                    raise fleet.Invalid("no such exclusion")
                policy["exclusions"].pop(index)
                done = f"exclusion removed from {g.path}"
            else:
                raise fleet.Invalid(f"unknown action {action!r}")
            _set_policy(session, g.path, policy, viewer.who.actor)
        except ServerError as exc:
            return failed(request, viewer, exc)
        back = form.get("back", "")
        if back.startswith("/patches"):
            return _back("/patches", done)
        return _back(f"/groups/policy?path={quote(g.path)}", done)

    # --- patches --------------------------------------------------------------------------

    @router.get("/patches")
    def patches(request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
        rows = [
            fleet.patch_out(session, p, counts=True)
            for p in session.scalars(select(m.Patch).order_by(m.Patch.patch_id, m.Patch.version))
        ]
        states: dict[str, list[tuple[str, str]]] = {}
        for g in session.scalars(select(m.Group).order_by(m.Group.path)):
            for x in g.patch_states:
                states.setdefault(x.patch_id, []).append((g.path, x.state))
        group_paths = list(session.scalars(select(m.Group.path).order_by(m.Group.path)))
        return render(request, "patches.html", viewer, patches=rows, states=states,
                      groups=group_paths)  # fmt: skip

    @router.post("/patches/revoke")
    def revoke(request: Request, viewer: ViewerDep, form: FormDep, session: SessionDep) -> Response:
        _changer(viewer, form)
        patch_id = form.get("patch_id", "")
        version_text = form.get("version", "")
        try:
            version = int(version_text) if version_text.isdigit() else None
            if version_text and version is None:
                raise fleet.Invalid(f"version {version_text!r}: a number, or empty for all")
            rows = fleet.revoke(session, server.repository, patch_id, version, viewer.who.actor)
        except ServerError as exc:
            return failed(request, viewer, exc)
        versions = ", ".join(f"v{r.version}" for r in rows)
        return _back("/patches", f"{patch_id} {versions} revoked")

    # --- events and the audit log -------------------------------------------------------------

    @router.get("/events")
    def events(
        request: Request,
        viewer: ViewerDep,
        session: SessionDep,
        kind: str = "",
        host: str = "",
        patch: str = "",
        before: str = "",
    ) -> Response:
        host_id = int(host) if host.isdigit() and int(host) <= s.INT_MAX else None
        after = int(before) if before.isdigit() and int(before) <= s.INT_MAX else None
        rows = fleet.events(
            session, host_id=host_id, kind=kind or None, patch_id=patch or None,
            before=after, limit=EVENTS_PER_PAGE,
        )  # fmt: skip
        older = None
        if len(rows) == EVENTS_PER_PAGE:
            older = "?" + urlencode({"kind": kind, "host": host, "patch": patch,
                                     "before": rows[-1].id})  # fmt: skip
        names = _host_names(session)
        context: dict[str, Any] = dict(events=rows, names=names, kind=kind, host=host, patch=patch,
                       kinds=_event_kinds(), hosts=sorted(names.items()),
                       patch_ids=_patch_ids(session), older=older,
                       newest=after is None)  # fmt: skip
        if request.headers.get("hx-request") == "true":  # htmx: the table alone
            return render(request, "_events.html", viewer, **context)
        return render(request, "events.html", viewer, **context)

    @router.get("/audit")
    def audit(request: Request, viewer: ViewerDep, session: SessionDep) -> Response:
        if not viewer.can_audit:
            raise Forbidden(f"{viewer.who.actor} may not read the audit log (admin or auditor)")
        return render(request, "audit.html", viewer,
                      entries=fleet.audit_entries(session, limit=500))  # fmt: skip

    app.include_router(router)

    @app.get(PREFIX, include_in_schema=False)
    def console_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", 307)

    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")


def _state(text: str) -> str | None:
    if text in ("", "inherit"):
        return None
    if text not in m.STATES:
        raise fleet.Invalid(f"state {text!r}: enabled, disabled or inherit")
    return text


def _host_names(session: Session) -> dict[int, str]:
    return {i: n for i, n in session.execute(select(m.Host.id, m.Host.name))}


def _event_kinds() -> list[str]:
    from typing import get_args

    return list(get_args(s.EventKind))


def _safe_next(target: str) -> str:
    """Only a console path: never another site (an open redirect)."""
    if target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/"

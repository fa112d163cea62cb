"""The web console: server-rendered HTML pages under /console (Jinja2 templates, htmx
served from this package, a hand-written stylesheet; no build step, no CDN), a
router per page family: `session` (login, logout), `dashboard`, `hosts`, `groups`
(and policies), `patches`, `events` (and the audit log). What they share:
`console.pages`.

Who may do what follows the API's matrix (`server.api`): every role reads; admin and
operator change policies and revoke patches; admin creates groups; the audit log is
for admin and auditor. Changes go through `server.fleet`, as the API's do, and so
write the same audit entries.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from micropatch.server.console.pages import (
    PREFIX,
    SERVER_DIR,
    Forbidden,
    LoginNeeded,
    render,
)


def mount_console(app: FastAPI) -> None:
    """Add the console's routes, its static files and its error pages to `app`."""
    from urllib.parse import quote

    from micropatch.server.console import dashboard, events, groups, hosts, patches, session

    @app.exception_handler(LoginNeeded)
    async def _login_needed(_request: Request, exc: LoginNeeded) -> Response:
        return RedirectResponse(f"{PREFIX}/login?next={quote(exc.path)}", 303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return render(request, "error.html", None, 403, title="Forbidden", message=exc.message)

    for module in (session, dashboard, hosts, groups, patches, events):
        app.include_router(module.router)

    @app.get(PREFIX, include_in_schema=False)
    def console_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", 307)

    app.mount(f"{PREFIX}/static", StaticFiles(directory=SERVER_DIR / "static"),
              name="console-static")  # fmt: skip

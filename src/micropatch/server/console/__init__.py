"""The web console: server-rendered HTML pages under /console (Jinja2 templates, htmx
served from this package, a hand-written stylesheet; no build step, no CDN), a
router per page family: `session` (login, logout), `dashboard`, `hosts`, `groups`
(and policies), `patches`, `events` (and the audit log). What they share:
`console.pages`.

Who may do what follows the API's matrix (`server.api`): every role reads; admin and
operator change policies and revoke patches; admin creates groups; the audit log is
for admin and auditor; users, API tokens, enrollment tokens, moving and retiring
hosts are for admin. Changes go through `server.fleet`, as the API's do, and so
write the same audit entries.

`/` leads to the console; an unknown console URL answers an HTML page (404), the
API's still JSON; `/docs` is the API's documentation served from this package.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from micropatch.server.console.pages import (
    PREFIX,
    SERVER_DIR,
    Forbidden,
    LoginNeeded,
    find_viewer,
    render,
)


def mount_console(app: FastAPI) -> None:
    """Add the console's routes, its static files and its error pages to `app`."""
    from urllib.parse import quote

    from micropatch.server.console import (
        apidocs,
        credentials,
        dashboard,
        enrollment,
        events,
        groups,
        hosts,
        patches,
        session,
        users,
    )

    @app.exception_handler(LoginNeeded)
    async def _login_needed(_request: Request, exc: LoginNeeded) -> Response:
        return RedirectResponse(f"{PREFIX}/login?next={quote(exc.path)}", 303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return render(request, "error.html", None, 403, title="Forbidden", message=exc.message)

    async def _not_found(request: Request) -> Response:
        viewer = await anyio.to_thread.run_sync(find_viewer, request)
        return render(request, "error.html", viewer, 404, title="Not found",
                      message=f"There is no console page {request.url.path}.")  # fmt: skip

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code != 404 or not request.url.path.startswith(f"{PREFIX}/"):
            return await http_exception_handler(request, exc)
        return await _not_found(request)

    api_invalid = app.exception_handlers[RequestValidationError]

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        """A console URL whose path does not parse (/console/hosts/abc) is not a page."""
        if request.url.path.startswith(f"{PREFIX}/") and request.method == "GET":
            return await _not_found(request)
        answer = api_invalid(request, exc)
        return answer if isinstance(answer, Response) else await answer

    for module in (session, dashboard, hosts, groups, patches, events, users, credentials,
                   enrollment):  # fmt: skip
        app.include_router(module.router)

    @app.get(PREFIX, include_in_schema=False)
    def console_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", 307)

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(f"{PREFIX}/", 307)

    apidocs.mount_docs(app)

    app.mount(f"{PREFIX}/static", StaticFiles(directory=SERVER_DIR / "static"),
              name="console-static")  # fmt: skip

"""The fleet server as an ASGI app (FastAPI): `create_app(settings)`; `micropatch server
run` serves it under uvicorn. The API is under /api/v1 (`server.api`, a router per
resource), the web console under /console (`server.console`), and the TUF
repository's public files under /repository (a web server or CDN can serve them
instead).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, IntegrityError

from micropatch import __version__
from micropatch.errors import MicropatchError, RepositoryError, ServerError
from micropatch.server import errors
from micropatch.server.api import PREFIX, routers
from micropatch.server.capacity import Capacity
from micropatch.server.context import PARENT_VARIABLE, Server, Settings
from micropatch.server.database import POOL_SIZE
from micropatch.server.fleet.patches import reconcile
from micropatch.server.limits import BodyLimit
from micropatch.server.push import follow
from micropatch.server.seen import keep

log = logging.getLogger(__name__)
THREADS = POOL_SIZE  # requests served at once by one server process

_STATUS = {
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Invalid: 422,
    errors.Unauthorized: 401,
    errors.TooManyAttempts: 429,
    errors.Busy: 503,
    RepositoryError: 409,
}


def _document_refusals(app: FastAPI) -> None:
    """A 422 is either FastAPI's validation error (`detail`: a list of problems) or
    one of ours (`errors.Invalid`, `detail`: one sentence); the schema says both."""
    make = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = make()
            error = schema.get("components", {}).get("schemas", {}).get("HTTPValidationError")
            if error is not None:
                listed = error["properties"]["detail"]
                error["properties"]["detail"] = {
                    "anyOf": [listed, {"type": "string"}],
                    "title": "Detail",
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_environment() -> FastAPI:
    """The app of one of `server run --workers N`'s processes (a uvicorn factory). It
    dies with the `server run` that started it (PR_SET_PDEATHSIG; and at once if that
    one is gone already), so a parent killed by SIGKILL leaves no worker on the port."""
    _die_with_parent()
    parent = os.environ.get(PARENT_VARIABLE)
    if parent and os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGKILL)
    return create_app(Settings.from_environment())


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills this process when its parent
    exits. (The server imports nothing of the process layer: test_boundaries.py.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def create_app(settings: Settings, *, server: Server | None = None) -> FastAPI:
    """The API of a server with these settings (the database is migrated first)."""
    server = server or Server(settings)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # As many request threads as database connections: none waits for one.
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        # Before the first request: the repository follows the database again, should a
        # publish or a revocation have been cut short (fleet/patches.py).
        await anyio.to_thread.run_sync(reconcile, server.database, server.repository)
        thread = threading.Thread(
            target=_keep_fresh, args=(server, stop), name="repository-refresh", daemon=True
        )
        thread.start()
        # Held check-ins (server/push.py) woken by the policy revision, whichever
        # process or command changed it.
        server.push.start()
        follower = threading.Thread(
            target=follow, args=(server, asyncio.get_running_loop(), stop), name="push-follow",
            daemon=True,
        )  # fmt: skip
        follower.start()
        seen = threading.Thread(
            target=keep, args=(server.seen, server.database, stop), name="seen", daemon=True
        )
        seen.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            follower.join(timeout=5)
            seen.join(timeout=5)

    app = FastAPI(
        title="micropatch fleet server",
        version=__version__,
        lifespan=lifespan,
        description="Enrollment, check-in, publishing, groups and policies (docs/server.md).",
        docs_url=None,  # served from the package, not a CDN: console/apidocs.py
        redoc_url=None,
    )
    app.state.server = server
    app.add_middleware(BodyLimit)  # every body limited while it is read
    app.add_middleware(Capacity, push=server.push)  # outermost: a 503 costs nothing
    _handle_errors(app)

    @app.get(f"{PREFIX}/health", tags=["server"])
    async def health() -> dict[str, str]:
        """Answered on the event loop: it needs no thread, so it answers under any load."""
        return {"status": "ok", "version": __version__}

    for router in routers():
        app.include_router(router)

    from micropatch.server.console import mount_console

    mount_console(app)

    @app.get("/", include_in_schema=False)
    def landing() -> RedirectResponse:
        """The server's address opened in a browser: the console (its login page)."""
        return RedirectResponse("/console/", 307)

    _document_refusals(app)
    app.mount(
        "/repository",
        StaticFiles(directory=server.repository.public, check_dir=False),
        name="repository",
    )
    return app


def _handle_errors(app: FastAPI) -> None:
    @app.exception_handler(DataError)
    async def _data_error(_request: Request, exc: DataError) -> JSONResponse:
        # A value the database cannot store or compare (PostgreSQL: a NUL in a query
        # parameter, an out-of-range number): the request's fault, not the server's.
        return JSONResponse(
            {"detail": f"a value cannot be used: {exc.orig or exc}"}, status_code=422
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Without the offending input: it may be huge, or not JSON (NaN) at all.
        found = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": found}, status_code=422)

    @app.exception_handler(IntegrityError)
    async def _integrity_error(_request: Request, exc: IntegrityError) -> JSONResponse:
        # Two requests raced to create the same thing (a group, a user, a version):
        # the loser is told, as if it had come second.
        return JSONResponse(
            {"detail": "conflicts with a change made at the same time; retry"}, status_code=409
        )

    @app.exception_handler(ServerError)
    async def _server_error(_request: Request, exc: ServerError) -> JSONResponse:
        status = next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), 400)
        headers = {}
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


def _keep_fresh(server: Server, stop: threading.Event) -> None:
    """Re-sign the online roles before they expire, for as long as the server runs;
    between two, check that the repository still lists what the database holds."""
    while True:
        try:
            done = server.repository.refresh()
            if done:
                log.info("re-signed %s", ", ".join(done))
        except MicropatchError as exc:
            log.error("cannot refresh the repository: %s", exc)
        if stop.wait(server.settings.refresh_every):
            return
        reconcile(server.database, server.repository)

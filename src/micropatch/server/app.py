"""The HTTP API (FastAPI): `create_app(settings)`; `micropatch server run` serves it
under uvicorn. Every route is under /api/v1; the TUF repository's public files are
also served under /repository (a web server or CDN can serve them instead).

Authentication is a bearer secret (`server.auth`). Authorisation:

| who | may |
|---|---|
| admin | everything |
| operator | read; publish and revoke patches; set group policies |
| auditor | read (patches, groups, hosts, events, the audit log) |
| host credential | check in; read its own host, policy and events, nothing else |

The web console (`server.console`, under /console) follows the same matrix.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from micropatch import __version__
from micropatch.errors import MicropatchError, RepositoryError, ServerError
from micropatch.server import fleet
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.auth import (
    ADMIN,
    HOST_PREFIX,
    PUBLISH,
    READ,
    LoginThrottle,
    Passwords,
    Principal,
)
from micropatch.server.catalogue import Catalogues
from micropatch.server.checkin import check_in, host_modules
from micropatch.server.database import POOL_SIZE, Database, database_url
from micropatch.server.repository import Repository

log = logging.getLogger(__name__)
REPOSITORY_DIR = "repository"
THREADS = POOL_SIZE  # requests served at once by one server process
MAX_ARTIFACT = 64 << 20


@dataclass
class Settings:
    """How a server runs: where its data is, which database, how often agents check in."""

    data_dir: Path
    database: str | None = None  # a URL; None: SQLite in data_dir
    checkin_interval: int = 60
    repository_url: str | None = None  # what agents fetch from; None: this server's /repository
    refresh_every: float = 600.0  # seconds between re-signing checks of the online roles

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "data_dir": str(self.data_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        return cls(**{**data, "data_dir": Path(data["data_dir"])})


SETTINGS_VARIABLE = "MICROPATCH_SERVER_SETTINGS"  # how `server run --workers N` passes them


def app_from_environment() -> FastAPI:
    """The app of one of `server run --workers N`'s processes (a uvicorn factory)."""
    return create_app(Settings.from_json(json.loads(os.environ[SETTINGS_VARIABLE])))


class Server:
    """What a running server holds: the database, the repository, the password hasher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The repository first: a data directory without one fails before a database
        # is created in it.
        self.repository = Repository(settings.data_dir / REPOSITORY_DIR)
        self.database = Database(database_url(settings.data_dir, settings.database))
        self.passwords = Passwords()
        self.catalogues = Catalogues()
        self.logins = LoginThrottle()

    def repository_url(self, request: Request) -> str:
        if self.settings.repository_url:
            return self.settings.repository_url.rstrip("/")
        return str(request.base_url).rstrip("/") + "/repository"


_STATUS = {
    fleet.NotFound: 404,
    fleet.Conflict: 409,
    fleet.Invalid: 422,
    fleet.Unauthorized: 401,
    fleet.TooManyAttempts: 429,
    RepositoryError: 409,
}


# --- dependencies: a session per request, and who is asking -------------------------------


def _db(request: Request) -> Iterator[Session]:
    # Committed before the response is sent (scope="function"): a client that saw
    # a success can read what it wrote.
    server: Server = request.app.state.server
    with server.database.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(_db, scope="function")]
HostId = Annotated[int, PathParam(ge=1, le=s.INT_MAX)]
_bearer = HTTPBearer(auto_error=False)


async def _secret(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The bearer secret (checked against the database by `_authenticated`)."""
    if credentials is None:
        raise HTTPException(
            401, "missing credentials: send Authorization: Bearer TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    return credentials.credentials


Secret = Annotated[str, Depends(_secret)]


def _authenticated(session: Session, secret: str) -> Principal:
    try:
        return fleet.authenticate(session, secret)
    except fleet.Unauthorized as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


def _principal(session: SessionDep, secret: Secret) -> Principal:
    return _authenticated(session, secret)


def _role(allowed: frozenset[str]) -> Callable[[Principal], Principal]:
    def check(who: Annotated[Principal, Depends(_principal)]) -> Principal:
        if who.kind != "user" or who.role not in allowed:
            raise HTTPException(
                403, f"{who.actor} may not do this (needs the role {' or '.join(sorted(allowed))})"
            )
        return who

    return check


Anyone = Annotated[Principal, Depends(_principal)]
Reader = Annotated[Principal, Depends(_role(READ))]
Publisher = Annotated[Principal, Depends(_role(PUBLISH))]
AuditReader = Annotated[Principal, Depends(_role(ADMIN | {"auditor"}))]
Administrator = Annotated[Principal, Depends(_role(ADMIN))]


def host_access(who: Principal, host_id: int) -> None:
    """A host reads only its own data; users with a role read every host's."""
    if who.kind == "host":
        if who.id != host_id:
            raise HTTPException(403, f"{who.actor} may read only its own data")
    elif who.role not in READ:
        raise HTTPException(403, f"{who.actor} may not read hosts")


def this_host(who: Principal) -> None:
    if who.kind != "host":
        raise HTTPException(403, "only an enrolled host checks in (a host credential)")


def create_app(settings: Settings, *, server: Server | None = None) -> FastAPI:
    """The API of a server with these settings (the database is migrated first)."""
    server = server or Server(settings)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # As many request threads as database connections: none waits for one.
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        thread = threading.Thread(
            target=_keep_fresh, args=(server, stop), name="repository-refresh", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    app = FastAPI(
        title="micropatch fleet server",
        version=__version__,
        lifespan=lifespan,
        description="Enrollment, check-in, publishing, groups and policies (docs/server.md).",
    )
    app.state.server = server

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
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

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
        if isinstance(exc, fleet.TooManyAttempts):
            headers["Retry-After"] = str(exc.retry_after)
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    api = "/api/v1"

    @app.get(f"{api}/health", tags=["server"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    # --- users --------------------------------------------------------------------

    @app.post(f"{api}/auth/token", tags=["users"], response_model=s.TokenOut)
    def token(body: s.TokenRequest, session: SessionDep) -> s.TokenOut:
        """A 12-hour API token for a user name and password."""
        user, secret = fleet.login(
            session, server.passwords, body.name, body.password, throttle=server.logins
        )
        return s.TokenOut(token=secret, name=user.name, role=user.role)

    @app.get(f"{api}/users", tags=["users"], response_model=list[s.UserOut])
    def users(_who: Administrator, session: SessionDep) -> list[s.UserOut]:
        return [
            s.UserOut(id=u.id, name=u.name, role=u.role, created=u.created)
            for u in session.scalars(select(m.User).order_by(m.User.name))
        ]

    @app.post(f"{api}/users", tags=["users"], response_model=s.UserCreated, status_code=201)
    def create_user(body: s.UserIn, who: Administrator, session: SessionDep) -> s.UserCreated:
        user, secret = fleet.create_user(
            session, server.passwords, body.name, body.role, body.password, who.actor
        )
        return s.UserCreated(
            id=user.id, name=user.name, role=user.role, created=user.created, token=secret
        )

    @app.post(
        f"{api}/enrollment-tokens",
        tags=["hosts"],
        response_model=s.EnrollmentTokenOut,
        status_code=201,
    )
    def enrollment_token(
        body: s.EnrollmentTokenIn, who: Administrator, session: SessionDep
    ) -> s.EnrollmentTokenOut:
        secret, group, expires = fleet.create_enrollment_token(
            session, body.group, body.expires_in, who.actor
        )
        return s.EnrollmentTokenOut(token=secret, group=group.path, expires=expires)

    # --- the agent protocol ---------------------------------------------------------

    @app.post(f"{api}/enroll", tags=["agent"], response_model=s.EnrollResponse, status_code=201)
    def enroll(body: s.EnrollRequest, request: Request, session: SessionDep) -> s.EnrollResponse:
        """Trade a one-time enrollment token for the host's credential."""
        host, credential = fleet.enroll(session, body)
        return s.EnrollResponse(
            host_id=host.id,
            credential=credential,
            group=host.group.path,
            checkin_interval=settings.checkin_interval,
            repository=server.repository_url(request),
        )

    @app.post(f"{api}/checkin", tags=["agent"], response_model=s.CheckinResponse)
    def checkin(body: s.CheckinRequest, secret: Secret, request: Request) -> Response:
        """Inventory, applied state and new events in; policy and relevant patches out."""
        # Every host, every interval: the session and the authentication are taken
        # here, not as dependencies (FastAPI runs each sync dependency in a thread of
        # its own, a hop that cost more than the database work), and the answer is
        # serialised once.
        with server.database.session() as session:
            if not secret.startswith(HOST_PREFIX):
                this_host(_authenticated(session, secret))  # 401, or 403 for a user
            try:
                done = check_in(session, secret, body)
            except fleet.Unauthorized as exc:
                raise HTTPException(
                    401, str(exc), headers={"WWW-Authenticate": "Bearer"}
                ) from None
            effective, relevant, revoked = fleet.host_policy(
                server.catalogues.current(session, done.revision), done.group_id, done.modules
            )
        answer = s.CheckinResponse(
            host_id=done.host_id,
            group=done.group,
            checkin_interval=settings.checkin_interval,
            repository=server.repository_url(request),
            policy=fleet.policy_out(effective, [r.patch_id for r in relevant]),
            patches=relevant,
            revoked=revoked,
            events_accepted=done.events_accepted,
            inventory_digest=done.inventory_digest,
            ignored=body.ignored[:20],
        )
        return Response(answer.model_dump_json(), media_type="application/json")

    # --- patches ------------------------------------------------------------------

    @app.get(f"{api}/patches", tags=["patches"], response_model=list[s.PatchOut])
    def patches(_who: Reader, session: SessionDep, revoked: bool | None = None) -> list[s.PatchOut]:
        query = select(m.Patch).order_by(m.Patch.patch_id, m.Patch.version)
        if revoked is not None:
            query = query.where(m.Patch.revoked.is_(revoked))
        return [fleet.patch_out(session, row, counts=True) for row in session.scalars(query)]

    @app.get(f"{api}/patches/{{patch_id}}", tags=["patches"], response_model=list[s.PatchOut])
    def patch_versions(patch_id: str, _who: Reader, session: SessionDep) -> list[s.PatchOut]:
        rows = session.scalars(
            select(m.Patch).where(m.Patch.patch_id == patch_id).order_by(m.Patch.version)
        ).all()
        if not rows:
            raise fleet.NotFound(f"no patch {patch_id!r}")
        return [fleet.patch_out(session, row, counts=True) for row in rows]

    @app.post(
        f"{api}/patches",
        tags=["patches"],
        response_model=s.PatchOut,
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
                "description": "the signed artifact file (.mpatch), as is",
            }
        },
    )
    def publish(
        data: Annotated[bytes, Depends(_artifact_body)], who: Publisher, session: SessionDep
    ) -> JSONResponse:
        """Publish a signed artifact: checked (no compiler runs), recorded, added to the
        TUF targets. The same artifact again: 200 and no change."""
        row, created = fleet.publish(session, server.repository, data, who.actor)
        out = fleet.patch_out(session, row)
        return JSONResponse(out.model_dump(mode="json"), status_code=201 if created else 200)

    @app.post(
        f"{api}/patches/{{patch_id}}/revoke", tags=["patches"], response_model=list[s.PatchOut]
    )
    def revoke(
        patch_id: str, body: s.RevokeIn, who: Publisher, session: SessionDep
    ) -> list[s.PatchOut]:
        """Revoke a version (or all): removed from the repository; agents remove it live."""
        rows = fleet.revoke(session, server.repository, patch_id, body.version, who.actor)
        return [fleet.patch_out(session, row) for row in rows]

    # --- groups and policies ----------------------------------------------------------

    @app.get(f"{api}/groups", tags=["groups"], response_model=list[s.GroupOut])
    def groups(_who: Reader, session: SessionDep) -> list[s.GroupOut]:
        return [
            fleet.group_out(session, g)
            for g in session.scalars(select(m.Group).order_by(m.Group.path))
        ]

    @app.post(f"{api}/groups", tags=["groups"], response_model=s.GroupOut, status_code=201)
    def create_group(body: s.GroupIn, who: Administrator, session: SessionDep) -> s.GroupOut:
        g = fleet.create_group(session, body.path, body.default_state, who.actor)
        return fleet.group_out(session, g)

    @app.get(f"{api}/groups/{{path:path}}", tags=["groups"], response_model=s.GroupOut)
    def get_group(path: str, _who: Reader, session: SessionDep) -> s.GroupOut:
        return fleet.group_out(session, fleet.group(session, path))

    @app.delete(f"{api}/groups/{{path:path}}", tags=["groups"], status_code=204)
    def delete_group(path: str, who: Administrator, session: SessionDep) -> None:
        fleet.delete_group(session, path, who.actor)

    @app.get(f"{api}/policies/{{path:path}}", tags=["groups"], response_model=s.GroupPolicyOut)
    def get_policy(path: str, _who: Reader, session: SessionDep) -> s.GroupPolicyOut:
        """What the group sets, and the effective policy after inheritance, explained."""
        g = fleet.group(session, path)
        return s.GroupPolicyOut(
            group=fleet.group_out(session, g),
            effective=fleet.policy_out(fleet.effective_policy(session, g)),
        )

    @app.put(f"{api}/policies/{{path:path}}", tags=["groups"], response_model=s.GroupPolicyOut)
    def put_policy(
        path: str, body: s.PolicyIn, who: Publisher, session: SessionDep
    ) -> s.GroupPolicyOut:
        """Replace what the group sets (unset fields: inherited from the parent)."""
        g = fleet.set_policy(session, path, body, who.actor)
        session.flush()
        return s.GroupPolicyOut(
            group=fleet.group_out(session, g),
            effective=fleet.policy_out(fleet.effective_policy(session, g)),
        )

    # --- hosts ----------------------------------------------------------------------

    @app.get(f"{api}/hosts", tags=["hosts"], response_model=list[s.HostOut])
    def hosts(
        _who: Reader,
        session: SessionDep,
        response: Response,
        group: str | None = None,
        offset: Annotated[int, Query(ge=0, le=s.INT_MAX)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> list[s.HostOut]:
        """Hosts by id, a page at a time (`offset`, `limit`); the header X-Total-Count
        says how many there are."""
        group_id = None if group is None else fleet.group(session, group).id
        rows, total = fleet.hosts_out(session, group_id=group_id, offset=offset, limit=limit)
        response.headers["X-Total-Count"] = str(total)
        return rows

    @app.get(f"{api}/hosts/{{host_id}}", tags=["hosts"], response_model=s.HostOut)
    def get_host(host_id: HostId, who: Anyone, session: SessionDep) -> s.HostOut:
        host_access(who, host_id)
        return fleet.host_out(session, fleet.host(session, host_id), detail=True)

    @app.get(f"{api}/hosts/{{host_id}}/policy", tags=["hosts"], response_model=s.HostPolicyOut)
    def get_host_policy(host_id: HostId, who: Anyone, session: SessionDep) -> s.HostPolicyOut:
        """The host's effective policy: each relevant patch's state and which group
        decided it."""
        host_access(who, host_id)
        host = fleet.host(session, host_id)
        effective, relevant, _ = fleet.host_policy(
            server.catalogues.current(session), host.group_id, host_modules(session, host.id)
        )
        return s.HostPolicyOut(
            host_id=host.id,
            effective=fleet.policy_out(effective, [r.patch_id for r in relevant]),
            patches=relevant,
        )

    @app.put(f"{api}/hosts/{{host_id}}/group", tags=["hosts"], response_model=s.HostOut)
    def move_host(
        host_id: HostId, body: s.HostGroupIn, who: Administrator, session: SessionDep
    ) -> s.HostOut:
        host = fleet.host(session, host_id)
        fleet.move_host(session, host, body.group, who.actor)
        return fleet.host_out(session, host)

    @app.delete(f"{api}/hosts/{{host_id}}", tags=["hosts"], status_code=204)
    def delete_host(host_id: HostId, who: Administrator, session: SessionDep) -> None:
        """Forget a host (decommissioned, or its credential leaked): its credential stops
        working; it must enroll again with a new token."""
        fleet.delete_host(session, fleet.host(session, host_id), who.actor)

    # --- events and audit -------------------------------------------------------------

    @app.get(f"{api}/events", tags=["events"], response_model=list[s.EventOut])
    def events(
        who: Anyone,
        session: SessionDep,
        host_id: Annotated[int | None, Query(ge=1, le=s.INT_MAX)] = None,
        kind: str | None = None,
        patch_id: str | None = None,
        since: float | None = None,
        before: Annotated[int | None, Query(ge=1, le=s.INT_MAX)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> list[s.EventOut]:
        """Events, newest first; the next page: `before` the last one's id. A host
        credential sees only its own."""
        if who.kind == "host":
            if host_id is not None and host_id != who.id:
                raise HTTPException(403, f"{who.actor} may read only its own data")
            host_id = who.id
        elif who.role not in READ:
            raise HTTPException(403, f"{who.actor} may not read events")
        rows = fleet.events(
            session, host_id=host_id, kind=kind, patch_id=patch_id, since=since, before=before,
            limit=limit,
        )
        return [
            s.EventOut(id=e.id, host_id=e.host_id, kind=e.kind, time=e.time, pid=e.pid,
                       exe=e.exe, patch_id=e.patch_id, version=e.version, module=e.module,
                       message=e.message, data=e.data)
            for e in rows
        ]  # fmt: skip

    @app.get(f"{api}/audit", tags=["events"], response_model=list[s.AuditOut])
    def audit_log(
        _who: AuditReader,
        session: SessionDep,
        since: float | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> list[s.AuditOut]:
        """Every change, by whom, newest first (admin and auditor)."""
        return [
            s.AuditOut(id=a.id, time=a.time, actor=a.actor, action=a.action, subject=a.subject,
                       details=a.details)
            for a in fleet.audit_entries(session, since=since, limit=limit)
        ]  # fmt: skip

    # --- the web console (server.console): HTML pages under /console -------------------

    from micropatch.server.console import mount_console

    mount_console(app, server)

    # --- the repository's static files -------------------------------------------------

    from fastapi.staticfiles import StaticFiles

    app.mount(
        "/repository",
        StaticFiles(directory=server.repository.public, check_dir=False),
        name="repository",
    )
    return app


async def _artifact_body(request: Request) -> bytes:
    """The request's body, read up to the largest artifact size."""
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_ARTIFACT:
            raise HTTPException(413, f"an artifact is at most {MAX_ARTIFACT >> 20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _keep_fresh(server: Server, stop: threading.Event) -> None:
    """Re-sign the online roles before they expire, for as long as the server runs."""
    while True:
        try:
            done = server.repository.refresh()
            if done:
                log.info("re-signed %s", ", ".join(done))
        except MicropatchError as exc:
            log.error("cannot refresh the repository: %s", exc)
        if stop.wait(server.settings.refresh_every):
            return

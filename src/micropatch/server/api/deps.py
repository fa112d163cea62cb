"""What the API's routes depend on: the server, the bearer secret, and who is asking
with which role. Authenticating reads the database in a transaction of its own, in
its own thread; the route then opens its own (docs in `server.api`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from micropatch.server import schemas as s
from micropatch.server.auth import ADMIN, PUBLISH, READ, Principal
from micropatch.server.context import Server, reached
from micropatch.server.errors import Unauthorized
from micropatch.server.fleet import users

ServerDep = Annotated[Server, Depends(reached)]
HostId = Annotated[int, PathParam(ge=1, le=s.INT_MAX)]
_bearer = HTTPBearer(auto_error=False)


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


async def _secret(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The bearer secret (checked against the database by `_principal`)."""
    if credentials is None:
        raise unauthorized("missing credentials: send Authorization: Bearer TOKEN")
    return credentials.credentials


Secret = Annotated[str, Depends(_secret)]


def authenticated(server: Server, secret: str) -> Principal:
    """Who `secret` belongs to (a read of its own); 401 for nobody."""
    with server.database.reading() as session:
        try:
            return users.authenticate(session, secret)
        except Unauthorized as exc:
            raise unauthorized(str(exc)) from None


def _principal(server: ServerDep, secret: Secret) -> Principal:
    return authenticated(server, secret)


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

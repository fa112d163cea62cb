"""/api/v1/enrollment-tokens: one-time tokens a host enrolls with."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Administrator, ServerDep
from micropatch.server.fleet import hosts

router = APIRouter(prefix=PREFIX, tags=["hosts"])
TokenId = Annotated[int, PathParam(ge=1, le=s.INT_MAX)]


@router.post("/enrollment-tokens", response_model=s.EnrollmentTokenOut, status_code=201)
def create_enrollment_token(
    body: s.EnrollmentTokenIn, who: Administrator, server: ServerDep
) -> s.EnrollmentTokenOut:
    with server.database.session() as session:
        secret, row = hosts.create_enrollment_token(session, body.group, body.expires_in, who.actor)
        return s.EnrollmentTokenOut(
            id=row.id, token=secret, group=row.group.path, expires=row.expires
        )


@router.get("/enrollment-tokens", response_model=list[s.EnrollmentTokenInfo])
def list_enrollment_tokens(
    _who: Administrator, server: ServerDep, unused: bool = False
) -> list[s.EnrollmentTokenInfo]:
    """Enrollment tokens (without their secrets), the newest first; `unused=true`: only
    those no host used yet."""
    with server.database.reading() as session:
        return hosts.enrollment_tokens(session, unused=unused)


@router.delete("/enrollment-tokens/{token_id}", status_code=204)
def revoke_enrollment_token(token_id: TokenId, who: Administrator, server: ServerDep) -> None:
    """An enrollment token no host used yet stops working."""
    with server.database.session() as session:
        hosts.revoke_enrollment_token(session, token_id, who.actor)

"""/api/v1/enrollment-tokens: one-time tokens a host enrolls with."""

from __future__ import annotations

from fastapi import APIRouter

from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Administrator, ServerDep
from micropatch.server.fleet import hosts

router = APIRouter(prefix=PREFIX, tags=["hosts"])


@router.post("/enrollment-tokens", response_model=s.EnrollmentTokenOut, status_code=201)
def create_enrollment_token(
    body: s.EnrollmentTokenIn, who: Administrator, server: ServerDep
) -> s.EnrollmentTokenOut:
    with server.database.session() as session:
        secret, group, expires = hosts.create_enrollment_token(
            session, body.group, body.expires_in, who.actor
        )
        return s.EnrollmentTokenOut(token=secret, group=group.path, expires=expires)

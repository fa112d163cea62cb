"""/api/v1/enroll and /api/v1/checkin: what the agent calls (docs/server.md, "Agent
protocol")."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Secret, ServerDep, unauthorized
from micropatch.server.auth import HOST_PREFIX
from micropatch.server.checkin import check_in
from micropatch.server.errors import Unauthorized
from micropatch.server.fleet import groups, hosts, users

router = APIRouter(prefix=PREFIX, tags=["agent"])


@router.post("/enroll", response_model=s.EnrollResponse, status_code=201)
def enroll(body: s.EnrollRequest, request: Request, server: ServerDep) -> s.EnrollResponse:
    """Trade a one-time enrollment token for the host's credential."""
    with server.database.session() as session:
        host, credential = hosts.enroll(session, body)
        group = host.group.path
    return s.EnrollResponse(
        host_id=host.id,
        credential=credential,
        group=group,
        checkin_interval=server.settings.checkin_interval,
        repository=server.repository_url(request),
    )


@router.post("/checkin", response_model=s.CheckinResponse)
def checkin(
    body: s.CheckinRequest, secret: Secret, request: Request, server: ServerDep
) -> Response:
    """Inventory, applied state and new events in; policy and relevant patches out."""
    # Every host, every interval: the authentication is this transaction's first
    # statement, not a dependency (a thread hop of its own cost more than the database
    # work), and the answer is serialised once.
    with server.database.session() as session:
        if not secret.startswith(HOST_PREFIX):
            try:
                users.authenticate(session, secret)
            except Unauthorized as exc:
                raise unauthorized(str(exc)) from None
            raise HTTPException(403, "only an enrolled host checks in (a host credential)")
        try:
            done = check_in(session, secret, body)
        except Unauthorized as exc:
            raise unauthorized(str(exc)) from None
        effective, relevant, revoked = hosts.host_policy(
            server.catalogues.current(session, done.revision), done.group_id, done.modules
        )
    answer = s.CheckinResponse(
        host_id=done.host_id,
        group=done.group,
        checkin_interval=server.settings.checkin_interval,
        repository=server.repository_url(request),
        policy=groups.policy_out(effective, [r.patch_id for r in relevant]),
        patches=relevant,
        revoked=revoked,
        events_accepted=done.events_accepted,
        inventory_digest=done.inventory_digest,
        ignored=body.ignored[:20],
    )
    return Response(answer.model_dump_json(), media_type="application/json")

"""/api/v1/enroll and /api/v1/checkin: what the agent calls (docs/server.md, "Agent
protocol")."""

from __future__ import annotations

import hashlib
import json
import random
import time

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Secret, ServerDep, unauthorized
from micropatch.server.auth import HOST_PREFIX
from micropatch.server.catalogue import Catalogue, ModuleKey
from micropatch.server.checkin import CheckedIn, check_in, look_up, quiet
from micropatch.server.context import Server
from micropatch.server.errors import Unauthorized
from micropatch.server.fleet import groups, hosts, users

router = APIRouter(prefix=PREFIX, tags=["agent"])
QUEUED = 0.5  # of its wait, the longest a check-in waits for its turn to be stored
MEMO = 10_000  # answers kept per catalogue (`_shared`)


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
async def checkin(
    body: s.CheckinRequest, secret: Secret, request: Request, server: ServerDep
) -> Response:
    """Inventory, applied state and new events in; policy and relevant patches out. With
    `wait` and the answer's digest, held until that answer changes (server/push.py)."""
    push, wait = server.push, body.wait or 0
    started = time.monotonic()
    found = None
    if wait and quiet(body) and secret.startswith(HOST_PREFIX) and not push.full():
        async with push.turn(wait * QUEUED, read=True):  # nothing new: read it
            found = await anyio.to_thread.run_sync(_read, server, secret, body)
    if found is not None:
        done, catalogue = found
    elif wait and not push.full():  # an agent that waits: so may its check-in, for a turn
        async with push.turn(wait * QUEUED):
            done, catalogue = await anyio.to_thread.run_sync(_store, server, secret, body)
    else:
        done, catalogue = await anyio.to_thread.run_sync(_store, server, secret, body)
    repository = server.repository_url(request)
    answer = _answer(server, done, catalogue, repository, body.ignored[:20])
    # Held as long as the agent waits (less up to 10%, so that the holds spread), less
    # the time it took to get here: the agent's own timeout is its wait plus a margin.
    seconds = min(wait, answer.hold) * random.uniform(0.9, 1.0) - (time.monotonic() - started)
    if seconds > 0 and body.policy_digest == answer.policy_digest:
        newer: list[s.CheckinResponse] = []

        def changed(fresh: Catalogue) -> bool:
            newer[:] = [_answer(server, done, fresh, repository, body.ignored[:20])]
            return newer[0].policy_digest != answer.policy_digest

        if await push.hold(seconds, done.revision, changed, _gone(request)):
            answer = newer[0]
            answer.after = round(random.uniform(0, push.spread), 3)
    return Response(answer.model_dump_json(), media_type="application/json")


def _store(server: Server, secret: str, body: s.CheckinRequest) -> tuple[CheckedIn, Catalogue]:
    """The check-in's one transaction (in a request thread): the host's report stored,
    the catalogue of the revision it read."""
    # Every host, every interval: the authentication is this transaction's first
    # statement, not a dependency (a thread hop of its own cost more than the database
    # work).
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
        return done, server.catalogues.current(session, done.revision)


def _read(
    server: Server, secret: str, body: s.CheckinRequest
) -> tuple[CheckedIn, Catalogue] | None:
    """A held check-in with nothing to store but the time (server/seen.py): read,
    without a turn of the database's writer. None when it has something to store."""
    with server.database.reading() as session:
        try:
            done = look_up(session, secret, body)
        except Unauthorized as exc:
            raise unauthorized(str(exc)) from None
        if done is None:
            return None
        server.seen.saw(done.host_id, time.time())
        return done, server.catalogues.current(session, done.revision)


def _answer(
    server: Server, done: CheckedIn, catalogue: Catalogue, repository: str, ignored: list[str]
) -> s.CheckinResponse:
    policy, relevant, revoked, digest = _shared(catalogue, done.group_id, done.group, done.modules)
    interval = server.settings.checkin_interval
    return s.CheckinResponse(
        host_id=done.host_id,
        group=done.group,
        checkin_interval=interval,
        repository=repository,
        policy=policy,
        patches=relevant,
        revoked=revoked,
        events_accepted=done.events_accepted,
        inventory_digest=done.inventory_digest,
        ignored=ignored,
        policy_digest=digest,
        hold=server.push.offer(interval),
    )


Shared = tuple[s.EffectivePolicy, list[s.RelevantPatch], list[s.RevokedPatch], str]


def _shared(catalogue: Catalogue, group_id: int, group: str, modules: list[ModuleKey]) -> Shared:
    """What a host is told to do, and its digest: computed once per catalogue for the
    hosts of a group that have the same relevant and revoked patches (most of a
    fleet: a change that answers every held check-in computes it a few times, not
    once per host). At most MEMO of them are kept per catalogue."""
    live, revoked = catalogue.relevant(modules)
    key = (group_id, group, *(r.artifact_id for r in live), None, *(r.artifact_id for r in revoked))
    found: Shared | None = catalogue.memo.get(key)
    if found is None:
        effective, relevant, gone = hosts.decided(catalogue.policy(group_id), live, revoked)
        policy = groups.policy_out(effective, [r.patch_id for r in relevant])
        found = (policy, relevant, gone, policy_digest(group, policy, relevant, gone))
        if len(catalogue.memo) < MEMO:
            catalogue.memo[key] = found
    return found


def policy_digest(
    group: str,
    policy: s.EffectivePolicy,
    patches: list[s.RelevantPatch],
    revoked: list[s.RevokedPatch],
) -> str:
    """The digest of what a check-in answer tells the agent to do."""
    what = [group, policy.model_dump(), [p.model_dump() for p in patches],
            [r.model_dump() for r in revoked]]  # fmt: skip
    canonical = json.dumps(what, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _gone(request: Request) -> None:
    """Returns when the client closed its connection (its body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

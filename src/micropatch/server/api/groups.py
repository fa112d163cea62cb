"""/api/v1/groups and /api/v1/policies: the group tree and what each group sets,
with the effective policy after inheritance, explained."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from micropatch.faults import checkpoint
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Administrator, Publisher, Reader, ServerDep
from micropatch.server.fleet import groups

router = APIRouter(prefix=PREFIX, tags=["groups"])


@router.get("/groups", response_model=list[s.GroupOut])
def list_groups(_who: Reader, server: ServerDep) -> list[s.GroupOut]:
    with server.database.reading() as session:
        return [
            groups.group_out(session, g)
            for g in session.scalars(select(m.Group).order_by(m.Group.path))
        ]


@router.post("/groups", response_model=s.GroupOut, status_code=201)
def create_group(body: s.GroupIn, who: Administrator, server: ServerDep) -> s.GroupOut:
    with server.database.session() as session:
        g = groups.create_group(session, body.path, body.default_state, who.actor)
        return groups.group_out(session, g)


@router.get("/groups/{path:path}", response_model=s.GroupOut)
def get_group(path: str, _who: Reader, server: ServerDep) -> s.GroupOut:
    with server.database.reading() as session:
        return groups.group_out(session, groups.group(session, path))


@router.delete("/groups/{path:path}", status_code=204)
def delete_group(path: str, who: Administrator, server: ServerDep) -> None:
    with server.database.session() as session:
        groups.delete_group(session, path, who.actor)


@router.get("/policies/{path:path}", response_model=s.GroupPolicyOut)
def get_policy(path: str, _who: Reader, server: ServerDep) -> s.GroupPolicyOut:
    """What the group sets, and the effective policy after inheritance, explained."""
    with server.database.reading() as session:
        g = groups.group(session, path)
        return s.GroupPolicyOut(
            group=groups.group_out(session, g),
            effective=groups.policy_out(groups.effective_policy(session, g)),
        )


@router.put("/policies/{path:path}", response_model=s.GroupPolicyOut)
def put_policy(path: str, body: s.PolicyIn, who: Publisher, server: ServerDep) -> s.GroupPolicyOut:
    """Replace what the group sets (unset fields: inherited from the parent)."""
    with server.database.session() as session:
        g = groups.set_policy(session, path, body, who.actor)
        session.flush()
        out = s.GroupPolicyOut(
            group=groups.group_out(session, g),
            effective=groups.policy_out(groups.effective_policy(session, g)),
        )
        checkpoint("policy-written")
    checkpoint("policy-committed")
    return out

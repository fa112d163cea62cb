"""Groups (a tree by path) and the policies they set, with the effective policy
after inheritance (`server.policy`)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server import policy as p
from micropatch.server import schemas as s
from micropatch.server.catalogue import bump, load
from micropatch.server.errors import Conflict, NotFound
from micropatch.server.fleet.records import audit


def group(session: Session, path: str) -> m.Group:
    path = p.normalise_path(path)
    found = session.scalar(select(m.Group).where(m.Group.path == path))
    if found is None:
        raise NotFound(
            f"no group {path!r}: create it with `micropatch server admin create-group {path}` "
            "or POST /api/v1/groups"
        )
    return found


def create_group(session: Session, path: str, default_state: str | None, actor: str) -> m.Group:
    path = p.normalise_path(path)
    if session.scalar(select(m.Group).where(m.Group.path == path)) is not None:
        raise Conflict(f"group {path!r} already exists")
    parent_path = p.parent_of(path)
    if parent_path is None:
        raise Conflict("the root group / always exists")
    parent = group(session, parent_path)
    created = m.Group(path=path, parent_id=parent.id, default_state=default_state)
    session.add(created)
    session.flush()
    bump(session)
    audit(session, actor, "group.create", f"group:{path}", default_state=default_state)
    return created


def delete_group(session: Session, path: str, actor: str) -> None:
    found = group(session, path)
    if found.path == "/":
        raise Conflict("the root group / cannot be deleted")
    if session.scalar(select(func.count()).where(m.Group.parent_id == found.id)):
        raise Conflict(f"group {found.path!r} has subgroups: delete them first")
    if session.scalar(select(func.count()).where(m.Host.group_id == found.id)):
        raise Conflict(f"group {found.path!r} has hosts: move them to another group first")
    session.execute(delete(m.EnrollmentToken).where(m.EnrollmentToken.group_id == found.id))
    session.delete(found)
    bump(session)
    audit(session, actor, "group.delete", f"group:{found.path}")


def set_policy(session: Session, path: str, policy: s.PolicyIn, actor: str) -> m.Group:
    """Replace what the group sets: default state, per-patch states, exclusions."""
    found = group(session, path)
    found.default_state = policy.default_state
    found.patch_states = [
        m.GroupPatchState(patch_id=pid, state=state)
        for pid, state in sorted(policy.patches.items())
    ]
    found.exclusions = [
        m.Exclusion(kind=e.kind, value=e.value, patch_id=e.patch_id) for e in policy.exclusions
    ]
    bump(session)
    audit(session, actor, "policy.set", f"group:{found.path}", **policy.model_dump())
    return found


def group_out(session: Session, g: m.Group) -> s.GroupOut:
    hosts = session.scalar(select(func.count()).where(m.Host.group_id == g.id)) or 0
    return s.GroupOut(
        path=g.path,
        parent=p.parent_of(g.path),
        default_state=g.default_state,
        patches={x.patch_id: x.state for x in g.patch_states},
        exclusions=[
            s.ExclusionIn(kind=e.kind, value=e.value, patch_id=e.patch_id)  # type: ignore[arg-type]
            for e in g.exclusions
        ],
        hosts=hosts,
    )


def effective_policy(session: Session, g: m.Group) -> p.Effective:
    """The policy of group `g`, inherited from the root down, as this session sees it
    (uncached: right also in the transaction that changed it)."""
    session.flush()
    return load(session).policy(g.id)


def policy_out(effective: p.Effective, patch_ids: Sequence[str] = ()) -> s.EffectivePolicy:
    return s.EffectivePolicy.model_validate(effective.explain(patch_ids))

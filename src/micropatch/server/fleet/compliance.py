"""Compliance: for each host and each patch enabled for its group whose module the
host has loaded, is the patch carried?

- *vulnerable*: a module matching an enabled patch's identity (build-id or SHA-256,
  as check-ins match them) is loaded and no process carries the patch;
- *outdated*: a process carries an older version than the newest published one for
  that module;
- *protected*: the newest version is carried.

A host's state is its worst pair (vulnerable, then outdated, then protected); a
host with no such pair is not counted. Everything is computed by the database in a
few statements (joins and GROUP BY over the indexed identity columns), never by a
loop over hosts: the console's dashboard counts a 10,000-host fleet in one page
view (benchmarks/results/console.md). Which patches a group enables comes from the
catalogue (`server/catalogue.py`), which the check-ins share.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, and_, case, false, func, literal, or_, select, tuple_, union_all
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server.catalogue import Catalogue

STATES = ("vulnerable", "outdated", "protected")
_RANK = {"protected": 1, "outdated": 2, "vulnerable": 3}  # a host's state: its worst pair


def enabled_pairs(catalogue: Catalogue, patch_ids: Iterable[str]) -> list[tuple[int, str]]:
    """(group id, patch id) for each patch a group's effective policy enables."""
    ids = list(patch_ids)
    return [
        (group_id, patch_id)
        for group_id, effective in catalogue.effective.items()
        for patch_id in ids
        if effective.state(patch_id).state == "enabled"
    ]


def pairs(catalogue: Catalogue, session: Session, host_ids: list[int] | None = None) -> Select[Any]:
    """(host_id, patch_id, state) for every host (or these) and enabled patch
    relevant to it."""
    live = m.Patch.revoked.is_(False)
    only = [] if host_ids is None else [m.HostModule.host_id.in_(host_ids)]
    by_build_id = (
        select(m.HostModule.host_id, m.Patch.patch_id, m.Patch.version)
        .join(m.Patch, m.Patch.module_build_id == m.HostModule.build_id)
        .where(live, m.Patch.module_build_id.is_not(None), *only)
    )
    # By SHA-256 only where the build-id did not match already (the index covers it).
    other = or_(
        m.Patch.module_build_id.is_(None),
        m.HostModule.build_id.is_(None),
        m.HostModule.build_id != m.Patch.module_build_id,
    )
    by_sha256 = (
        select(m.HostModule.host_id, m.Patch.patch_id, m.Patch.version)
        .join(m.Patch, m.Patch.module_sha256 == m.HostModule.sha256)
        .where(live, other, *only)
    )
    matched = union_all(by_build_id, by_sha256).subquery()
    wanted = (
        select(matched.c.host_id, matched.c.patch_id, func.max(matched.c.version).label("newest"))
        .group_by(matched.c.host_id, matched.c.patch_id)
        .subquery()
    )
    carried = (
        select(m.ProcessPatch.host_id, m.ProcessPatch.patch_id,
               func.max(m.ProcessPatch.version).label("version"))
        .where(m.ProcessPatch.state == "applied")
        .group_by(m.ProcessPatch.host_id, m.ProcessPatch.patch_id)
        .subquery()
    )  # fmt: skip
    ids = session.scalars(select(m.Patch.patch_id).where(live).distinct()).all()
    enabled = enabled_pairs(catalogue, ids)
    where = tuple_(m.Host.group_id, wanted.c.patch_id).in_(enabled) if enabled else false()
    state = case(
        (carried.c.version.is_(None), literal("vulnerable")),
        (carried.c.version < wanted.c.newest, literal("outdated")),
        else_=literal("protected"),
    )
    return (
        select(wanted.c.host_id, wanted.c.patch_id, state.label("state"))
        .join(m.Host, m.Host.id == wanted.c.host_id)
        .join(
            carried,
            and_(carried.c.host_id == wanted.c.host_id, carried.c.patch_id == wanted.c.patch_id),
            isouter=True,
        )
        .where(where)
    )


def _host_ranks(catalogue: Catalogue, session: Session) -> Select[Any]:
    """(host_id, rank): each host's worst pair."""
    each = pairs(catalogue, session).subquery()
    rank = case(*((each.c.state == name, n) for name, n in _RANK.items()))
    return select(each.c.host_id, func.max(rank).label("rank")).group_by(each.c.host_id)


def fleet_counts(catalogue: Catalogue, session: Session) -> dict[str, int]:
    """How many hosts are vulnerable, outdated, protected."""
    ranks = _host_ranks(catalogue, session).subquery()
    rows = session.execute(select(ranks.c.rank, func.count()).group_by(ranks.c.rank)).all()
    by_rank = {n: name for name, n in _RANK.items()}
    counts = dict.fromkeys(STATES, 0)
    for rank, count in rows:
        counts[by_rank[rank]] = count
    return counts


def hosts_in_state(
    catalogue: Catalogue, session: Session, state: str | None, patch_id: str | None = None
) -> Select[Any]:
    """The ids of the hosts whose state is `state` (a subquery for a host listing); with
    `patch_id`, their state for that patch (any state with `state` None: the hosts
    that patch concerns)."""
    if patch_id is None:
        ranks = _host_ranks(catalogue, session).subquery()
        return select(ranks.c.host_id).where(ranks.c.rank == _RANK[state or "protected"])
    each = pairs(catalogue, session).subquery()
    query = select(each.c.host_id).where(each.c.patch_id == patch_id)
    return query if state is None else query.where(each.c.state == state)


def host_states(
    catalogue: Catalogue, session: Session, host_ids: Iterable[int]
) -> dict[int, dict[str, str]]:
    """For these hosts (a page of them): patch id → state, by host id."""
    ids = list(host_ids)
    if not ids:
        return {}
    each = pairs(catalogue, session, ids).subquery()
    out: dict[int, dict[str, str]] = {}
    for host_id, patch_id, state in session.execute(select(each).order_by(each.c.patch_id)):
        out.setdefault(host_id, {})[patch_id] = state
    return out


def worst(states: dict[str, str]) -> str | None:
    """A host's state from its pairs (None: no enabled patch concerns it)."""
    return max(states.values(), key=_RANK.__getitem__, default=None)


def patch_counts(catalogue: Catalogue, session: Session) -> dict[str, dict[str, int]]:
    """For each patch id: how many hosts are vulnerable, outdated, protected."""
    each = pairs(catalogue, session).subquery()
    out: dict[str, dict[str, int]] = {}
    for patch_id, state, count in session.execute(
        select(each.c.patch_id, each.c.state, func.count()).group_by(each.c.patch_id, each.c.state)
    ):
        out.setdefault(patch_id, dict.fromkeys(STATES, 0))[state] = count
    return out

"""What every check-in shares: the groups' effective policies and the published patches
by module, built once per policy revision instead of once per request.

Every change of groups, policies or patches bumps the "policy" counter of the
`revisions` table in its own transaction (`bump`). A server process keeps the
catalogue of the revision it last read: a request reads the counter (one
primary-key lookup) and rebuilds only when it moved, so a change is seen by the
very next check-in, whichever server process answers it.

The counter is read before the rows: a catalogue may be labelled older than
what it holds (and is rebuilt at the next request), never newer.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server import policy as p

POLICY = "policy"


def bump(session: Session) -> None:
    """Mark what check-ins share as changed (call in the transaction that changes it)."""
    session.execute(
        update(m.Revision).where(m.Revision.name == POLICY).values(value=m.Revision.value + 1)
    )


# Built once: every request that reads the catalogue reads it.
REVISION = select(m.Revision.value).where(m.Revision.name == POLICY)


def revision(session: Session) -> int:
    return int(session.connection().execute(REVISION).scalar() or 0)


@dataclass(frozen=True)
class PatchRow:
    """A published patch version, as check-ins need it."""

    patch_id: str
    version: int
    artifact_id: str
    title: str | None
    target: str
    module_name: str
    module_build_id: str | None
    module_sha256: str
    revoked: bool


ModuleKey = tuple[str | None, str | None]  # (build-id, SHA-256) of a module a host maps


@dataclass(frozen=True)
class Catalogue:
    revision: int
    effective: dict[int, p.Effective]  # by group id
    by_build_id: dict[str, list[PatchRow]]
    by_sha256: dict[str, list[PatchRow]]
    # What check-ins computed from this catalogue alone, kept for the next ones (the
    # answers shared by hosts: api/agent.py); it goes with the catalogue.
    memo: dict[Hashable, Any] = field(default_factory=dict, compare=False, repr=False)

    def policy(self, group_id: int) -> p.Effective:
        return self.effective[group_id]

    def relevant(self, modules: Iterable[ModuleKey]) -> tuple[list[PatchRow], list[PatchRow]]:
        """The newest published version of each patch whose module (build-id or
        SHA-256) is among `modules`, and the revoked versions for such modules."""
        rows: dict[str, PatchRow] = {}
        for build_id, sha256 in modules:
            for row in self.by_build_id.get(build_id or "", ()):
                rows[row.artifact_id] = row
            for row in self.by_sha256.get(sha256 or "", ()):
                rows[row.artifact_id] = row
        newest: dict[str, PatchRow] = {}
        revoked = []
        for row in sorted(rows.values(), key=lambda r: (r.patch_id, r.version)):
            if row.revoked:
                revoked.append(row)
            else:
                newest[row.patch_id] = row  # ordered by version: the last one wins
        return list(newest.values()), revoked


def load(session: Session) -> Catalogue:
    """The catalogue as the database holds it now."""
    number = revision(session)  # before the rows: see the module's docstring
    groups = session.execute(select(m.Group.id, m.Group.path, m.Group.default_state)).all()
    states: dict[int, dict[str, str]] = {}
    for group_id, patch_id, state in session.execute(
        select(m.GroupPatchState.group_id, m.GroupPatchState.patch_id, m.GroupPatchState.state)
        .order_by(m.GroupPatchState.patch_id)
    ):  # fmt: skip
        states.setdefault(group_id, {})[patch_id] = state
    exclusions: dict[int, list[p.Exclusion]] = {}
    for group_id, kind, value, only in session.execute(
        select(m.Exclusion.group_id, m.Exclusion.kind, m.Exclusion.value, m.Exclusion.patch_id)
        .order_by(m.Exclusion.id)
    ):  # fmt: skip
        exclusions.setdefault(group_id, []).append(p.Exclusion(kind, value, only))
    own = {
        path: p.GroupPolicy(path, default, states.get(gid, {}), tuple(exclusions.get(gid, ())))
        for gid, path, default in groups
    }
    effective = {
        gid: p.effective([own[a] for a in p.ancestors(path) if a in own]) for gid, path, _ in groups
    }
    by_build_id: dict[str, list[PatchRow]] = {}
    by_sha256: dict[str, list[PatchRow]] = {}
    for r in session.execute(
        select(m.Patch.patch_id, m.Patch.version, m.Patch.artifact_id, m.Patch.title,
               m.Patch.target, m.Patch.module_name, m.Patch.module_build_id,
               m.Patch.module_sha256, m.Patch.revoked)
    ):  # fmt: skip
        row = PatchRow(*r)
        if row.module_build_id:
            by_build_id.setdefault(row.module_build_id, []).append(row)
        by_sha256.setdefault(row.module_sha256, []).append(row)
    return Catalogue(number, effective, by_build_id, by_sha256)


class Catalogues:
    """The catalogue of the newest revision this process has read (one per server)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Catalogue | None = None

    def current(self, session: Session, number: int | None = None) -> Catalogue:
        """The catalogue of the revision this session sees (`number`, if the caller
        has read it in this transaction already)."""
        if number is None:
            number = revision(session)
        cached = self._current
        if cached is not None and cached.revision == number:
            return cached
        with self._lock:  # one rebuild at a time; the others take its result
            cached = self._current
            if cached is None or cached.revision != number:
                fresh = load(session)
                if cached is None or fresh.revision >= cached.revision:
                    self._current = fresh
                cached = fresh
        return cached

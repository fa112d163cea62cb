"""Publishing and revoking patches: the database and the TUF repository, kept in step.

The database is the source of truth: the repository's targets are what its
unrevoked patches say (`wanted_targets`). A publish or a revocation changes the
database, then makes the repository list exactly that (`sync_repository`), then
commits; the repository's files are written so that a client sees the old state
or the new one (the timestamp is written last). Killed at any instant, the
server leaves either nothing changed, or the repository ahead of a database that
did not commit; `reconcile`, at every start (and every refresh), makes the
repository follow the database again: the old state in both. Changes made at once
(several server processes) take turns on the `repository` row of `revisions`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from micropatch.errors import MicropatchError, RepositoryError
from micropatch.faults import checkpoint
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.catalogue import bump
from micropatch.server.database import Database
from micropatch.server.errors import Conflict, Invalid, NotFound
from micropatch.server.fleet.hosts import module_ref
from micropatch.server.fleet.records import audit
from micropatch.server.repository import Repository

log = logging.getLogger(__name__)
REPOSITORY = "repository"  # the row of `revisions` every change of the targets takes


def publish(
    session: Session, repository: Repository, data: bytes, actor: str
) -> tuple[m.Patch, bool]:
    """Check an uploaded artifact (parse, id, signature by a trusted patch-signing key,
    source consistent with the recorded facts: no compiler runs), record it and add it
    to the TUF targets. Returns (patch, created); publishing the same artifact again
    changes nothing."""
    from micropatch.server.artifacts import check, describe

    try:
        artifact = check(data, "the uploaded artifact", repository.trusted_keys())
    except MicropatchError as exc:
        raise Invalid(str(exc)) from None
    facts = describe(artifact)
    same = session.scalar(select(m.Patch).where(m.Patch.artifact_id == artifact.id))
    if same is not None:
        if same.revoked:
            raise Conflict(
                f"patch {same.patch_id} v{same.version} ({artifact.id[:12]}…) was revoked; "
                "publish a new version instead"
            )
        return same, False
    clash = session.scalar(
        select(m.Patch).where(
            m.Patch.patch_id == facts["patch_id"], m.Patch.version == facts["version"]
        )
    )
    if clash is not None:
        raise Conflict(
            f"patch {clash.patch_id} v{clash.version} is already published as another "
            f"artifact ({clash.artifact_id[:12]}…): bump the version"
        )
    row = m.Patch(
        patch_id=facts["patch_id"],
        version=facts["version"],
        artifact_id=artifact.id,
        title=facts["title"],
        module_name=facts["module"]["name"],
        module_build_id=facts["module"]["build_id"],
        module_sha256=facts["module"]["sha256"],
        runtime=facts["runtime"],
        target=artifact.file_name,
        size=len(data),
        published=time.time(),
        published_by=actor,
        revoked=False,
    )
    session.add(row)
    session.flush()  # a clash with a concurrent publish fails here, before the repository
    repository.store_target(row.target, data)  # not listed yet: clients cannot see it
    checkpoint("publish-stored")
    sync_repository(session, repository)
    bump(session)
    audit(session, actor, "patch.publish", f"patch:{row.patch_id}", version=row.version,
          artifact_id=row.artifact_id, target=row.target)  # fmt: skip
    return row, True


def revoke(
    session: Session,
    repository: Repository,
    patch_id: str,
    version: int | None,
    actor: str,
    *,
    reason: str | None = None,
) -> list[m.Patch]:
    """Revoke one version, or every version, of a patch: removed from the TUF targets,
    reported to hosts as revoked so their agents remove it live. The `reason` (the
    console asks for one) goes to the audit log."""
    query = select(m.Patch).where(m.Patch.patch_id == patch_id, m.Patch.revoked.is_(False))
    if version is not None:
        query = query.where(m.Patch.version == version)
    rows = list(session.scalars(query))
    if not rows:
        what = patch_id if version is None else f"{patch_id} v{version}"
        raise NotFound(f"no published, unrevoked patch {what}")
    now = time.time()
    for row in rows:
        row.revoked, row.revoked_at = True, now
    session.flush()
    sync_repository(session, repository)
    bump(session)
    why = {"reason": reason} if reason else {}
    for row in rows:
        audit(session, actor, "patch.revoke", f"patch:{row.patch_id}", version=row.version,
              artifact_id=row.artifact_id, **why)  # fmt: skip
    return rows


def patch_out(session: Session, row: m.Patch, *, counts: bool = False) -> s.PatchOut:
    out = s.PatchOut(
        patch_id=row.patch_id,
        version=row.version,
        artifact_id=row.artifact_id,
        title=row.title,
        target=row.target,
        module=module_ref(row),
        runtime=row.runtime,
        size=row.size,
        published=row.published,
        published_by=row.published_by,
        revoked=row.revoked,
        revoked_at=row.revoked_at,
    )
    if counts:
        matches = or_(
            m.HostModule.sha256 == row.module_sha256,
            m.HostModule.build_id == row.module_build_id
            if row.module_build_id
            else m.HostModule.id.is_(None),
        )
        out.hosts_relevant = session.scalar(
            select(func.count(func.distinct(m.HostModule.host_id))).where(matches)
        )
        out.processes_applied = session.scalar(
            select(func.count()).where(
                m.ProcessPatch.patch_id == row.patch_id, m.ProcessPatch.version == row.version
            )
        )
    return out


# --- the repository follows the database --------------------------------------------


def facts(row: m.Patch) -> dict[str, Any]:
    """The `custom` field of a patch's TUF target (as `artifacts.describe` makes it)."""
    return {
        "patch_id": row.patch_id,
        "version": row.version,
        "title": row.title,
        "artifact_id": row.artifact_id,
        "runtime": row.runtime,
        "module": {"name": row.module_name, "build_id": row.module_build_id,
                   "sha256": row.module_sha256},
    }  # fmt: skip


def wanted_targets(session: Session) -> dict[str, dict[str, Any]]:
    """What the repository must list, as this session sees the database: every
    unrevoked patch's target."""
    rows = session.scalars(select(m.Patch).where(m.Patch.revoked.is_(False)))
    return {row.target: {"micropatch": facts(row)} for row in rows}


def sync_repository(session: Session, repository: Repository) -> bool:
    """Make the repository list what this session's database says, taking the
    repository's turn first (held until the transaction ends). Whether it changed."""
    session.execute(select(m.Revision.value).where(m.Revision.name == REPOSITORY).with_for_update())
    return repository.sync(wanted_targets(session))


def reconcile(database: Database, repository: Repository) -> bool:
    """At a start (and every refresh): the repository made to list what the database
    says again, should a change have been cut short between the two (a kill, a full
    disk). Whether it had to change; a failure to sign is logged, not raised. Without a
    targets key online the server publishes nothing (its repository is managed offline
    with `repo add-target`): nothing to do."""
    if not repository.online_targets_keys():
        return False
    repository.mark_served(database.safe_url)
    try:
        with database.session() as session:
            changed = sync_repository(session, repository)
    except RepositoryError as exc:
        log.error("the TUF repository does not list what the database holds, and cannot "
                  "be made to: %s", exc)  # fmt: skip
        return False
    if changed:
        log.warning("the TUF repository did not list what the database holds (a change cut "
                    "short?): re-signed to match it")  # fmt: skip
    return changed

"""Publishing and revoking patches: the database and the TUF repository."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from micropatch.errors import MicropatchError
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.catalogue import bump
from micropatch.server.errors import Conflict, Invalid, NotFound
from micropatch.server.fleet.hosts import module_ref
from micropatch.server.fleet.records import audit


def publish(session: Session, repository: Any, data: bytes, actor: str) -> tuple[m.Patch, bool]:
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
        target=artifact.file_name,
        size=len(data),
        published=time.time(),
        published_by=actor,
        revoked=False,
    )
    session.add(row)
    session.flush()  # a clash with a concurrent publish fails here, before the repository
    repository.add_target(artifact.file_name, data, custom={"micropatch": facts})
    bump(session)
    audit(session, actor, "patch.publish", f"patch:{row.patch_id}", version=row.version,
          artifact_id=row.artifact_id, target=row.target)  # fmt: skip
    return row, True


def revoke(
    session: Session, repository: Any, patch_id: str, version: int | None, actor: str
) -> list[m.Patch]:
    """Revoke one version, or every version, of a patch: removed from the TUF targets,
    reported to hosts as revoked so their agents remove it live."""
    query = select(m.Patch).where(m.Patch.patch_id == patch_id, m.Patch.revoked.is_(False))
    if version is not None:
        query = query.where(m.Patch.version == version)
    rows = list(session.scalars(query))
    if not rows:
        what = patch_id if version is None else f"{patch_id} v{version}"
        raise NotFound(f"no published, unrevoked patch {what}")
    published = repository.target_files()
    now = time.time()
    bump(session)
    for row in rows:
        row.revoked, row.revoked_at = True, now
        if row.target in published:
            repository.remove_target(row.target)
        audit(session, actor, "patch.revoke", f"patch:{row.patch_id}", version=row.version,
              artifact_id=row.artifact_id)  # fmt: skip
    return rows


def patch_out(session: Session, row: m.Patch, *, counts: bool = False) -> s.PatchOut:
    out = s.PatchOut(
        patch_id=row.patch_id,
        version=row.version,
        artifact_id=row.artifact_id,
        title=row.title,
        target=row.target,
        module=module_ref(row),
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

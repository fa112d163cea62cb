"""/api/v1/patches: published patches, publishing and revocation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from micropatch.faults import checkpoint
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Publisher, Reader, ServerDep
from micropatch.server.errors import NotFound
from micropatch.server.fleet import patches
from micropatch.server.limits import MAX_ARTIFACT, TooLarge, declared_too_large

router = APIRouter(prefix=PREFIX, tags=["patches"])


@router.get("/patches", response_model=list[s.PatchOut])
def list_patches(_who: Reader, server: ServerDep, revoked: bool | None = None) -> list[s.PatchOut]:
    query = select(m.Patch).order_by(m.Patch.patch_id, m.Patch.version)
    if revoked is not None:
        query = query.where(m.Patch.revoked.is_(revoked))
    with server.database.reading() as session:
        return [patches.patch_out(session, row, counts=True) for row in session.scalars(query)]


@router.get("/patches/{patch_id}", response_model=list[s.PatchOut])
def patch_versions(patch_id: str, _who: Reader, server: ServerDep) -> list[s.PatchOut]:
    with server.database.reading() as session:
        rows = session.scalars(
            select(m.Patch).where(m.Patch.patch_id == patch_id).order_by(m.Patch.version)
        ).all()
        if not rows:
            raise NotFound(f"no patch {patch_id!r}")
        return [patches.patch_out(session, row, counts=True) for row in rows]


async def _artifact_body(request: Request) -> bytes:
    """The request's body (up to `MAX_ARTIFACT`, counted as it is read: server/limits.py),
    read once the caller is authenticated."""
    if declared_too_large(request.scope, MAX_ARTIFACT):
        raise TooLarge(MAX_ARTIFACT)
    return await request.body()


@router.post(
    "/patches",
    response_model=s.PatchOut,
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
            "description": "the signed artifact file (.mpatch), as is",
        }
    },
)
def publish(
    who: Publisher, data: Annotated[bytes, Depends(_artifact_body)], server: ServerDep
) -> JSONResponse:
    """Publish a signed artifact: checked (no compiler runs), recorded, added to the
    TUF targets. The same artifact again: 200 and no change. Its body is read only
    once the caller is authenticated (`who` first)."""
    with server.database.session() as session:
        row, created = patches.publish(session, server.repository, data, who.actor)
        out = patches.patch_out(session, row)
    checkpoint("publish-committed")
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if created else 200)


@router.post("/patches/{patch_id}/revoke", response_model=list[s.PatchOut])
def revoke(patch_id: str, body: s.RevokeIn, who: Publisher, server: ServerDep) -> list[s.PatchOut]:
    """Revoke a version (or all): removed from the repository; agents remove it live."""
    with server.database.session() as session:
        rows = patches.revoke(session, server.repository, patch_id, body.version, who.actor)
        out = [patches.patch_out(session, row) for row in rows]
    checkpoint("revoke-committed")
    return out

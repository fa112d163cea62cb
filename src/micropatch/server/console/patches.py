"""/console/patches: each version with its relevant hosts and processes applied, the
groups that set its state; enabling or disabling per group (the groups router's
form), revoking a version."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from micropatch.errors import ServerError
from micropatch.server import models as m
from micropatch.server.console.pages import (
    PREFIX,
    FormDep,
    ServerDep,
    ViewerDep,
    back,
    changer,
    failed,
    render,
)
from micropatch.server.errors import Invalid
from micropatch.server.fleet import patches

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/patches")
def patch_list(request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    with server.database.reading() as session:
        rows = [
            patches.patch_out(session, p, counts=True)
            for p in session.scalars(select(m.Patch).order_by(m.Patch.patch_id, m.Patch.version))
        ]
        states: dict[str, list[tuple[str, str]]] = {}
        for g in session.scalars(select(m.Group).order_by(m.Group.path)):
            for x in g.patch_states:
                states.setdefault(x.patch_id, []).append((g.path, x.state))
        group_paths = list(session.scalars(select(m.Group.path).order_by(m.Group.path)))
    return render(request, "patches.html", viewer, patches=rows, states=states,
                  groups=group_paths)  # fmt: skip


@router.post("/patches/revoke")
def revoke(request: Request, viewer: ViewerDep, form: FormDep, server: ServerDep) -> Response:
    changer(viewer, form)
    patch_id = form.get("patch_id", "")
    version_text = form.get("version", "")
    try:
        version = int(version_text) if version_text.isdigit() else None
        if version_text and version is None:
            raise Invalid(f"version {version_text!r}: a number, or empty for all")
        with server.database.session() as session:
            rows = patches.revoke(session, server.repository, patch_id, version, viewer.who.actor)
            versions = ", ".join(f"v{r.version}" for r in rows)
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back("/patches", f"{patch_id} {versions} revoked")

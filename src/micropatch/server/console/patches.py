"""/console/patches: each version with its relevant hosts and processes applied, its
compliance (hosts vulnerable, outdated, protected), the groups that set its state;
enabling or disabling per group (the groups router's form), revoking a version after
a confirmation page that asks for the reason (kept in the audit log)."""

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
from micropatch.server.errors import Invalid, NotFound
from micropatch.server.fleet import compliance, patches

router = APIRouter(prefix=PREFIX, include_in_schema=False)
MAX_REASON = 500


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
        counts = compliance.patch_counts(server.catalogues.current(session), session)
    return render(request, "patches.html", viewer, patches=rows, states=states,
                  groups=group_paths, compliance=counts)  # fmt: skip


def _version(text: str) -> int | None:
    version = int(text) if text.isdigit() else None
    if text and version is None:
        raise Invalid(f"version {text!r}: a number, or empty for all")
    return version


@router.get("/patches/revoke")
def confirm_revoke(
    request: Request, viewer: ViewerDep, server: ServerDep, patch_id: str = "", version: str = ""
) -> Response:
    """What revoking does, for this version, and the form (with a reason) that does it."""
    try:
        number = _version(version)
        with server.database.reading() as session:
            query = select(m.Patch).where(m.Patch.patch_id == patch_id, m.Patch.revoked.is_(False))
            if number is not None:
                query = query.where(m.Patch.version == number)
            rows = [patches.patch_out(session, p, counts=True) for p in session.scalars(query)]
    except ServerError as exc:
        return failed(request, viewer, exc)
    if not rows:
        what = patch_id if number is None else f"{patch_id} v{number}"
        return failed(request, viewer, NotFound(f"no published, unrevoked patch {what}"))
    return render(request, "revoke.html", viewer, patch_id=patch_id, number=version, rows=rows)


@router.post("/patches/revoke")
def revoke(request: Request, viewer: ViewerDep, form: FormDep, server: ServerDep) -> Response:
    changer(viewer, form)
    patch_id = form.get("patch_id", "")
    reason = " ".join(form.get("reason", "").split())
    try:
        version = _version(form.get("version", ""))
        if not reason:
            raise Invalid("say why the patch is revoked (the reason goes to the audit log)")
        if len(reason) > MAX_REASON:
            raise Invalid(f"the reason is {len(reason)} characters: at most {MAX_REASON}")
        with server.database.session() as session:
            rows = patches.revoke(session, server.repository, patch_id, version,
                                  viewer.who.actor, reason=reason)  # fmt: skip
            versions = ", ".join(f"v{r.version}" for r in rows)
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back("/patches", f"{patch_id} {versions} revoked")

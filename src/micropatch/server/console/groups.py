"""/console/groups: the group tree with what each group sets; a group's policy, set
there and in force, changed one part at a time (the rest of what the group sets
stays)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from micropatch.errors import ServerError
from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.auth import ADMIN
from micropatch.server.console.pages import (
    PREFIX,
    FormDep,
    ServerDep,
    ViewerDep,
    back,
    changer,
    failed,
    patch_ids,
    render,
    state_of,
)
from micropatch.server.errors import Invalid
from micropatch.server.fleet import groups

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/groups")
def group_list(request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    with server.database.reading() as session:
        rows = [
            (groups.group_out(session, g), g.path.count("/") - (g.path == "/"))
            for g in session.scalars(select(m.Group).order_by(m.Group.path))
        ]
    return render(request, "groups.html", viewer, groups=rows)


@router.post("/groups")
def create_group(request: Request, viewer: ViewerDep, form: FormDep, server: ServerDep) -> Response:
    changer(viewer, form, ADMIN)
    state = form.get("default_state") or None
    try:
        if state not in (None, *m.STATES):
            raise Invalid(f"default state {state!r}: enabled, disabled or inherit")
        with server.database.session() as session:
            path = groups.create_group(session, form.get("path", ""), state, viewer.who.actor).path
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back(f"/groups/policy?path={quote(path)}", f"group {path} created")


@router.get("/groups/policy")
def group_page(path: str, request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    with server.database.reading() as session:
        try:
            g = groups.group(session, path)
        except ServerError as exc:
            return failed(request, viewer, exc)
        ids = patch_ids(session)
        members = select(m.Host).where(m.Host.group_id == g.id).order_by(m.Host.id)
        context: dict[str, Any] = dict(
            group=groups.group_out(session, g),
            effective=groups.policy_out(groups.effective_policy(session, g), ids),
            patch_ids=ids, hosts=session.scalars(members).all(),
        )  # fmt: skip
    return render(request, "group.html", viewer, **context)


@router.post("/groups/policy")
def change_policy(
    request: Request, viewer: ViewerDep, form: FormDep, server: ServerDep
) -> Response:
    """One change to a group's policy: `action` is default | patch | exclude |
    unexclude; the rest of what the group sets stays."""
    changer(viewer, form)
    try:
        with server.database.session() as session:
            path, done = _change(session, form, viewer.who.actor)
    except ServerError as exc:
        return failed(request, viewer, exc)
    if form.get("back", "").startswith("/patches"):
        return back("/patches", done)
    return back(f"/groups/policy?path={quote(path)}", done)


def _change(session: Session, form: dict[str, str], actor: str) -> tuple[str, str]:
    """Make the form's change; the group's path and what was done."""
    g = groups.group(session, form.get("path", ""))
    policy = _policy_of(g)
    action = form.get("action", "")
    if action == "default":
        policy["default_state"] = state_of(form.get("state", ""))
        done = f"default state of {g.path}: {policy['default_state'] or 'inherited'}"
    elif action == "patch":
        patch_id = form.get("patch_id", "").strip()
        if not patch_id:
            raise Invalid("which patch?")
        state = state_of(form.get("state", ""))
        if state is None:
            policy["patches"].pop(patch_id, None)
        else:
            policy["patches"][patch_id] = state
        done = f"{patch_id} in {g.path}: {state or 'inherited'}"
    elif action == "exclude":
        policy["exclusions"].append({
            "kind": form.get("kind", ""), "value": form.get("value", "").strip(),
            "patch_id": form.get("patch_id", "").strip() or None,
        })  # fmt: skip
        done = f"exclusion added to {g.path}"
    elif action == "unexclude":
        index = int(form.get("index", "-1")) if form.get("index", "").isdigit() else -1
        if not 0 <= index < len(policy["exclusions"]):
            raise Invalid("no such exclusion")
        policy["exclusions"].pop(index)
        done = f"exclusion removed from {g.path}"
    else:
        raise Invalid(f"unknown action {action!r}")
    try:
        body = s.PolicyIn.model_validate(policy)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Invalid(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    groups.set_policy(session, g.path, body, actor)  # the API's own operation and audit entry
    return g.path, done


def _policy_of(g: m.Group) -> dict[str, Any]:
    """What a group sets, as the API's PolicyIn takes it (to change one part)."""
    return {
        "default_state": g.default_state,
        "patches": {x.patch_id: x.state for x in g.patch_states},
        "exclusions": [
            {"kind": e.kind, "value": e.value, "patch_id": e.patch_id} for e in g.exclusions
        ],
    }

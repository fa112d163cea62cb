"""/console/users (admin): users with their state and tokens; creating one (its first
API token shown once), disabling and enabling it, setting its password, deleting it
after a confirmation. Each calls the `server.fleet` operation the API calls, so the
audit log is the same."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from micropatch.errors import ServerError
from micropatch.server import models as m
from micropatch.server.auth import ADMIN
from micropatch.server.console.pages import (
    PREFIX,
    FormDep,
    ServerDep,
    ViewerDep,
    admin_only,
    back,
    changer,
    days_of,
    failed,
    render,
)
from micropatch.server.errors import Invalid
from micropatch.server.fleet import credentials
from micropatch.server.fleet import users as accounts

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _list(request: Request, viewer: Any, server: Any, **extra: Any) -> Response:
    with server.database.reading() as session:
        counts = dict(
            session.execute(
                select(m.ApiToken.user_id, func.count()).group_by(m.ApiToken.user_id)
            ).all()
        )
        rows = [(u, counts.get(u.id, 0)) for u in credentials.users(session)]
    return render(request, "users.html", viewer, users=rows, roles=m.ROLES, **extra)


@router.get("/users")
def user_list(request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    admin_only(viewer, "the users")
    return _list(request, viewer, server)


@router.post("/users")
def create(request: Request, viewer: ViewerDep, form: FormDep, server: ServerDep) -> Response:
    """A new user; its first API token is shown on the page that answers, once."""
    changer(viewer, form, ADMIN)
    name = form.get("name", "").strip()
    password = form.get("password", "")
    try:
        ttl = days_of(form.get("expires_days", ""), "token lifetime")
        if password and len(password) < credentials.MIN_PASSWORD:
            raise Invalid(f"the password must be at least {credentials.MIN_PASSWORD} characters")
        with server.database.session() as session:
            _, secret = accounts.create_user(
                session, server.passwords, name, form.get("role", ""), password or None,
                viewer.who.actor, token_ttl=ttl,
            )  # fmt: skip
    except ServerError as exc:
        return failed(request, viewer, exc)
    return _list(request, viewer, server, secret=secret, created=name)


@router.get("/users/{name}")
def user_page(name: str, request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    admin_only(viewer, "the users")
    with server.database.reading() as session:
        try:
            found = credentials.user(session, name)
        except ServerError as exc:
            return failed(request, viewer, exc)
        tokens = credentials.tokens(session, name, unexpired=True)
        return render(request, "user.html", viewer, user=found, tokens=list(tokens))


@router.post("/users/{name}/state")
def set_state(name: str, request: Request, viewer: ViewerDep, form: FormDep,
              server: ServerDep) -> Response:  # fmt: skip
    """Disable (its tokens and sessions refused at once) or enable a user."""
    changer(viewer, form, ADMIN)
    disable = form.get("state") == "disabled"
    try:
        with server.database.session() as session:
            credentials.set_disabled(session, name, disable, viewer.who.actor)
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back(f"/users/{quote(name)}", f"{name} {'disabled' if disable else 'enabled'}")


@router.post("/users/{name}/password")
def set_password(name: str, request: Request, viewer: ViewerDep, form: FormDep,
                 server: ServerDep) -> Response:  # fmt: skip
    changer(viewer, form, ADMIN)
    try:
        if form.get("password", "") != form.get("again", ""):
            raise Invalid("the two passwords differ: type the same one twice")
        with server.database.session() as session:
            credentials.set_password(session, server.passwords, name, form.get("password", ""),
                                     viewer.who.actor)  # fmt: skip
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back(f"/users/{quote(name)}", f"password of {name} set; its sessions ended")


@router.get("/users/{name}/delete")
def confirm_delete(name: str, request: Request, viewer: ViewerDep, server: ServerDep) -> Response:
    admin_only(viewer, "the users")
    with server.database.reading() as session:
        try:
            found = credentials.user(session, name)
        except ServerError as exc:
            return failed(request, viewer, exc)
        tokens = len(credentials.tokens(session, name))
        return render(request, "user_delete.html", viewer, user=found, tokens=tokens)


@router.post("/users/{name}/delete")
def delete(name: str, request: Request, viewer: ViewerDep, form: FormDep,
           server: ServerDep) -> Response:  # fmt: skip
    changer(viewer, form, ADMIN)
    try:
        with server.database.session() as session:
            credentials.delete_user(session, name, viewer.who.actor)
    except ServerError as exc:
        return failed(request, viewer, exc)
    return back("/users", f"user {name} deleted")

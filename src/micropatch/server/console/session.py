"""/console/login and /console/logout. The login form carries a random token that
must match a cookie set with it (double submit); logging in checks the user's
argon2 password and issues the session (`fleet.users.login(via="console")`);
logging out deletes it, so a copied cookie stops working at once."""

from __future__ import annotations

import hmac
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select

from micropatch.server import models as m
from micropatch.server.auth import READ, secret_hash
from micropatch.server.console.pages import (
    LOGIN_COOKIE,
    PREFIX,
    SESSION_COOKIE,
    Forbidden,
    FormDep,
    ServerDep,
    ViewerDep,
    changer,
    render,
    safe_next,
    set_cookie,
)
from micropatch.server.context import client_address
from micropatch.server.errors import TooManyAttempts, Unauthorized
from micropatch.server.fleet import records, users

router = APIRouter(prefix=PREFIX, include_in_schema=False)
SESSION_HOURS = 12


@router.get("/login")
def login_page(request: Request, next: str = f"{PREFIX}/") -> Response:
    nonce = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, csrf=nonce, next=safe_next(next))
    set_cookie(response, request, LOGIN_COOKIE, nonce, 3600)
    return response


@router.post("/login")
def login(request: Request, form: FormDep, server: ServerDep) -> Response:
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not hmac.compare_digest(form.get("csrf", ""), nonce):
        raise Forbidden("missing or wrong CSRF token: reload the login page and try again")
    target = safe_next(form.get("next", ""))
    try:
        _, secret = users.login(
            server.database, server.passwords, server.logins, form.get("name", "")[:64],
            form.get("password", ""), client_address(request), via="console",
        )  # fmt: skip
    except (Unauthorized, TooManyAttempts) as exc:
        status = 429 if isinstance(exc, TooManyAttempts) else 401
        return render(request, "login.html", None, status, csrf=nonce, next=target,
                      error=str(exc), name=form.get("name", ""))  # fmt: skip
    response = RedirectResponse(target, 303)
    set_cookie(response, request, SESSION_COOKIE, secret, SESSION_HOURS * 3600)
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    return response


@router.post("/logout")
def logout(request: Request, viewer: ViewerDep, form: FormDep, server: ServerDep) -> Response:
    changer(viewer, form, READ)
    secret = request.cookies.get(SESSION_COOKIE, "")
    with server.database.session() as session:
        token = session.scalar(
            select(m.ApiToken).where(m.ApiToken.token_hash == secret_hash(secret))
        )
        if token is not None:
            session.delete(token)
        records.audit(session, viewer.who.actor, "user.logout", viewer.who.actor, via="console")
    response = RedirectResponse(f"{PREFIX}/login", 303)
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return response

"""The web console through FastAPI's test client: login and sessions, CSRF refusals,
the role matrix of its routes (the API's), and pages rendered with data."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from micropatch.server import models as m
from micropatch.server.console.dashboard import blocked_series, chart_svg
from micropatch.server.fleet import users

from .conftest import Api, MakeArtifact
from .test_api import module_of

PASSWORD = "correct horse battery"


@pytest.fixture
def console(api: Api) -> Iterator[Api]:
    """The API's server with a user of each role that has a password."""
    with api.server.database.session() as session:
        for role in ("admin", "operator", "auditor"):
            users.create_user(session, api.server.passwords, f"{role}-web", role, PASSWORD, "test")
    yield api


def browser(api: Api) -> TestClient:
    # https://testserver would set Secure cookies the test client then withholds over
    # http; the default base URL is http.
    return TestClient(api.app, follow_redirects=False)


def login(api: Api, role: str) -> TestClient:
    client = browser(api)
    page = client.get("/console/login")
    assert page.status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    r = client.post("/console/login", data={"csrf": csrf[1], "name": f"{role}-web",
                                            "password": PASSWORD, "next": "/console/hosts"})  # fmt: skip
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console/hosts"
    cookie = r.headers["set-cookie"]
    assert "mp_session=mpu_" in cookie and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
    return client


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, "no form with a CSRF token"
    return found[1]


def seed(api: Api, make_artifact: MakeArtifact) -> dict[str, Any]:
    """A published patch, a group, a host that checked in with a patched process and
    events, blocked attempts included."""
    data = make_artifact("fix-web", 1)
    r = api.client.post("/api/v1/patches", content=data, headers=api.auth("operator"))
    assert r.status_code == 201, r.text
    r = api.client.post("/api/v1/groups", json={"path": "/prod"}, headers=api.auth("admin"))
    assert r.status_code == 201, r.text
    host_id, _ = api.enroll("web-1", "/prod")
    now = time.time()
    checkin = {
        "kernel": "6.18.0", "agent_version": "0.1.0",
        "modules": [module_of(data)],
        "processes": [{"pid": 42, "exe": "/usr/bin/web", "patches": [
            {"patch_id": "fix-web", "version": 1, "state": "applied"}]}],
        "events": [
            {"kind": "applied", "time": now - 7200, "pid": 42, "patch_id": "fix-web",
             "version": 1, "message": "applied to <script>alert(1)</script>"},
            {"kind": "blocked", "time": now - 3600, "pid": 42, "patch_id": "fix-web",
             "data": {"count": 3}},
            {"kind": "blocked", "time": now - 60, "pid": 42, "patch_id": "fix-web",
             "data": {"count": 2}},
        ],
    }  # fmt: skip
    r = api.client.post("/api/v1/checkin", json=checkin, headers=api.auth("web-1"))
    assert r.status_code == 200, r.text
    return {"host_id": host_id}


def policy_of(api: Api, path: str) -> dict[str, Any]:
    r = api.client.get(f"/api/v1/policies{path}", headers=api.auth("admin"))
    assert r.status_code == 200, r.text
    return r.json()


def test_login_required_and_wrong_password(console: Api) -> None:
    client = browser(console)
    r = client.get("/console/hosts")
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next=")
    page = client.get("/console/login")
    csrf = csrf_of(page.text)
    assert page.headers["x-frame-options"] == "DENY"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    r = client.post("/console/login", data={"csrf": csrf, "name": "admin-web", "password": "no"})
    assert r.status_code == 401 and "wrong user name or password" in r.text
    assert "mp_session" not in r.headers.get("set-cookie", "")
    # The login form's own CSRF token (double submit): missing or wrong → 403.
    r = client.post("/console/login", data={"name": "admin-web", "password": PASSWORD})
    assert r.status_code == 403
    r = client.post("/console/login", data={"csrf": "x" + csrf, "name": "admin-web",
                                            "password": PASSWORD})  # fmt: skip
    assert r.status_code == 403
    # An open redirect is refused: after login, only a console path.
    r = client.post("/console/login", data={"csrf": csrf, "name": "admin-web",
                                            "password": PASSWORD, "next": "https://evil/"})  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == "/console/"
    # Guessing: past 5 failures the console says so (429), the API's throttle shared.
    csrf = csrf_of(client.get("/console/login").text)
    for _ in range(5):
        r = client.post("/console/login", data={"csrf": csrf, "name": "admin-web",
                                                "password": "guess"})  # fmt: skip
    assert r.status_code == 401
    r = client.post("/console/login", data={"csrf": csrf, "name": "admin-web",
                                            "password": PASSWORD})  # fmt: skip
    assert r.status_code == 429 and "too many failed logins" in r.text
    r = console.client.post("/api/v1/auth/token", json={"name": "admin-web", "password": PASSWORD})
    assert r.status_code == 429


def test_login_logout_is_audited_and_ends_the_session(console: Api) -> None:
    client = login(console, "operator")
    page = client.get("/console/")
    assert page.status_code == 200 and "Dashboard" in page.text
    session = client.cookies.get("mp_session")
    # Logging out needs the CSRF token too.
    assert client.post("/console/logout", data={}).status_code == 403
    assert client.get("/console/").status_code == 200
    r = client.post("/console/logout", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    # The session is gone server-side: the old cookie no longer works.
    again = browser(console)
    again.cookies.set("mp_session", session or "", path="/console")
    assert again.get("/console/").status_code == 303
    actions = [(a["actor"], a["action"]) for a in console.client.get(
        "/api/v1/audit", headers=console.auth("admin")).json()]  # fmt: skip
    assert ("user:operator-web", "user.login") in actions
    assert ("user:operator-web", "user.logout") in actions


def test_pages_render_with_data(console: Api, make_artifact: MakeArtifact) -> None:
    seeded = seed(console, make_artifact)
    client = login(console, "auditor")
    dashboard = client.get("/console/")
    assert dashboard.status_code == 200
    assert '<svg class="chart"' in dashboard.text
    assert 'id="blocked-count">5<' in dashboard.text  # 3 + 2 in the last 24 hours
    assert 'id="protected-count">1<' in dashboard.text
    # Event text is escaped, never markup.
    assert "<script>alert(1)</script>" not in dashboard.text
    assert "&lt;script&gt;" in dashboard.text
    assert ">web-1</a>" in dashboard.text  # recent events name their host
    host = client.get(f"/console/hosts/{seeded['host_id']}")
    assert host.status_code == 200
    assert "fix-web" in host.text and "/usr/bin/web" in host.text and "/prod" in host.text
    assert "default state for new patches of group /" in host.text  # the reason, explained
    assert client.get("/console/hosts/999").status_code == 404
    assert "web-1" in client.get("/console/hosts").text
    groups = client.get("/console/groups")
    assert "/prod" in groups.text
    group = client.get("/console/groups/policy", params={"path": "/prod"})
    assert group.status_code == 200 and "fix-web" in group.text
    patches = client.get("/console/patches")
    assert "fix-web" in patches.text and "<td>1</td><td>1</td>" in patches.text
    events = client.get("/console/events", params={"kind": "blocked"})
    assert (
        events.text.count('class="kind-blocked"') == 2 and 'class="kind-applied"' not in events.text
    )
    partial = client.get("/console/events", params={"kind": "applied"},
                         headers={"HX-Request": "true"})  # fmt: skip
    assert partial.text.lstrip().startswith('<div id="timeline">')
    assert "<html" not in partial.text and partial.text.count('class="kind-applied"') == 1
    assert "user.create" in client.get("/console/audit").text
    css = client.get("/console/static/console.css")
    assert css.status_code == 200
    js = client.get("/console/static/htmx.min.js")
    assert js.status_code == 200 and "0BSD" in js.text[:300]


def test_operator_disables_a_patch_for_a_group(console: Api, make_artifact: MakeArtifact) -> None:
    seed(console, make_artifact)
    client = login(console, "operator")
    page = client.get("/console/groups/policy", params={"path": "/prod"})
    assert 'class="inline write"' in page.text
    r = client.post("/console/groups/policy", data={
        "csrf": csrf_of(page.text), "path": "/prod", "action": "patch", "patch_id": "fix-web",
        "state": "disabled"})  # fmt: skip
    assert r.status_code == 303, r.text
    assert policy_of(console, "/prod")["group"]["patches"] == {"fix-web": "disabled"}
    r = console.client.get("/api/v1/hosts/1/policy", headers=console.auth("admin"))
    [decision] = r.json()["patches"]
    assert (decision["state"], decision["decided_by"]) == ("disabled", "/prod")
    # Default state, an exclusion and its removal, through the same form handler.
    csrf = csrf_of(page.text)
    for change in ({"action": "default", "state": "enabled"},
                   {"action": "exclude", "kind": "exe", "value": "/usr/bin/db*"},
                   {"action": "exclude", "kind": "user", "value": "nobody", "patch_id": "fix-web"},
                   {"action": "unexclude", "index": "0"}):  # fmt: skip
        r = client.post("/console/groups/policy", data={"csrf": csrf, "path": "/prod", **change})
        assert r.status_code == 303, r.text
    group = policy_of(console, "/prod")["group"]
    assert group["default_state"] == "enabled"
    assert group["exclusions"] == [{"kind": "user", "value": "nobody", "patch_id": "fix-web"}]
    assert group["patches"] == {"fix-web": "disabled"}  # untouched by the other changes
    bad = client.post("/console/groups/policy", data={"csrf": csrf, "path": "/prod",
                                                       "action": "default", "state": "maybe"})  # fmt: skip
    assert bad.status_code == 422
    audit = console.client.get("/api/v1/audit", headers=console.auth("admin")).json()
    mine = [a for a in audit if a["actor"] == "user:operator-web" and a["action"] == "policy.set"]
    assert len(mine) == 5  # the refused change wrote nothing
    # Enable per group from the patches page: back to it, the state shown there.
    page = client.get("/console/patches")
    r = client.post("/console/groups/policy", data={
        "csrf": csrf_of(page.text), "path": "/", "action": "patch", "patch_id": "fix-web",
        "state": "enabled", "back": "/patches"})  # fmt: skip
    assert r.status_code == 303 and r.headers["location"].startswith("/console/patches?done=")
    assert policy_of(console, "/")["group"]["patches"] == {"fix-web": "enabled"}
    assert "/: enabled" in client.get(r.headers["location"]).text
    # Revoke through the patches page.
    page = client.get("/console/patches")
    r = client.post("/console/patches/revoke", data={"csrf": csrf_of(page.text),
                                                      "patch_id": "fix-web", "version": "1",
                                                          "reason": "test"})  # fmt: skip
    assert r.status_code == 303
    r = console.client.get("/api/v1/patches/fix-web", headers=console.auth("admin"))
    assert r.json()[0]["revoked"] is True


@pytest.mark.parametrize("token", [None, "", "0" * 64, "wrong"])
def test_csrf_refused_nothing_changed(
    console: Api, make_artifact: MakeArtifact, token: str | None
) -> None:
    seed(console, make_artifact)
    client = login(console, "admin")
    before = policy_of(console, "/prod")
    audit_before = len(console.client.get("/api/v1/audit", headers=console.auth("admin")).json())
    form = {"path": "/prod", "action": "patch", "patch_id": "fix-web", "state": "disabled"}
    if token is not None:
        form["csrf"] = token
    r = client.post("/console/groups/policy", data=form)
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/console/patches/revoke", data={**form, "version": "1"})
    assert r.status_code == 403
    r = client.post("/console/groups", data={**form, "path": "/new"})
    assert r.status_code == 403
    assert policy_of(console, "/prod") == before
    assert console.client.get("/api/v1/patches/fix-web",
                              headers=console.auth("admin")).json()[0]["revoked"] is False  # fmt: skip
    assert (
        console.client.get("/api/v1/groups/new", headers=console.auth("admin")).status_code == 404
    )
    audit_after = console.client.get("/api/v1/audit", headers=console.auth("admin")).json()
    assert len(audit_after) == audit_before


def test_another_sessions_csrf_token_is_refused(console: Api, make_artifact: MakeArtifact) -> None:
    seed(console, make_artifact)
    other = login(console, "admin")
    stolen = csrf_of(other.get("/console/").text)
    client = login(console, "operator")
    r = client.post("/console/groups/policy", data={
        "csrf": stolen, "path": "/prod", "action": "default", "state": "disabled"})  # fmt: skip
    assert r.status_code == 403
    assert policy_of(console, "/prod")["group"]["default_state"] is None


# The console's routes against each role, as the API's matrix says (server.app):
# reading for every role, changing policies and revoking for admin and operator,
# creating groups for admin, the audit log for admin and auditor.
READS = ["/console/", "/console/hosts", "/console/hosts/1", "/console/groups",
         "/console/groups/policy?path=/prod", "/console/patches", "/console/events",
         "/console/hosts?state=vulnerable&sort=last_seen", "/console/hosts/1/retire",
         "/console/patches/revoke?patch_id=fix-web&version=1"]  # fmt: skip
MATRIX = {
    "admin": {"audit": 200, "policy": 303, "revoke": 303, "group": 303},
    "operator": {"audit": 403, "policy": 303, "revoke": 303, "group": 403},
    "auditor": {"audit": 200, "policy": 403, "revoke": 403, "group": 403},
}


@pytest.mark.parametrize("role", sorted(MATRIX))
def test_role_matrix(console: Api, make_artifact: MakeArtifact, role: str) -> None:
    seed(console, make_artifact)
    client = login(console, role)
    for url in READS:
        r = client.get(url)
        assert r.status_code == 200, f"{role} {url}: {r.status_code}"
        if role == "auditor":
            assert 'method="post" action="/console/groups' not in r.text, url
            assert "/console/patches/revoke" not in r.text, url
            assert 'class="inline write"' not in r.text, url
            assert 'class="write' not in r.text and "write confirm" not in r.text, url
    expected = MATRIX[role]
    r = client.get("/console/audit")
    assert r.status_code == expected["audit"]
    page = client.get("/console/")
    assert ('href="/console/audit"' in page.text) == (expected["audit"] == 200)
    csrf = csrf_of(page.text)
    r = client.post("/console/groups/policy", data={"csrf": csrf, "path": "/prod",
                    "action": "patch", "patch_id": "fix-web", "state": "disabled"})  # fmt: skip
    assert r.status_code == expected["policy"], r.text
    changed = policy_of(console, "/prod")["group"]["patches"]
    assert changed == ({"fix-web": "disabled"} if expected["policy"] == 303 else {})
    r = client.post("/console/groups", data={"csrf": csrf, "path": "/staging"})
    assert r.status_code == expected["group"], r.text
    r = client.post("/console/patches/revoke",
                    data={"csrf": csrf, "patch_id": "fix-web", "reason": "r"})  # fmt: skip
    assert r.status_code == expected["revoke"], r.text


def test_forms_only_urlencoded(console: Api) -> None:
    client = login(console, "admin")
    r = client.post("/console/groups", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415


def test_blocked_series_and_chart(console: Api) -> None:
    now = 100 * 3600 + 1800.0  # half past the hour
    with console.server.database.session() as session:
        host = m.Host(name="h", group_id=1, credential_hash="0" * 64, enrolled=0.0)
        session.add(host)
        session.flush()
        for at, data in ((now - 10, {"count": 4}), (now - 3600, {}), (now - 3 * 86400, {"count": 9}),
                         (now - 5, {"count": "x"})):  # fmt: skip
            session.add(m.Event(host_id=host.id, kind="blocked", time=at, received=at, data=data))
        session.add(m.Event(host_id=host.id, kind="applied", time=now, received=now, data={}))
    with console.server.database.session() as session:
        series = blocked_series(session, now=now)
    assert len(series) == 24 and series[-1] == (100 * 3600.0, 5)  # 4, and 1 for a bad count
    assert series[-2][1] == 1 and sum(n for _, n in series) == 6  # 3 days ago: not shown
    svg = str(chart_svg(series))
    assert svg.startswith("<svg") and svg.count('class="bar"') == 24
    assert 'data-count="5"' in svg and "<script" not in svg
    assert 'height="0.0"' in str(chart_svg([(0.0, 0)] * 24))


def test_hosts_and_events_a_page_at_a_time(console: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet has thousands of hosts and events: the pages show a page, and link on."""
    from micropatch.server.console import events, hosts

    monkeypatch.setattr(hosts, "HOSTS_PER_PAGE", 2)
    monkeypatch.setattr(events, "EVENTS_PER_PAGE", 3)
    for i in range(5):
        console.enroll(f"h{i}")
    events = [{"kind": "blocked", "time": 100.0 + n // 2, "pid": 1, "message": f"e{n}"}
              for n in range(7)]  # two by two at the same time: ties broken by id  # fmt: skip
    r = console.client.post("/api/v1/checkin", json={"events": events}, headers=console.auth("h0"))
    assert r.json()["events_accepted"] == 7
    client = login(console, "auditor")
    first = client.get("/console/hosts").text
    assert "5 hosts · page 1 of 3" in first and ">h0</a>" in first and ">h2</a>" not in first
    assert "page=2" in first and "previous" not in first
    last = client.get("/console/hosts", params={"page": 3}).text
    assert ">h4</a>" in last and ">h3</a>" not in last and "next" not in last
    seen = []
    url = "/console/events?kind=blocked"
    while url:
        page = client.get(url).text
        seen += re.findall(r"e(\d)</", page)
        older = re.search(r'href="/console(/events\?[^"]*before=\d+)"', page)
        url = "/console" + older[1].replace("&amp;", "&") if older else ""
    assert seen == ["6", "5", "4", "3", "2", "1", "0"]  # newest first, each once

"""The console's credential lifecycle (users, API tokens, enrollment tokens), moving
and retiring hosts, revoking with a reason, and the audit log's pages: each write
behind CSRF and the admin role, each refusal leaving things as they were."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from micropatch.server import models as m

from .conftest import Api, MakeArtifact
from .test_console import PASSWORD, browser, console, csrf_of, login, seed  # noqa: F401


def audit_actions(api: Api) -> list[tuple[str, str, dict[str, object]]]:
    r = api.client.get("/api/v1/audit", headers=api.auth("admin"))
    return [(a["action"], a["subject"], a["details"]) for a in r.json()]


def post(client: TestClient, url: str, **form: str) -> tuple[int, str]:
    page = client.get("/console/")
    r = client.post(url, data={"csrf": csrf_of(page.text), **form})
    return r.status_code, r.headers.get("location", r.text)


def secret_of(page: str) -> str:
    found = re.search(r'<div class="secret"[^>]*>.*?<code>([^<]+)</code>', page, re.S)
    assert found is not None, "no secret shown"
    return found[1]


def test_users_lifecycle(console: Api) -> None:  # noqa: F811
    admin = login(console, "admin")
    assert admin.get("/console/users").status_code == 200
    page = admin.get("/console/users")
    r = admin.post("/console/users", data={"csrf": csrf_of(page.text), "name": "bob",
                   "role": "operator", "password": "bob-password", "expires_days": "30"})  # fmt: skip
    assert r.status_code == 200 and "The API token of bob:" in r.text
    token = secret_of(r.text)
    as_bob = {"Authorization": f"Bearer {token}"}
    assert console.client.get("/api/v1/patches", headers=as_bob).status_code == 200
    r = console.client.get("/api/v1/tokens", params={"user": "bob"}, headers=console.auth("admin"))
    [info] = r.json()
    assert 29 * 86400 < info["expires"] - info["created"] <= 30 * 86400
    # Disabled: its token refused at once; enabled: accepted again.
    assert post(admin, "/console/users/bob/state", state="disabled")[0] == 303
    assert console.client.get("/api/v1/patches", headers=as_bob).status_code == 401
    assert "disabled" in admin.get("/console/users/bob").text
    assert post(admin, "/console/users/bob/state", state="enabled")[0] == 303
    assert console.client.get("/api/v1/patches", headers=as_bob).status_code == 200
    # A new password: the two must agree and be long enough; then bob logs in with it.
    status, text = post(admin, "/console/users/bob/password", password="x" * 9, again="y" * 9)
    assert status == 422 and "differ" in text
    status, text = post(admin, "/console/users/bob/password", password="short", again="short")
    assert status == 422 and "at least 8" in text
    assert post(admin, "/console/users/bob/password", password="n" * 10, again="n" * 10)[0] == 303
    r = console.client.post("/api/v1/auth/token", json={"name": "bob", "password": "n" * 10})
    assert r.status_code == 200
    # An admin cannot disable or delete itself.
    status, text = post(admin, "/console/users/admin-web/state", state="disabled")
    assert status == 422 and "cannot disable itself" in text
    assert post(admin, "/console/users/admin-web/delete")[0] == 422
    # Deleted after the confirmation page: its tokens gone with it.
    confirm = admin.get("/console/users/bob/delete")
    assert confirm.status_code == 200 and "Delete bob" in confirm.text
    assert post(admin, "/console/users/bob/delete")[0] == 303
    assert console.client.get("/api/v1/patches", headers=as_bob).status_code == 401
    assert admin.get("/console/users/bob").status_code == 404
    actions = [a for a, s, _ in audit_actions(console) if s == "user:bob"]
    for action in ("user.create", "user.disable", "user.enable", "user.password", "user.delete"):
        assert action in actions
    # Refused input: a bad name, a bad lifetime; nothing made.
    status, text = post(admin, "/console/users", name="-bad", role="admin", expires_days="")
    assert status == 422 and "user name" in text
    status, text = post(admin, "/console/users", name="carol", role="admin", expires_days="9x")
    assert status == 422 and "days" in text
    with console.server.database.reading() as session:
        assert session.query(m.User).filter(m.User.name == "carol").count() == 0


def test_api_tokens(console: Api) -> None:  # noqa: F811
    admin = login(console, "admin")
    status, page = post(admin, "/console/tokens", user="operator-web", label="ci-publish",
                        expires_days="7")  # fmt: skip
    assert status == 200
    token = secret_of(page)
    assert "ci-publish" in page
    auth = {"Authorization": f"Bearer {token}"}
    assert console.client.get("/api/v1/patches", headers=auth).status_code == 200
    token_id = next(
        t["id"] for t in console.client.get("/api/v1/tokens", headers=console.auth("admin")).json()
        if t["label"] == "ci-publish"
    )  # fmt: skip
    status, text = post(admin, "/console/tokens", user="operator-web", label="console")
    assert status == 422 and "kept for sessions" in text
    status, text = post(admin, "/console/tokens", user="nobody", label="x")
    assert status == 404
    assert post(admin, f"/console/tokens/{token_id}/revoke")[0] == 303
    assert console.client.get("/api/v1/patches", headers=auth).status_code == 401
    assert post(admin, f"/console/tokens/{token_id}/revoke")[0] == 404
    # Revoking a console session logs that browser out at once.
    operator = login(console, "operator")
    session_id = next(
        t["id"] for t in console.client.get("/api/v1/tokens", headers=console.auth("admin")).json()
        if t["label"] == "console" and t["user"] == "operator-web"
    )  # fmt: skip
    assert post(admin, f"/console/tokens/{session_id}/revoke", back="/users/operator-web") == (
        303,
        "/console/users/operator-web?done=token+" + str(session_id) + "+revoked",
    )
    assert operator.get("/console/").status_code == 303  # to the login page
    actions = [a for a, _, _ in audit_actions(console)]
    assert "token.create" in actions and actions.count("token.revoke") == 2


def test_enrollment_tokens(console: Api) -> None:  # noqa: F811
    admin = login(console, "admin")
    r = console.client.post("/api/v1/groups", json={"path": "/prod"}, headers=console.auth("admin"))
    assert r.status_code == 201
    status, page = post(admin, "/console/enrollment", group="/prod", expires_hours="2")
    assert status == 200 and "micropatch agent enroll http://testserver --token " in page
    token = secret_of(page)
    r = console.client.post("/api/v1/enroll", json={"token": token, "hostname": "new-1"})
    assert r.status_code == 201, r.text
    page = admin.get("/console/enrollment").text
    assert 'by <a href="/console/hosts/' in page  # used, by which host
    status, page = post(admin, "/console/enrollment", group="/prod", expires_hours="")
    unused = secret_of(page)
    [row] = [t for t in console.client.get("/api/v1/enrollment-tokens", params={"unused": True},
             headers=console.auth("admin")).json()]  # fmt: skip
    assert row["expires"] is None
    assert post(admin, f"/console/enrollment/{row['id']}/revoke")[0] == 303
    r = console.client.post("/api/v1/enroll", json={"token": unused, "hostname": "new-2"})
    assert r.status_code == 401
    status, text = post(admin, "/console/enrollment", group="/nowhere")
    assert status == 404 and "/nowhere" in text
    status, text = post(admin, "/console/enrollment", group="/prod", expires_hours="-1")
    assert status == 422


def test_host_move_and_retire(console: Api, make_artifact: MakeArtifact) -> None:  # noqa: F811
    host_id = seed(console, make_artifact)["host_id"]
    admin = login(console, "admin")
    page = admin.get(f"/console/hosts/{host_id}").text
    assert 'action="/console/hosts/' in page and "Retire" in page
    assert post(admin, f"/console/hosts/{host_id}/group", group="/")[0] == 303
    r = console.client.get(f"/api/v1/hosts/{host_id}", headers=console.auth("admin"))
    assert r.json()["group"] == "/"
    status, text = post(admin, f"/console/hosts/{host_id}/group", group="/missing")
    assert status == 404 and "/missing" in text
    assert admin.get(f"/console/hosts/{host_id}/retire").status_code == 200
    status, where = post(admin, f"/console/hosts/{host_id}/retire")
    assert status == 303 and "retired" in where
    assert (
        console.client.post("/api/v1/checkin", json={}, headers=console.auth("web-1")).status_code
        == 401
    )
    assert admin.get(f"/console/hosts/{host_id}").status_code == 404
    actions = [a for a, _, _ in audit_actions(console)]
    assert "host.move" in actions and "host.delete" in actions


def test_revoke_asks_for_a_reason(console: Api, make_artifact: MakeArtifact) -> None:  # noqa: F811
    seed(console, make_artifact)
    operator = login(console, "operator")
    page = operator.get("/console/patches").text
    assert "/console/patches/revoke?patch_id=fix-web&amp;version=1" in page
    confirm = operator.get(
        "/console/patches/revoke", params={"patch_id": "fix-web", "version": "1"}
    )
    assert confirm.status_code == 200 and 'name="reason"' in confirm.text
    assert operator.get("/console/patches/revoke", params={"patch_id": "nope"}).status_code == 404
    status, text = post(operator, "/console/patches/revoke", patch_id="fix-web", version="1",
                        reason="   ")  # fmt: skip
    assert status == 422 and "say why" in text
    r = console.client.get("/api/v1/patches", headers=console.auth("admin"))
    assert r.json()[0]["revoked"] is False  # refused: nothing changed
    status, _ = post(operator, "/console/patches/revoke", patch_id="fix-web", version="1",
                     reason="crashes  workers\non reload")  # fmt: skip
    assert status == 303
    [details] = [d for a, _, d in audit_actions(console) if a == "patch.revoke"]
    assert details["reason"] == "crashes workers on reload"


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_admin_pages_refused(console: Api, role: str) -> None:  # noqa: F811
    client = login(console, role)
    for url in ("/console/users", "/console/users/admin-web", "/console/tokens",
                "/console/enrollment"):  # fmt: skip
        assert client.get(url).status_code == 403, url
    page = client.get("/console/").text
    assert 'href="/console/users"' not in page
    for url, form in (("/console/users", {"name": "eve", "role": "admin"}),
                      ("/console/users/admin-web/state", {"state": "disabled"}),
                      ("/console/users/admin-web/delete", {}),
                      ("/console/tokens", {"user": "admin-web"}),
                      ("/console/enrollment", {"group": "/"})):  # fmt: skip
        assert post(client, url, **form)[0] == 403, url
    with console.server.database.reading() as session:
        assert session.query(m.User).filter(m.User.name == "eve").count() == 0
        assert session.query(m.EnrollmentToken).count() == 0
        admin = session.query(m.User).filter(m.User.name == "admin-web").one()
        assert admin.disabled is None


def test_writes_need_the_csrf_token(console: Api) -> None:  # noqa: F811
    admin = login(console, "admin")
    for url, form in (("/console/users", {"name": "eve", "role": "admin"}),
                      ("/console/users/operator-web/delete", {}),
                      ("/console/tokens", {"user": "admin-web"}),
                      ("/console/enrollment", {"group": "/"})):  # fmt: skip
        r = admin.post(url, data={**form, "csrf": "0" * 64})
        assert r.status_code == 403 and "CSRF" in r.text, url
    with console.server.database.reading() as session:
        assert session.query(m.User).filter(m.User.name.in_(["eve", "operator-web"])).count() == 1
        assert session.query(m.EnrollmentToken).count() == 0


def test_audit_pages_and_readable_details(console: Api, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from micropatch.server.console import events

    monkeypatch.setattr(events, "AUDIT_PER_PAGE", 3)
    for path in ("/a", "/b", "/c", "/d"):
        r = console.client.post("/api/v1/groups", json={"path": path},
                                headers=console.auth("admin"))  # fmt: skip
        assert r.status_code == 201
    r = console.client.put("/api/v1/policies/a", json={"patches": {"fix": "enabled"}},
                           headers=console.auth("admin"))  # fmt: skip
    assert r.status_code == 200
    client = login(console, "auditor")
    seen: list[str] = []
    url = "/console/audit"
    first = client.get(url).text
    assert "<dt>patches</dt><dd>fix: enabled</dd>" in first  # not JSON
    assert "&#34;" not in first and "&quot;" not in first
    while url:
        page = client.get(url).text
        seen += re.findall(r"<td>(group\.create|policy\.set|user\.[a-z]+)</td>", page)
        older = re.search(r'href="(/console/audit\?before=\d+)">older', page)
        url = older[1] if older else ""
    assert seen.count("group.create") == 4 and seen.count("policy.set") == 1
    assert seen.index("policy.set") < seen.index("group.create")  # newest first


def test_enrollment_page_lists_the_newest_used(
    console: Api,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fleet uses a token per host: every unused token, only the newest used ones."""
    from micropatch.server.console import enrollment

    monkeypatch.setattr(enrollment, "USED_SHOWN", 1)
    ids = [console.enroll(f"h{i}")[0] for i in range(3)]
    r = console.client.post("/api/v1/enrollment-tokens", json={}, headers=console.auth("admin"))
    assert r.status_code == 201
    page = login(console, "admin").get("/console/enrollment").text
    assert "of the 3 used, the 1 newest" in page
    assert (
        page.count("not yet") == 1 and f"host {ids[-1]}<" in page and f"host {ids[0]}<" not in page
    )


def test_expired_tokens_are_counted_not_listed(console: Api) -> None:  # noqa: F811
    with console.server.database.session() as session:
        rows = session.query(m.ApiToken).filter(m.ApiToken.label == "created with the user")
        rows.filter(m.ApiToken.user_id == 1).update({"expires": 1.0})  # the API's "admin"
    page = login(console, "admin").get("/console/tokens").text
    assert "Not shown: 1 expired token or session" in page
    assert '<a href="/console/users/admin">admin</a>' not in page

"""The console's administration in a real browser (Debian's chromium, Playwright),
against a real `micropatch server run`: compliance on the dashboard, the hosts list
searched, filtered and sorted, users, API tokens and enrollment tokens through their
lifecycle, a host moved and retired, a patch revoked with a reason, the audit log
read, the 404 page, and /docs rendered with every request outside the server
refused (no CDN). Screenshots under tests/artifacts/console/ (1x-NAME.png)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from unit.server.conftest import make_artifact, module, signing_key  # noqa: F401 (fixtures)

from micropatch.trust.artifact import loads

from .test_console_browser import CHROMIUM, create_user, log_in, pytestmark, shot  # noqa: F401
from .test_console_browser import chromium as chromium
from .test_server import data_dir, micropatch, server  # noqa: F401 (fixtures)
from .test_server import database as _database  # noqa: F401 (the autouse fixture)


def seed(api: httpx.Client, admin: dict[str, str], data: bytes) -> dict[str, int]:
    """/prod with three hosts: web-1 carries the patch, web-2 has the module and not
    the patch, db-1 lacks the module."""
    facts = loads(data).payload.module
    loaded = {"name": facts.name, "path": "/opt/libcheck.so", "build_id": facts.build_id,
              "sha256": facts.sha256}  # fmt: skip
    r = api.post("/api/v1/groups", json={"path": "/prod"}, headers=admin)
    assert r.status_code == 201, r.text
    r = api.post("/api/v1/groups", json={"path": "/staging"}, headers=admin)
    ids = {}
    for name, modules, carried in (("web-1", [loaded], True), ("web-2", [loaded], False),
                                   ("db-1", [], False)):  # fmt: skip
        r = api.post("/api/v1/enrollment-tokens", json={"group": "/prod"}, headers=admin)
        r = api.post("/api/v1/enroll", json={"token": r.json()["token"], "hostname": name})
        assert r.status_code == 201, r.text
        ids[name] = r.json()["host_id"]
        processes = [{"pid": 42, "exe": "/usr/bin/web", "patches": [
            {"patch_id": "fix-int", "version": 1, "state": "applied"}]}] if carried else []  # fmt: skip
        r = api.post("/api/v1/checkin", json={"modules": modules, "processes": processes},
                     headers={"Authorization": f"Bearer {r.json()['credential']}"})  # fmt: skip
        assert r.status_code == 200, r.text
    return ids


def test_console_administration(
    data_dir: Path,  # noqa: F811
    server: str,  # noqa: F811
    make_artifact: Any,  # noqa: F811
    tmp_path: Path,
    chromium: Any,
) -> None:
    operator = create_user(data_dir, "olga", "operator")
    admin_token = create_user(data_dir, "ada", "admin")
    api = httpx.Client(base_url=server, timeout=30)
    as_admin = {"Authorization": f"Bearer {admin_token}"}
    data = make_artifact("fix-int", 1)
    artifact = tmp_path / loads(data).file_name
    artifact.write_bytes(data)
    done = micropatch("publish", artifact, "--server", server, "--token", operator)
    assert done.returncode == 0, done.stderr
    r = api.put("/api/v1/policies/", json={"patches": {"fix-int": "enabled"}}, headers=as_admin)
    assert r.status_code == 200, r.text
    ids = seed(api, as_admin, data)

    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    # Nothing but the server: /docs must not need a CDN.
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server)
                  else route.abort())  # fmt: skip
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    expected_404: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and not (
        expected_404 and "404" in m.text) else None)  # fmt: skip
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}")
            if r.status >= 400 and r.url not in expected_404 else None)  # fmt: skip

    # / leads to the console; the dashboard counts compliance; 0 blocked is not red.
    page.goto(f"{server}/")
    assert "/console/login" in page.url
    log_in(page, server, "ada")
    for state, n in (("vulnerable", "1"), ("outdated", "0"), ("protected", "1")):
        assert page.inner_text(f"#hosts-{state} .n") == n, state
    color = page.eval_on_selector("#blocked-count", "e => getComputedStyle(e).color")
    assert color != "rgb(180, 35, 24)", color  # var(--bad): only for blocked attempts
    assert "3 online" in page.inner_text("#liveness-counts")
    shot(page, "1a-dashboard-compliance")

    # Hosts: the vulnerable card leads to them; search, sort.
    page.click("#hosts-vulnerable")
    page.wait_for_url(re.compile(r".*/console/hosts\?state=vulnerable$"))
    assert page.locator("#hosts tbody tr").count() == 1 and "web-2" in page.inner_text("#hosts")
    page.goto(f"{server}/console/hosts")
    page.fill("input[name=q]", "web")
    page.click("#host-filters button")
    page.wait_for_url(re.compile(r".*q=web.*"))
    assert page.inner_text("#host-count").startswith("2 hosts")
    page.click("#hosts th a:text('name')")  # sorted by name: now descending
    page.wait_for_url(re.compile(r".*order=desc.*"))
    names = page.locator("#hosts tbody td:nth-child(2)").all_inner_texts()
    assert names == ["web-2", "web-1"]
    shot(page, "1b-hosts-search-sorted")

    # Users: create one (its token shown once), disable, enable, set its password, delete.
    page.click("nav >> text=Users")
    page.fill("#create-user input[name=name]", "bob")
    page.select_option("#create-user select[name=role]", "operator")
    page.fill("#create-user input[name=password]", "bob-password-1")
    page.click("#create-user button")
    token = page.inner_text("#secret code").strip()
    assert token.startswith("mpu_")
    shot(page, "1c-user-created")
    bob = {"Authorization": f"Bearer {token}"}
    assert api.get("/api/v1/patches", headers=bob).status_code == 200
    page.click("#users a:text-is('bob')")
    page.click("button:text('Disable')")
    page.wait_for_selector(".notice")
    assert "disabled" in page.inner_text("#user-state")
    assert api.get("/api/v1/patches", headers=bob).status_code == 401
    page.click("button:text('Enable')")
    page.wait_for_selector(".notice")
    page.fill("#set-password input[name=password]", "new-password-2")
    page.fill("#set-password input[name=again]", "new-password-2")
    page.click("#set-password button")
    page.wait_for_selector(".notice")
    assert "password of bob set" in page.inner_text(".notice")
    shot(page, "1d-user")
    page.click("a:text('Delete…')")
    shot(page, "1e-user-delete-confirm")
    page.click("button:text('Delete bob')")
    page.wait_for_url(re.compile(r".*/console/users\?done=.*"))
    assert "bob" not in page.inner_text("#users")
    assert api.get("/api/v1/patches", headers=bob).status_code == 401

    # API tokens: create one for olga with 7 days, then revoke it.
    page.click("nav >> text=API tokens")
    page.select_option("#create-token select[name=user]", "olga")
    page.fill("#create-token input[name=label]", "ci-publish")
    page.fill("#create-token input[name=expires_days]", "7")
    page.click("#create-token button")
    ci = page.inner_text("#secret code").strip()
    assert api.get("/api/v1/patches", headers={"Authorization": f"Bearer {ci}"}).status_code == 200
    shot(page, "1f-tokens")
    page.locator("#tokens tr", has_text="ci-publish").locator("button:text('Revoke')").click()
    page.wait_for_selector(".notice")
    assert "ci-publish" not in page.inner_text("#tokens")
    assert api.get("/api/v1/patches", headers={"Authorization": f"Bearer {ci}"}).status_code == 401

    # Enrollment: a token for /staging, shown once with the command; revoked.
    page.click("nav >> text=Enrollment")
    page.select_option("#create-enrollment select[name=group]", "/staging")
    page.click("#create-enrollment button")
    assert "micropatch agent enroll" in page.inner_text("#secret")
    enroll = page.inner_text("#secret code").strip()
    shot(page, "1g-enrollment")
    page.locator("#enrollment-tokens tr", has_text="/staging").locator("button").click()
    page.wait_for_selector(".notice")
    r = api.post("/api/v1/enroll", json={"token": enroll, "hostname": "late"})
    assert r.status_code == 401

    # A host: moved to /staging, then retired after the confirmation page.
    page.goto(f"{server}/console/hosts/{ids['db-1']}")
    page.select_option("#move select[name=group]", "/staging")
    page.click("#move button")
    page.wait_for_selector(".notice")
    assert "moved to /staging" in page.inner_text(".notice")
    shot(page, "1h-host-moved")
    page.click("a:text('Retire…')")
    shot(page, "1i-host-retire-confirm")
    page.click("button:text('Retire db-1')")
    page.wait_for_url(re.compile(r".*/console/hosts\?done=.*"))
    assert "db-1" not in page.inner_text("#hosts")

    # Revoke with a confirmation and a reason; the audit log says it, readably.
    page.click("nav >> text=Patches")
    page.click("a:text('Revoke v1…')")
    shot(page, "1j-revoke-confirm")
    page.fill("textarea[name=reason]", "breaks reloads")
    page.click("button:text-is('Revoke')")
    page.wait_for_url(re.compile(r".*/console/patches\?done=.*"))
    page.click("nav >> text=Audit log")
    audit = page.inner_text("#audit")
    assert "patch.revoke" in audit and "breaks reloads" in audit and '"' not in audit
    shot(page, "1k-audit")

    # The events page's host filter is typed, not a list of the fleet.
    page.goto(f"{server}/console/events")
    assert page.locator("select[name=host]").count() == 0
    page.fill("input[name=host]", "no-such-host")
    page.press("input[name=host]", "Enter")
    page.wait_for_selector("#timeline .error")
    shot(page, "1l-events-host-filter")

    # An unknown console URL: an HTML page with the menu.
    expected_404.append(f"{server}/console/nowhere")
    page.goto(f"{server}/console/nowhere")
    assert page.inner_text("h1") == "Not found" and page.locator("nav").count() == 1
    shot(page, "1m-404")

    # /docs: Swagger UI from the server alone (every other request is aborted).
    page.goto(f"{server}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
    assert page.locator(".swagger-ui .opblock").count() > 20
    shot(page, "1n-api-docs")
    assert not errors, errors
    context.close()

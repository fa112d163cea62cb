"""The web console in a real browser: Debian's chromium driven by Playwright, against
a real `micropatch server run` with users made by `server admin create-user` and a
host seeded through the JSON API by a simulated agent (as test_server.py does).

Screenshots of every page go to tests/artifacts/console/ (ignored by git; the path
is printed). Skipped only when no chromium is installed (`apt-get install chromium`):
Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from unit.server.conftest import make_artifact, module, signing_key  # noqa: F401 (fixtures)

from micropatch.trust.artifact import loads

from .test_server import data_dir, micropatch, server  # noqa: F401 (fixtures)
from .test_server import database as _database  # noqa: F401 (the autouse fixture)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()),
    None,
)
PASSWORD = "console-test-pw"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium at /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture
def chromium() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--headless", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield browser
        browser.close()


def create_user(data_dir: Path, name: str, role: str) -> str:  # noqa: F811
    done = micropatch("server", "admin", "create-user", name, "--role", role,
                      "--password-stdin", "--data-dir", data_dir, stdin=PASSWORD + "\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def log_in(page: Any, base: str, name: str) -> None:
    page.goto(f"{base}/console/")
    assert "/console/login" in page.url  # not logged in yet: sent to the login page
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/console/")


def test_console_in_chromium(
    data_dir: Path,  # noqa: F811
    server: str,  # noqa: F811
    make_artifact: Any,  # noqa: F811
    tmp_path: Path,
    chromium: Any,
) -> None:
    operator = create_user(data_dir, "olga", "operator")
    admin = create_user(data_dir, "ada", "admin")
    create_user(data_dir, "aud", "auditor")
    api = httpx.Client(base_url=server, timeout=30)
    as_admin = {"Authorization": f"Bearer {admin}"}

    # A patch, a group, a host in it that checked in with a patched process and
    # blocked attempts, through the JSON API.
    data = make_artifact("fix-int", 1)
    artifact = tmp_path / loads(data).file_name
    artifact.write_bytes(data)
    done = micropatch("publish", artifact, "--server", server, "--token", operator)
    assert done.returncode == 0, done.stderr
    r = api.post("/api/v1/groups", json={"path": "/prod"}, headers=as_admin)
    assert r.status_code == 201, r.text
    r = api.post("/api/v1/enrollment-tokens", json={"group": "/prod"}, headers=as_admin)
    r = api.post("/api/v1/enroll", json={"token": r.json()["token"], "hostname": "web-1",
                                         "kernel": "6.18", "agent_version": "0.1"})  # fmt: skip
    assert r.status_code == 201, r.text
    host_id, credential = r.json()["host_id"], r.json()["credential"]
    facts = loads(data).payload.module
    now = time.time()
    checkin = {
        "modules": [{"name": facts.name, "path": "/opt/libcheck.so", "build_id": facts.build_id,
                     "sha256": facts.sha256}],
        "processes": [{"pid": 4242, "exe": "/usr/bin/web", "unit": "web.service", "user": "www",
                       "patches": [{"patch_id": "fix-int", "version": 1, "state": "applied"}]}],
        "events": [{"kind": "applied", "time": now - 5 * 3600, "pid": 4242,
                    "patch_id": "fix-int", "version": 1, "message": "applied"}]
        + [{"kind": "blocked", "time": now - h * 3600 - 30, "pid": 4242, "patch_id": "fix-int",
            "data": {"count": n}} for h, n in ((4, 2), (3, 5), (1, 1), (0, 3))],
    }  # fmt: skip
    r = api.post("/api/v1/checkin", json=checkin, headers={"Authorization": f"Bearer {credential}"})
    assert r.status_code == 200 and r.json()["patches"][0]["state"] == "enabled", r.text

    print(f"\nconsole screenshots: {ARTIFACTS}")
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    # Login page, then the dashboard with its chart.
    page.goto(f"{server}/console/login")
    shot(page, "01-login")
    cookies_before = context.cookies()
    assert all(c["httpOnly"] and c["sameSite"] == "Strict" for c in cookies_before)
    log_in(page, server, "olga")
    session = [c for c in context.cookies() if c["name"] == "mp_session"]
    assert session and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"
    assert page.inner_text("#blocked-count") == "11"
    assert page.inner_text("#protected-count") == "1"
    bars = page.locator("#blocked-chart svg rect.bar")
    assert bars.count() == 24
    assert page.locator('#blocked-chart svg rect.bar[data-count="5"]').count() == 1
    assert page.locator("#blocked-chart svg").bounding_box()["height"] > 100
    assert page.evaluate("typeof htmx") == "object"  # the vendored htmx loaded
    shot(page, "02-dashboard")

    # A host: inventory, applied patches per process, effective policy with "decided by".
    page.click("text=Hosts")
    page.wait_for_url(f"{server}/console/hosts")
    shot(page, "03-hosts")
    page.click("text=web-1")
    page.wait_for_url(f"{server}/console/hosts/{host_id}")
    assert "/usr/bin/web" in page.inner_text("#processes")
    effective = page.inner_text("#effective")
    assert "fix-int" in effective and "enabled" in effective
    shot(page, "04-host")

    # Disable the patch for /prod through the group's form.
    page.goto(f"{server}/console/groups")
    shot(page, "05-groups")
    page.click("a:text-is('/prod')")
    page.select_option("select[aria-label='state of fix-int in /prod']", "disabled")
    page.locator("#group-patches button:text('Set')").click()
    page.wait_for_selector(".notice")
    assert "fix-int in /prod: disabled" in page.inner_text(".notice")
    shot(page, "06-group-policy")
    r = api.get(f"/api/v1/hosts/{host_id}/policy", headers=as_admin)
    [decision] = r.json()["patches"]
    assert (decision["state"], decision["decided_by"]) == ("disabled", "/prod")
    r = api.post("/api/v1/checkin", json={"modules": checkin["modules"]},
                 headers={"Authorization": f"Bearer {credential}"})  # fmt: skip
    assert r.json()["patches"][0]["state"] == "disabled"  # what the agent is told
    audit = api.get("/api/v1/audit", headers=as_admin).json()
    entry = next(a for a in audit if a["action"] == "policy.set")
    assert entry["actor"] == "user:olga" and entry["subject"] == "group:/prod"
    assert entry["details"]["patches"] == {"fix-int": "disabled"}
    page.goto(f"{server}/console/hosts/{host_id}")
    assert "disabled" in page.inner_text("#effective") and "/prod" in page.inner_text("#effective")

    # Patches, and the events timeline filtered through htmx.
    page.goto(f"{server}/console/patches")
    assert "fix-int" in page.inner_text("#patches")
    shot(page, "07-patches")
    page.goto(f"{server}/console/events")
    assert page.locator("tr.kind-blocked").count() == 4
    page.select_option("select[name=kind]", "applied")  # htmx swaps the table in place
    page.wait_for_selector("tr.kind-blocked", state="detached")  # no eval: the CSP forbids it
    assert page.locator("tr.kind-applied").count() == 1
    assert "kind=applied" in page.url  # hx-push-url
    shot(page, "08-events")
    # The operator has no audit log (the API's matrix).
    assert page.locator("nav >> text=Audit log").count() == 0
    page.click("header button:text('Log out')")
    page.wait_for_url(f"{server}/console/login")

    # The auditor: read-only pages, no write form anywhere; the audit log.
    log_in(page, server, "aud")
    for path in ("/console/", f"/console/hosts/{host_id}", "/console/groups",
                 "/console/groups/policy?path=/prod", "/console/patches", "/console/events"):  # fmt: skip
        page.goto(server + path)
        assert page.locator("form[method=post]").count() == 1, path  # only "Log out"
        assert page.locator("form.write").count() == 0, path
    page.goto(f"{server}/console/groups/policy?path=/prod")
    shot(page, "09-auditor-group")
    page.goto(f"{server}/console/audit")
    assert "policy.set" in page.inner_text("#audit") and "user:olga" in page.inner_text("#audit")
    shot(page, "10-audit")
    assert not errors, errors
    context.close()

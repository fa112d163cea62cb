"""The console an admin lives in: compliance per host and per patch, the hosts list
(search, group, online state, compliance, sort, pages), the dashboard's counts,
`/`, the console's 404 page and the API docs served without a CDN."""

from __future__ import annotations

import re
import time

from micropatch.server import models as m
from micropatch.server.console.liveness import liveness
from micropatch.server.fleet import compliance

from .conftest import Api, MakeArtifact
from .test_api import module_of
from .test_console import console, login  # noqa: F401 (the fixture)


def checkin(api: Api, host: str, data: bytes | None, carried: int | None) -> None:
    processes = []
    if carried is not None:
        processes = [{"pid": 7, "exe": "/usr/bin/web", "patches": [
            {"patch_id": "fix-web", "version": carried, "state": "applied"}]}]  # fmt: skip
    body = {"modules": [module_of(data)] if data else [], "processes": processes}
    r = api.client.post("/api/v1/checkin", json=body, headers=api.auth(host))
    assert r.status_code == 200, r.text


def fleet(api: Api, make_artifact: MakeArtifact) -> None:
    """fix-web v1 and v2 published, enabled at the root; five hosts: one carrying v2
    (protected), one v1 (outdated), one nothing (vulnerable), one without the module,
    one in /lab where the patch is disabled (not counted)."""
    for version in (1, 2):
        data = make_artifact("fix-web", version)
        r = api.client.post("/api/v1/patches", content=data, headers=api.auth("operator"))
        assert r.status_code == 201, r.text
    for path in ("/prod", "/prod/web", "/lab"):
        r = api.client.post("/api/v1/groups", json={"path": path}, headers=api.auth("admin"))
        assert r.status_code == 201, r.text
    r = api.client.put("/api/v1/policies/", json={"patches": {"fix-web": "enabled"}},
                       headers=api.auth("admin"))  # fmt: skip
    assert r.status_code == 200, r.text
    r = api.client.put("/api/v1/policies/lab", json={"patches": {"fix-web": "disabled"}},
                       headers=api.auth("admin"))  # fmt: skip
    assert r.status_code == 200, r.text
    for name, group, carried, module in (
        ("web-new", "/prod/web", 2, True), ("web-old", "/prod/web", 1, True),
        ("db-bare", "/prod", None, True), ("mail", "/prod", None, False),
        ("lab-1", "/lab", None, True),
    ):  # fmt: skip
        api.enroll(name, group)
        checkin(api, name, data if module else None, carried)


def test_compliance_counted_by_the_database(console: Api, make_artifact: MakeArtifact) -> None:  # noqa: F811
    fleet(console, make_artifact)
    with console.server.database.reading() as session:
        catalogue = console.server.catalogues.current(session)
        assert compliance.fleet_counts(catalogue, session) == {
            "vulnerable": 1, "outdated": 1, "protected": 1}  # fmt: skip
        assert compliance.patch_counts(catalogue, session) == {
            "fix-web": {"vulnerable": 1, "outdated": 1, "protected": 1}}  # fmt: skip
        ids = dict(session.query(m.Host.name, m.Host.id).all())
        states = compliance.host_states(catalogue, session, ids.values())
    assert states[ids["web-new"]] == {"fix-web": "protected"}
    assert states[ids["web-old"]] == {"fix-web": "outdated"}
    assert states[ids["db-bare"]] == {"fix-web": "vulnerable"}
    assert ids["mail"] not in states and ids["lab-1"] not in states  # no module; disabled
    client = login(console, "auditor")
    page = client.get("/console/").text
    for state in ("vulnerable", "outdated", "protected"):
        assert re.search(rf'id="hosts-{state}"[^>]*><span class="n">1<', page), state
    host = client.get(f"/console/hosts/{ids['web-old']}").text
    assert re.search(r'id="compliance"><span class="tag outdated">', host)
    patches = client.get("/console/patches").text
    assert "1 vulnerable" in patches and "1 outdated" in patches and "1 protected" in patches
    assert "/console/hosts?patch=fix-web&amp;state=vulnerable" in patches
    # Revoking v2 makes v1 the newest: web-old is protected, web-new carries more than needed.
    r = console.client.post("/api/v1/patches/fix-web/revoke", json={"version": 2},
                            headers=console.auth("operator"))  # fmt: skip
    assert r.status_code == 200, r.text
    with console.server.database.reading() as session:
        catalogue = console.server.catalogues.current(session)
        assert compliance.fleet_counts(catalogue, session) == {
            "vulnerable": 1, "outdated": 0, "protected": 2}  # fmt: skip


def test_hosts_search_filter_sort_and_state(console: Api, make_artifact: MakeArtifact) -> None:  # noqa: F811
    fleet(console, make_artifact)
    with console.server.database.session() as session:  # one host silent for 10 minutes
        session.query(m.Host).filter(m.Host.name == "mail").update({"last_seen": time.time() - 600})
        session.query(m.Host).filter(m.Host.name == "lab-1").update({"last_seen": None})
    client = login(console, "auditor")

    def names(**params: str) -> list[str]:
        page = client.get("/console/hosts", params=params)
        assert page.status_code == 200
        return re.findall(r'<a href="/console/hosts/\d+">([^<]+)</a>', page.text)

    assert names() == ["db-bare", "lab-1", "mail", "web-new", "web-old"]  # by name
    assert names(order="desc") == ["web-old", "web-new", "mail", "lab-1", "db-bare"]
    assert names(q="WEB") == ["web-new", "web-old"]  # part of the name, any case
    assert names(q="%") == [] and names(q="_") == []  # LIKE's wildcards taken literally
    assert names(group="/prod") == ["db-bare", "mail", "web-new", "web-old"]  # and below
    assert names(group="/prod/web") == ["web-new", "web-old"]
    assert names(state="vulnerable") == ["db-bare"]
    assert names(state="outdated", group="/prod") == ["web-old"]
    assert names(patch="fix-web", state="outdated") == ["web-old"]  # the patches page's links
    assert names(patch="fix-web") == ["db-bare", "web-new", "web-old"]  # enabled and relevant
    assert names(patch="no-such-patch") == []
    assert names(state="online") == ["db-bare", "web-new", "web-old"]
    assert names(state="stale") == ["mail"] and names(state="offline") == ["lab-1"]
    assert names(sort="last_seen")[0] == "lab-1"  # never checked in: first
    assert names(sort="nonsense", state="bogus") == names()  # unknown values ignored
    assert "5 hosts" in client.get("/console/hosts", params={"page": 9}).text  # past the end
    page = client.get("/console/hosts", params={"q": "web", "sort": "group"}).text
    assert "q=web" in page and "aria-sort" in page


def test_liveness_thresholds() -> None:
    now = 10_000.0
    assert liveness(now - 179, 60, now) == "online" and liveness(now - 181, 60, now) == "stale"
    assert liveness(now - 3599, 60, now) == "stale" and liveness(now - 3601, 60, now) == "offline"
    assert liveness(None, 60, now) == "offline" and liveness(now - 20, 5, now) == "stale"


def test_dashboard_blocked_card_quiet_at_zero(console: Api) -> None:  # noqa: F811
    client = login(console, "auditor")
    page = client.get("/console/").text
    assert 'class="card quiet" id="blocked-card"' in page and "card alert" not in page


def test_root_404_and_docs(console: Api) -> None:  # noqa: F811
    client = login(console, "auditor")
    r = client.get("/")
    assert r.status_code == 307 and r.headers["location"] == "/console/"
    r = client.get("/console/no/such/page")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "There is no console page /console/no/such/page" in r.text
    assert "Log out" in r.text  # the logged-in menu
    r = client.get("/console/hosts/not-a-number")
    assert r.status_code == 404 and "There is no console page" in r.text
    anonymous = console.client.get("/console/nothing-here")
    assert anonymous.status_code == 404 and "<html" in anonymous.text
    assert "<script" not in anonymous.text.split("</head>")[1]
    api = console.client.get("/api/v1/no-such-route")
    assert api.status_code == 404 and api.json() == {"detail": "Not Found"}  # the API: JSON
    docs = console.client.get("/docs")
    assert docs.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert urls and all(not u.startswith(("http:", "https:", "//")) for u in urls), urls
    for url in urls:
        if url.startswith("/"):
            asset = console.client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert console.client.get("/redoc").status_code == 404

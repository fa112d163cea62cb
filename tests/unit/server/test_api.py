"""The API through FastAPI's test client: enrollment, check-in, publishing, revocation,
groups and policies, events, the audit log."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import unquote

from micropatch.trust.artifact import loads
from micropatch.trust.keys import generate_key

from .conftest import Api, MakeArtifact


def module_of(data: bytes) -> dict[str, Any]:
    module = loads(data).payload.module
    return {"name": module.name, "path": f"/usr/lib/{module.name}", "build_id": module.build_id,
            "sha256": module.sha256}  # fmt: skip


def test_enroll_is_one_time(api: Api) -> None:
    r = api.client.post("/api/v1/enrollment-tokens", json={}, headers=api.auth("admin"))
    token = r.json()["token"]
    first = api.client.post("/api/v1/enroll", json={"token": token, "hostname": "h1"})
    assert first.status_code == 201
    body = first.json()
    assert body["group"] == "/" and body["checkin_interval"] == 60
    assert body["repository"] == "http://repo.invalid/r"
    assert body["credential"].startswith("mph_")
    again = api.client.post("/api/v1/enroll", json={"token": token, "hostname": "h2"})
    assert again.status_code == 401 and "already used" in again.json()["detail"]
    bogus = api.client.post("/api/v1/enroll", json={"token": "mpe_nope", "hostname": "h3"})
    assert bogus.status_code == 401


def test_host_names_are_unique(api: Api) -> None:
    """A second host under a name taken is refused (409, its token kept for another
    try); a host renamed to a taken name keeps its own name and checks in."""
    first, _ = api.enroll("web")
    r = api.client.post("/api/v1/enrollment-tokens", json={}, headers=api.auth("admin"))
    token = r.json()["token"]
    clash = api.client.post("/api/v1/enroll", json={"token": token, "hostname": "web"})
    assert clash.status_code == 409, clash.text
    assert f"host {first} is enrolled under the name 'web'" in clash.json()["detail"]
    assert f"DELETE /api/v1/hosts/{first}" in clash.json()["detail"]
    assert "Retire on its page in the console" in clash.json()["detail"]
    assert "(hostnamectl set-hostname NAME)" in clash.json()["detail"]
    ok = api.client.post("/api/v1/enroll", json={"token": token, "hostname": "db"})
    assert ok.status_code == 201, ok.text
    api.tokens["db"] = ok.json()["credential"]
    for name, expected in (("web", "db"), ("db2", "db2"), (None, "db2")):
        r = api.client.post("/api/v1/checkin", json={"hostname": name}, headers=api.auth("db"))
        assert r.status_code == 200, r.text
        host = api.client.get(f"/api/v1/hosts/{ok.json()['host_id']}", headers=api.auth("admin"))
        assert host.json()["name"] == expected
    assert (
        api.client.get(f"/api/v1/hosts/{first}", headers=api.auth("admin")).json()["name"] == "web"
    )


def test_a_batch_sent_again_is_stored_once(api: Api) -> None:
    """An agent that never saw the answer to a committed check-in sends the same events
    again: they are stored once (events_accepted counts the new ones)."""
    host_id, _ = api.enroll("web-1")
    batch = [{"kind": "blocked", "time": 5.25, "pid": 7, "patch_id": "p", "data": {"count": 1}},
             {"kind": "agent", "time": 5.5, "message": "stopping"}]  # fmt: skip
    first = api.client.post("/api/v1/checkin", json={"events": batch}, headers=api.auth("web-1"))
    assert first.json()["events_accepted"] == 2
    later = {"kind": "blocked", "time": 6.0, "pid": 7, "patch_id": "p", "data": {"count": 1}}
    again = api.client.post("/api/v1/checkin", json={"events": [*batch, later]},
                            headers=api.auth("web-1"))  # fmt: skip
    assert again.json()["events_accepted"] == 1
    events = api.client.get(f"/api/v1/events?host_id={host_id}", headers=api.auth("auditor"))
    assert sorted(e["time"] for e in events.json()) == [5.25, 5.5, 6.0]


def test_expired_enrollment_token(api: Api) -> None:
    import time

    r = api.client.post(
        "/api/v1/enrollment-tokens", json={"expires_in": 0.01}, headers=api.auth("admin")
    )
    time.sleep(0.05)
    late = api.client.post("/api/v1/enroll", json={"token": r.json()["token"], "hostname": "h"})
    assert late.status_code == 401 and "expired" in late.json()["detail"]


def test_publish_checkin_policy_revoke(api: Api, make_artifact: MakeArtifact) -> None:
    data = make_artifact("fix-a", 1)
    r = api.client.post("/api/v1/patches", content=data, headers=api.auth("operator"))
    assert r.status_code == 201, r.text
    published = r.json()
    assert (published["patch_id"], published["version"]) == ("fix-a", 1)
    assert published["target"] in api.server.repository.target_files()
    again = api.client.post("/api/v1/patches", content=data, headers=api.auth("operator"))
    assert again.status_code == 200  # idempotent

    host_id, _ = api.enroll("web-1")
    other_id, _ = api.enroll("db-1")
    checkin = {
        "kernel": "6.18.0",
        "agent_version": "0.1.0",
        "modules": [module_of(data), {"name": "libc.so.6", "build_id": "ab" * 20}],
        "processes": [{"pid": 42, "exe": "/usr/bin/web", "unit": "web.service", "user": "www",
                       "patches": [{"patch_id": "fix-a", "version": 1, "state": "applied"}]}],
        "events": [{"kind": "applied", "time": 1.0, "pid": 42, "patch_id": "fix-a",
                    "version": 1, "message": "applied"},
                   {"kind": "blocked", "time": 2.0, "pid": 42, "patch_id": "fix-a",
                    "data": {"count": 3}}],
    }  # fmt: skip
    r = api.client.post("/api/v1/checkin", json=checkin, headers=api.auth("web-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["host_id"] == host_id and body["events_accepted"] == 2
    [patch] = body["patches"]
    assert patch["patch_id"] == "fix-a" and patch["target"] == published["target"]
    assert (patch["state"], patch["decided_by"]) == ("enabled", "/")
    assert body["revoked"] == []
    # The other host runs no such module: nothing relevant.
    r = api.client.post("/api/v1/checkin", json={"modules": []}, headers=api.auth("db-1"))
    assert r.json()["patches"] == [] and r.json()["host_id"] == other_id

    # Counts on the patch list; the host's details.
    [listed] = api.client.get("/api/v1/patches", headers=api.auth("auditor")).json()
    assert (listed["hosts_relevant"], listed["processes_applied"]) == (1, 1)
    host = api.client.get(f"/api/v1/hosts/{host_id}", headers=api.auth("auditor")).json()
    assert host["modules"] == 2 and host["processes"][0]["pid"] == 42
    events = api.client.get("/api/v1/events?kind=blocked", headers=api.auth("auditor")).json()
    assert [(e["host_id"], e["data"]) for e in events] == [(host_id, {"count": 3})]

    # Disable it for the root group: the next check-in says so, and who decided.
    r = api.client.put(
        "/api/v1/policies/", json={"default_state": "enabled", "patches": {"fix-a": "disabled"}},
        headers=api.auth("operator"),
    )  # fmt: skip
    assert r.status_code == 200, r.text
    r = api.client.post("/api/v1/checkin", json=checkin | {"events": []},
                        headers=api.auth("web-1"))  # fmt: skip
    [patch] = r.json()["patches"]
    assert (patch["state"], patch["decided_by"]) == ("disabled", "/")

    # Revoke: gone from the repository and listed as revoked for the host.
    r = api.client.post("/api/v1/patches/fix-a/revoke", json={}, headers=api.auth("operator"))
    assert r.status_code == 200 and r.json()[0]["revoked"]
    assert published["target"] not in api.server.repository.target_files()
    r = api.client.post("/api/v1/checkin", json=checkin | {"events": []},
                        headers=api.auth("web-1"))  # fmt: skip
    assert r.json()["patches"] == []
    assert [x["patch_id"] for x in r.json()["revoked"]] == ["fix-a"]
    revoked_again = api.client.post("/api/v1/patches", content=data, headers=api.auth("operator"))
    assert revoked_again.status_code == 409 and "revoked" in revoked_again.json()["detail"]

    actions = [
        a["action"] for a in api.client.get("/api/v1/audit", headers=api.auth("auditor")).json()
    ]
    for action in ("patch.publish", "host.enroll", "policy.set", "patch.revoke"):
        assert action in actions


def test_inventory_is_kept_until_the_agent_sends_another(
    api: Api, make_artifact: MakeArtifact
) -> None:
    """An agent whose inventory is unchanged sends only its digest: the stored modules
    and processes stay, relevant patches are still computed from them, and the answer
    carries the digest the server holds."""
    data = make_artifact("fix-a", 1)
    assert api.client.post("/api/v1/patches", content=data, headers=api.auth("operator")).is_success
    host_id, _ = api.enroll("web-1")
    checkin = api.client.post
    full = {
        "inventory_digest": "d1",
        "modules": [module_of(data)],
        "processes": [{"pid": 42, "patches": [{"patch_id": "fix-a", "version": 1}]}],
    }
    r = checkin("/api/v1/checkin", json=full, headers=api.auth("web-1"))
    assert r.status_code == 200 and r.json()["inventory_digest"] == "d1"
    r = checkin("/api/v1/checkin", json={"inventory_digest": "d1"}, headers=api.auth("web-1"))
    assert r.json()["inventory_digest"] == "d1"
    assert [p["patch_id"] for p in r.json()["patches"]] == ["fix-a"]
    host = api.client.get(f"/api/v1/hosts/{host_id}", headers=api.auth("auditor")).json()
    assert host["modules"] == 1 and [p["pid"] for p in host["processes"]] == [42]
    # A digest the server does not hold: answered with the stored one (the agent then
    # sends its inventory), and the stored inventory is kept meanwhile.
    r = checkin("/api/v1/checkin", json={"inventory_digest": "d2"}, headers=api.auth("web-1"))
    assert r.json()["inventory_digest"] == "d1" and len(r.json()["patches"]) == 1
    # Processes alone are a whole inventory without modules.
    r = checkin(
        "/api/v1/checkin", json={"inventory_digest": "d3", "processes": []},
        headers=api.auth("web-1"),
    )  # fmt: skip
    assert r.json()["inventory_digest"] == "d3" and r.json()["patches"] == []
    host = api.client.get(f"/api/v1/hosts/{host_id}", headers=api.auth("auditor")).json()
    assert host["modules"] == 0 and host["processes"] == []
    # Without a digest (a client that does not keep one) it is stored, and none is held.
    r = checkin("/api/v1/checkin", json={"modules": full["modules"]}, headers=api.auth("web-1"))
    assert r.json()["inventory_digest"] is None and len(r.json()["patches"]) == 1
    bad = checkin("/api/v1/checkin", json={"inventory_digest": "a b"}, headers=api.auth("web-1"))
    assert bad.status_code == 422


def test_every_change_is_seen_by_the_next_check_in(api: Api, make_artifact: MakeArtifact) -> None:
    """The policy and the patches are cached per policy revision: a publish, a policy
    change, a new group, a host moved and a revocation each show at the next check-in."""
    first = make_artifact("fix-a", 1)
    host_id, _ = api.enroll("web-1")
    body = {"inventory_digest": "d", "modules": [module_of(first)]}

    def patches() -> list[tuple[str, int, str, str | None]]:
        r = api.client.post("/api/v1/checkin", json=body, headers=api.auth("web-1"))
        assert r.status_code == 200, r.text
        body.pop("modules", None)  # later check-ins: unchanged inventory
        return [(p["patch_id"], p["version"], p["state"], p["decided_by"])
                for p in r.json()["patches"]]  # fmt: skip

    assert patches() == []
    ops = api.auth("operator")
    assert api.client.post("/api/v1/patches", content=first, headers=ops).is_success
    assert patches() == [("fix-a", 1, "enabled", "/")]
    assert api.client.post(
        "/api/v1/patches", content=make_artifact("fix-a", 2), headers=ops
    ).is_success
    assert patches() == [("fix-a", 2, "enabled", "/")]
    r = api.client.post("/api/v1/groups", json={"path": "/web", "default_state": "disabled"},
                        headers=api.auth("admin"))  # fmt: skip
    assert r.status_code == 201
    assert patches() == [("fix-a", 2, "enabled", "/")]  # not in /web yet
    r = api.client.put(f"/api/v1/hosts/{host_id}/group", json={"group": "/web"},
                       headers=api.auth("admin"))  # fmt: skip
    assert r.status_code == 200
    assert patches() == [("fix-a", 2, "disabled", "/web")]
    r = api.client.put("/api/v1/policies/web", json={"patches": {"fix-a": "enabled"}}, headers=ops)
    assert r.status_code == 200
    assert patches() == [("fix-a", 2, "enabled", "/web")]
    r = api.client.post("/api/v1/patches/fix-a/revoke", json={"version": 2}, headers=ops)
    assert r.status_code == 200
    assert patches() == [("fix-a", 1, "enabled", "/web")]


def test_publish_refuses_bad_artifacts(api: Api, make_artifact: MakeArtifact) -> None:
    stranger = make_artifact("fix-x", 1, key=generate_key("stranger"))
    r = api.client.post("/api/v1/patches", content=stranger, headers=api.auth("operator"))
    assert r.status_code == 422 and "not trusted" in r.json()["detail"]
    r = api.client.post("/api/v1/patches", content=b"{not json", headers=api.auth("operator"))
    assert r.status_code == 422 and "invalid JSON" in r.json()["detail"]
    data = bytearray(make_artifact("fix-a", 1))
    data[data.index(b'"title"') + 10] ^= 1  # one byte of the payload changed
    r = api.client.post("/api/v1/patches", content=bytes(data), headers=api.auth("operator"))
    assert r.status_code == 422, r.text
    # Another artifact under a published id and version.
    first = make_artifact("fix-v", 1)
    assert (
        api.client.post("/api/v1/patches", content=first, headers=api.auth("admin")).status_code
        == 201
    )
    other = make_artifact("fix-v", 1, code="nop\\nnop")  # same id and version, other code
    r = api.client.post("/api/v1/patches", content=other, headers=api.auth("admin"))
    assert r.status_code == 409 and "bump the version" in r.json()["detail"]


def test_groups_and_inherited_policy(api: Api, make_artifact: MakeArtifact) -> None:
    admin, operator = api.auth("admin"), api.auth("operator")
    for path in ("/prod", "/prod/web"):
        assert (
            api.client.post("/api/v1/groups", json={"path": path}, headers=admin).status_code == 201
        )
    assert (
        api.client.post("/api/v1/groups", json={"path": "/nope/x"}, headers=admin).status_code
        == 404
    )
    assert (
        api.client.post("/api/v1/groups", json={"path": "/prod"}, headers=admin).status_code == 409
    )
    api.client.put("/api/v1/policies/prod", headers=operator, json={
        "patches": {"fix-a": "disabled"},
        "exclusions": [{"kind": "exe", "value": "/usr/bin/java*"}],
    })  # fmt: skip
    api.client.put("/api/v1/policies/prod/web", headers=operator,
                   json={"default_state": "disabled"})  # fmt: skip
    data = make_artifact("fix-a", 1)
    api.client.post("/api/v1/patches", content=data, headers=operator)
    api.client.post("/api/v1/patches", content=make_artifact("fix-b", 1), headers=operator)
    host_id, _ = api.enroll("web-1", group="/prod/web")
    api.client.post("/api/v1/checkin", json={"modules": [module_of(data)]},
                    headers=api.auth("web-1"))  # fmt: skip
    r = api.client.get(f"/api/v1/hosts/{host_id}/policy", headers=api.auth("web-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    states = {p["patch_id"]: (p["state"], p["decided_by"]) for p in body["patches"]}
    assert states == {"fix-a": ("disabled", "/prod"), "fix-b": ("disabled", "/prod/web")}
    assert body["effective"]["exclusions"] == [
        {"kind": "exe", "value": "/usr/bin/java*", "patch_id": None, "decided_by": "/prod"}
    ]
    # Move the host to /prod: fix-b now follows the root's default.
    r = api.client.put(f"/api/v1/hosts/{host_id}/group", json={"group": "/prod"}, headers=admin)
    assert r.status_code == 200 and r.json()["group"] == "/prod"
    body = api.client.get(f"/api/v1/hosts/{host_id}/policy", headers=admin).json()
    states = {p["patch_id"]: (p["state"], p["decided_by"]) for p in body["patches"]}
    assert states["fix-b"] == ("enabled", "/")
    # A group with hosts or subgroups stays.
    assert api.client.delete("/api/v1/groups/prod", headers=admin).status_code == 409
    assert api.client.delete("/api/v1/groups/prod/web", headers=admin).status_code == 204
    assert api.client.delete("/api/v1/groups/", headers=admin).status_code == 409
    groups = [g["path"] for g in api.client.get("/api/v1/groups", headers=admin).json()]
    assert groups == ["/", "/prod"]
    bad = api.client.put("/api/v1/policies/prod", headers=operator,
                         json={"patches": {"fix-a": "maybe"}})  # fmt: skip
    assert bad.status_code == 422


def raw_get(app: Any, raw_path: bytes) -> tuple[int, bytes]:
    """GET exactly `raw_path`, as uvicorn hands a request line to the application (the
    path percent-decoded, dot segments kept). httpx, and so the TestClient, removes
    `../` before sending, even from an httpx.URL(raw_path=...)."""
    path, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": unquote(path.decode("ascii")), "raw_path": path,
        "query_string": query, "root_path": "", "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000), "server": ("testserver", 80),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        requested = False
        done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # the client hangs up once the answer is complete
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        await asyncio.wait_for(app(scope, receive, send), 30)

    asyncio.run(run())
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    return start["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_repository_is_served(api: Api) -> None:
    r = api.client.get("/repository/metadata/timestamp.json")
    assert r.status_code == 200 and r.json()["signed"]["_type"] == "timestamp"
    status, body = raw_get(api.app, b"/repository/metadata/timestamp.json")  # the helper works
    assert status == 200 and json.loads(body)["signed"]["_type"] == "timestamp"
    key = (api.server.repository.online_dir / "timestamp.key").read_bytes()
    for outside in (b"/repository/../online/timestamp.key",
                    b"/repository/%2e%2e/online/timestamp.key",
                    b"/repository/metadata/../../online/timestamp.key",
                    b"/repository/..%2fonline/timestamp.key",
                    b"/repository/%2e%2e%2frepository.json"):  # fmt: skip
        status, body = raw_get(api.app, outside)
        assert status == 404 and key not in body, outside


def test_values_no_database_can_hold(api: Api) -> None:
    # Found by schemathesis: huge integers (SQLite) and NUL characters (PostgreSQL)
    # are the client's mistake, answered with a 4xx, never a server error.
    # An item a check-in cannot hold is left out, alone (issue 15.7), and said.
    host_id, _ = api.enroll("h")
    r = api.client.post("/api/v1/checkin", headers=api.auth("h"), json={
        "processes": [{"pid": 1, "patches": [{"patch_id": "x", "version": 2**63}]},
                      {"pid": 2, "patches": [{"patch_id": "y", "version": 2**63 - 1}]}],
    })  # fmt: skip
    assert r.status_code == 200, r.text
    [ignored] = r.json()["ignored"]
    assert ignored.startswith("processes[0]: patches.0.version: Input should be less than")
    held = api.client.get(f"/api/v1/hosts/{host_id}", headers=api.auth("admin")).json()
    assert [(p["pid"], p["version"]) for p in held["processes"]] == [(2, 2**63 - 1)]
    r = api.client.post(
        "/api/v1/checkin",
        headers=api.auth("h") | {"Content-Type": "application/json"},
        content=b'{"events": [{"kind": "agent", "time": NaN}]}',
    )
    assert r.status_code == 200 and r.json()["events_accepted"] == 0
    assert r.json()["ignored"][0].startswith("events[0]: time:")
    r = api.client.post("/api/v1/checkin", json={"hostname": "a\x00b"}, headers=api.auth("h"))
    assert r.status_code == 422 and "NUL" in r.text
    assert api.client.get(f"/api/v1/hosts/{2**63}", headers=api.auth("admin")).status_code == 422
    for url in ("/api/v1/patches/a%00b", "/api/v1/events?kind=a%00b"):
        assert api.client.get(url, headers=api.auth("admin")).status_code in (404, 422, 200)


def test_publish_without_an_online_targets_key(api: Api, make_artifact: MakeArtifact) -> None:
    for key in api.server.repository.online_dir.glob("targets-*"):
        key.unlink()
    r = api.client.post("/api/v1/patches", content=make_artifact("fix-a", 1),
                        headers=api.auth("operator"))  # fmt: skip
    assert r.status_code == 409 and "targets role needs 1 signature" in r.json()["detail"]
    assert api.client.get("/api/v1/patches", headers=api.auth("operator")).json() == []


def test_hosts_and_events_by_page(api: Api) -> None:
    for i in range(5):
        api.enroll(f"h{i}")
    events = [{"kind": "agent", "time": 50.0 + n // 2, "message": f"e{n}"} for n in range(5)]
    api.client.post("/api/v1/checkin", json={"events": events}, headers=api.auth("h0"))
    r = api.client.get("/api/v1/hosts", params={"offset": 1, "limit": 2},
                       headers=api.auth("auditor"))  # fmt: skip
    assert [h["name"] for h in r.json()] == ["h1", "h2"] and r.headers["X-Total-Count"] == "5"
    assert all(h["modules"] == 0 and h["group"] == "/" for h in r.json())
    seen: list[str] = []
    before: dict[str, int] = {}
    while True:
        page = api.client.get("/api/v1/events", params={"limit": 2, **before},
                              headers=api.auth("auditor")).json()  # fmt: skip
        if not page:
            break
        seen += [e["message"] for e in page]
        before = {"before": page[-1]["id"]}
    assert seen == ["e4", "e3", "e2", "e1", "e0"]

"""The authorisation matrix: every endpoint against every kind of caller, and one host's
credential against another host's data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Api, MakeArtifact

CALLERS = ("anonymous", "admin", "operator", "auditor", "host")
ALL_USERS = {"admin", "operator", "auditor"}
PUBLISHERS = {"admin", "operator"}
ADMIN = {"admin"}

# (method, path, body, who may). "{host}" is the calling host's own id (the host
# checks below cover another host's). Bodies are valid, so an allowed call never
# fails for its input. A body of bytes is an artifact, made by the test.
Endpoint = tuple[str, str, Any, set[str]]
ENDPOINTS: list[Endpoint] = [
    ("GET", "/api/v1/users", None, ADMIN),
    ("POST", "/api/v1/users", lambda n: {"name": f"u{n}", "role": "auditor"}, ADMIN),
    ("POST", "/api/v1/users/{victim}/disable", None, ADMIN),
    ("POST", "/api/v1/users/{victim}/enable", None, ADMIN),
    ("PUT", "/api/v1/users/{victim}/password", {"password": "a-new-password"}, ADMIN),
    ("DELETE", "/api/v1/users/{victim}/tokens", None, ADMIN),
    ("GET", "/api/v1/tokens", None, ADMIN),
    ("DELETE", "/api/v1/tokens/{token}", None, ADMIN),
    ("POST", "/api/v1/enrollment-tokens", {"group": "/"}, ADMIN),
    ("GET", "/api/v1/enrollment-tokens", None, ADMIN),
    ("DELETE", "/api/v1/enrollment-tokens/{enrollment}", None, ADMIN),
    ("POST", "/api/v1/checkin", {"modules": []}, {"host"}),
    ("GET", "/api/v1/patches", None, ALL_USERS),
    ("GET", "/api/v1/patches/fix-m", None, ALL_USERS),
    ("POST", "/api/v1/patches", b"artifact", PUBLISHERS),
    ("POST", "/api/v1/patches/{revocable}/revoke", {}, PUBLISHERS),
    ("GET", "/api/v1/groups", None, ALL_USERS),
    ("POST", "/api/v1/groups", lambda n: {"path": f"/g{n}"}, ADMIN),
    ("GET", "/api/v1/groups/", None, ALL_USERS),
    ("DELETE", "/api/v1/groups/{deletable}", None, ADMIN),
    ("GET", "/api/v1/policies/", None, ALL_USERS),
    ("PUT", "/api/v1/policies/", {"default_state": "enabled"}, PUBLISHERS),
    ("GET", "/api/v1/hosts", None, ALL_USERS),
    ("GET", "/api/v1/hosts/{host}", None, ALL_USERS | {"host"}),
    ("GET", "/api/v1/hosts/{host}/policy", None, ALL_USERS | {"host"}),
    ("PUT", "/api/v1/hosts/{host}/group", {"group": "/"}, ADMIN),
    ("DELETE", "/api/v1/hosts/{deletable-host}", None, ADMIN),
    ("GET", "/api/v1/events", None, ALL_USERS | {"host"}),
    ("GET", "/api/v1/audit", None, {"admin", "auditor"}),
]


@pytest.fixture
def world(api: Api, make_artifact: MakeArtifact) -> tuple[Api, int, Callable[..., bytes]]:
    r = api.client.post(
        "/api/v1/patches", content=make_artifact("fix-m", 1), headers=api.auth("admin")
    )
    assert r.status_code == 201, r.text
    host_id, _ = api.enroll("host")
    return api, host_id, make_artifact


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[f"{e[0]} {e[1]}" for e in ENDPOINTS])
def test_matrix(world: tuple[Api, int, Callable[..., bytes]], endpoint: Endpoint) -> None:
    api, host_id, make_artifact = world
    method, path, body, allowed = endpoint
    for n, caller in enumerate(CALLERS):
        url = path.replace("{host}", str(host_id))
        if "{revocable}" in url:  # a new patch each time, so an allowed revoke finds one
            patch = f"fix-r{n}"
            api.client.post("/api/v1/patches", content=make_artifact(patch, 1),
                            headers=api.auth("admin"))  # fmt: skip
            url = url.replace("{revocable}", patch)
        if "{deletable-host}" in url:
            deletable, _ = api.enroll(f"gone{n}")
            url = url.replace("{deletable-host}", str(deletable))
        if "{deletable}" in url:
            group = f"/d{n}"
            api.client.post("/api/v1/groups", json={"path": group}, headers=api.auth("admin"))
            url = url.replace("{deletable}", group.lstrip("/"))
        if "{victim}" in url or "{token}" in url:  # a user of its own each time
            made = api.client.post("/api/v1/users", json={"name": f"v{n}", "role": "auditor"},
                                   headers=api.auth("admin"))  # fmt: skip
            url = url.replace("{victim}", f"v{n}")
            tokens = api.client.get(f"/api/v1/tokens?user=v{n}", headers=api.auth("admin"))
            assert made.status_code == 201 and tokens.status_code == 200, tokens.text
            url = url.replace("{token}", str(tokens.json()[0]["id"]))
        if "{enrollment}" in url:
            made = api.client.post("/api/v1/enrollment-tokens", json={},
                                   headers=api.auth("admin"))  # fmt: skip
            url = url.replace("{enrollment}", str(made.json()["id"]))
        kw: dict[str, Any] = {"headers": api.auth(None if caller == "anonymous" else caller)}
        if caller == "host" and "{deletable-host}" in path:
            kw["headers"] = api.auth(f"gone{n}")  # even a host may not delete itself
        if isinstance(body, bytes):
            kw["content"] = make_artifact(f"fix-p{n}", 1)
        elif callable(body):
            kw["json"] = body(n)
        elif body is not None:
            kw["json"] = body
        r = api.client.request(method, url, **kw)
        if caller in allowed:
            assert r.status_code < 400, f"{caller} {method} {url}: {r.status_code} {r.text}"
        elif caller == "anonymous":
            assert r.status_code == 401, f"{caller} {method} {url}: {r.status_code}"
        else:
            assert r.status_code == 403, f"{caller} {method} {url}: {r.status_code} {r.text}"


def test_every_route_is_in_the_matrix(api: Api) -> None:
    from fastapi.routing import APIRoute

    covered = {(m, p.split("{")[0].rstrip("/")) for m, p, _, _ in ENDPOINTS}
    public = {("GET", "/api/v1/health"), ("POST", "/api/v1/enroll"), ("POST", "/api/v1/auth/token")}
    for route in api.app.routes:
        if not isinstance(route, APIRoute) or not route.path.startswith("/api/"):
            continue
        for method in route.methods:
            key = (method, route.path.split("{")[0].rstrip("/"))
            assert key in covered or key in public, f"{method} {route.path} is not in the matrix"


def test_a_host_sees_only_its_own_data(api: Api) -> None:
    mine, _ = api.enroll("mine")
    theirs, _ = api.enroll("theirs")
    api.client.post("/api/v1/checkin", headers=api.auth("theirs"), json={
        "events": [{"kind": "blocked", "time": 1.0, "message": "theirs"}],
    })  # fmt: skip
    api.client.post("/api/v1/checkin", headers=api.auth("mine"), json={
        "events": [{"kind": "blocked", "time": 2.0, "message": "mine"}],
    })  # fmt: skip
    me = api.auth("mine")
    assert api.client.get(f"/api/v1/hosts/{theirs}", headers=me).status_code == 403
    assert api.client.get(f"/api/v1/hosts/{theirs}/policy", headers=me).status_code == 403
    assert api.client.get(f"/api/v1/events?host_id={theirs}", headers=me).status_code == 403
    events = api.client.get("/api/v1/events", headers=me).json()
    assert [(e["host_id"], e["message"]) for e in events] == [(mine, "mine")]
    assert api.client.get(f"/api/v1/hosts/{mine}", headers=me).status_code == 200
    # A check-in with its credential always lands on its own host.
    assert api.client.post("/api/v1/checkin", json={}, headers=me).json()["host_id"] == mine


def test_a_deleted_host_is_locked_out(api: Api) -> None:
    host_id, _ = api.enroll("old")
    api.client.post("/api/v1/checkin", headers=api.auth("old"), json={
        "modules": [{"name": "a.so", "sha256": "0" * 64}],
        "events": [{"kind": "agent", "time": 1.0}],
    })  # fmt: skip
    r = api.client.delete(f"/api/v1/hosts/{host_id}", headers=api.auth("admin"))
    assert r.status_code == 204
    assert api.client.post("/api/v1/checkin", json={}, headers=api.auth("old")).status_code == 401
    assert api.client.get("/api/v1/events", headers=api.auth("admin")).json() == []
    audit = api.client.get("/api/v1/audit", headers=api.auth("admin")).json()
    assert audit[0]["action"] == "host.delete" and audit[0]["subject"] == f"host:{host_id}"


def test_bad_credentials(api: Api) -> None:
    for value in ("Bearer mpu_forged", "Bearer mph_forged", "Bearer mpe_x", "Basic abc"):
        r = api.client.get("/api/v1/patches", headers={"Authorization": value})
        assert r.status_code == 401, value

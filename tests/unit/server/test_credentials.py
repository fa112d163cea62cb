"""The credential lifecycle through the API: tokens revoked, users disabled and
enabled, passwords changed, tokens that expire (issue 17.5)."""

from __future__ import annotations

import pytest

from .conftest import Api


def test_credential_lifecycle(api: Api) -> None:
    """Through the API: a disabled user's token and console session are refused at
    once, and work again once it is enabled; a new password ends its sessions;
    tokens revoked one by one or all; an enrollment token listed and revoked."""
    admin = api.auth("admin")
    made = api.client.post("/api/v1/users", headers=admin, json={
        "name": "fred", "role": "operator", "password": "fred-password", "token_expires_in": 60,
    })  # fmt: skip
    assert made.status_code == 201 and made.json()["disabled"] is None
    token = {"Authorization": f"Bearer {made.json()['token']}"}
    console = api.client.post("/console/login", data={"name": "fred",
                              "password": "fred-password", "csrf": "c"},
                              cookies={"mp_login": "c"}, follow_redirects=False)  # fmt: skip
    assert console.status_code == 303, console.text
    page = {"cookies": {"mp_session": console.cookies["mp_session"]}}
    assert api.client.get("/api/v1/patches", headers=token).status_code == 200
    assert api.client.get("/console/hosts", **page).status_code == 200

    off = api.client.post("/api/v1/users/fred/disable", headers=admin)
    assert off.status_code == 200 and off.json()["disabled"] is not None
    refused = api.client.get("/api/v1/patches", headers=token)
    assert refused.status_code == 401 and "disabled" in refused.json()["detail"]
    assert api.client.get("/console/hosts", follow_redirects=False, **page).status_code in (
        303,
        401,
    )
    me = api.client.post("/api/v1/users/admin/disable", headers=admin)
    assert me.status_code == 422 and "cannot disable itself" in me.json()["detail"]
    assert api.client.post("/api/v1/users/fred/enable", headers=admin).status_code == 200
    assert api.client.get("/api/v1/patches", headers=token).status_code == 200

    r = api.client.put("/api/v1/users/fred/password", headers=admin,
                       json={"password": "another-password"})  # fmt: skip
    assert r.status_code == 200
    assert api.client.get("/console/hosts", follow_redirects=False, **page).status_code in (
        303,
        401,
    )  # its console session ended; its API token did not
    assert api.client.get("/api/v1/patches", headers=token).status_code == 200

    listed = api.client.get("/api/v1/tokens?user=fred", headers=admin).json()
    assert [t["label"] for t in listed] == ["created with the user"]
    assert listed[0]["expires"] - listed[0]["created"] == pytest.approx(60)
    assert api.client.delete(f"/api/v1/tokens/{listed[0]['id']}", headers=admin).status_code == 204
    assert api.client.get("/api/v1/patches", headers=token).status_code == 401
    assert api.client.delete(f"/api/v1/tokens/{listed[0]['id']}", headers=admin).status_code == 404
    gone = api.client.delete("/api/v1/users/auditor/tokens", headers=admin)
    assert gone.status_code == 200 and len(gone.json()) == 1
    assert api.client.get("/api/v1/patches", headers=api.auth("auditor")).status_code == 401

    # Deleted: its tokens refused at once, its name free again, itself never.
    fresh = api.client.post("/api/v1/auth/token", json={"name": "fred",
                            "password": "another-password"}).json()["token"]  # fmt: skip
    assert api.client.delete("/api/v1/users/fred", headers=admin).status_code == 204
    fred = {"Authorization": f"Bearer {fresh}"}
    assert api.client.get("/api/v1/patches", headers=fred).status_code == 401
    assert "fred" not in [u["name"] for u in api.client.get("/api/v1/users", headers=admin).json()]
    assert api.client.delete("/api/v1/users/fred", headers=admin).status_code == 404
    me = api.client.delete("/api/v1/users/admin", headers=admin)
    assert me.status_code == 422 and "cannot delete itself" in me.json()["detail"]

    made = api.client.post("/api/v1/enrollment-tokens", headers=admin, json={}).json()
    unused = api.client.get("/api/v1/enrollment-tokens?unused=true", headers=admin).json()
    assert [t["id"] for t in unused] == [made["id"]]
    assert api.client.delete(f"/api/v1/enrollment-tokens/{made['id']}",
                             headers=admin).status_code == 204  # fmt: skip
    late = api.client.post("/api/v1/enroll", json={"token": made["token"], "hostname": "h"})
    assert late.status_code == 401

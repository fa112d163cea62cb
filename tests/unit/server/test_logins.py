"""Logins through the API: passwords, the throttle per name and per address (shared
by every server process), and no telling names apart by time (issue 17.4)."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from micropatch.server.context import Server
from micropatch.server.errors import TooManyAttempts, Unauthorized
from micropatch.server.fleet import users
from micropatch.server.models import LoginFailure
from micropatch.server.throttle import LoginThrottle

from .conftest import Api


def test_login_with_password(api: Api) -> None:
    r = api.client.post(
        "/api/v1/users", json={"name": "carol", "role": "auditor", "password": "s3cret-pass"},
        headers=api.auth("admin"),
    )  # fmt: skip
    assert r.status_code == 201 and r.json()["token"].startswith("mpu_")
    bad = api.client.post("/api/v1/auth/token", json={"name": "carol", "password": "wrong"})
    assert bad.status_code == 401
    good = api.client.post("/api/v1/auth/token", json={"name": "carol", "password": "s3cret-pass"})
    assert good.status_code == 200 and good.json()["role"] == "auditor"
    token = good.json()["token"]
    r = api.client.get("/api/v1/patches", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    from micropatch.server.models import User

    with api.server.database.session() as session:
        from sqlalchemy import select

        stored = session.scalar(select(User).where(User.name == "carol"))
        assert stored is not None and stored.password_hash.startswith("$argon2id$")


def test_failed_logins_are_throttled_per_name(api: Api) -> None:
    """Past 5 failures in 15 minutes a name is refused unchecked (429, Retry-After),
    even with the right password; other names are not; the window slides."""
    r = api.client.post(
        "/api/v1/users", json={"name": "dave", "role": "auditor", "password": "right-one"},
        headers=api.auth("admin"),
    )  # fmt: skip
    assert r.status_code == 201
    login = {"name": "dave", "password": "right-one"}
    assert api.client.post("/api/v1/auth/token", json=login).status_code == 200
    for _ in range(5):
        bad = api.client.post("/api/v1/auth/token", json=login | {"password": "guess"})
        assert bad.status_code == 401
    refused = api.client.post("/api/v1/auth/token", json=login)
    assert refused.status_code == 429 and "too many failed logins" in refused.json()["detail"]
    assert 0 < int(refused.headers["Retry-After"]) <= 900
    nobody = {"name": "nobody", "password": "x"}
    assert api.client.post("/api/v1/auth/token", json=nobody).status_code == 401
    # Kept in the database: another server process (`--workers`) refuses dave too.
    other = Server(api.settings)
    with pytest.raises(TooManyAttempts):
        users.login(other.database, other.passwords, other.logins, "dave", "right-one", "10.0.0.9")
    other.database.dispose()
    # Audited without flooding: the first failure, and the one that reached the limit.
    entries = api.client.get("/api/v1/audit", headers=api.auth("admin")).json()
    failed = [e for e in entries if e["action"] == "user.login-failed"]
    assert [(e["subject"], e["details"]["failures"]) for e in failed] == [
        ("user:nobody", 1), ("user:dave", 5), ("user:dave", 1)
    ]  # fmt: skip
    assert failed[1]["details"]["throttled"] and failed[1]["details"]["address"] == "testclient"
    with api.server.database.session() as session:  # the window slides
        session.execute(update(LoginFailure).values(time=LoginFailure.time - 900))
    assert api.client.post("/api/v1/auth/token", json=login).status_code == 200  # aged out


def test_failed_logins_are_throttled_per_address(api: Api) -> None:
    """Past 20 failures from an address (under any names) that address is refused, even
    for a name without failures; another address is not."""
    for i in range(20):
        bad = {"name": f"guess-{i}", "password": "x"}
        assert api.client.post("/api/v1/auth/token", json=bad).status_code == 401
    refused = api.client.post("/api/v1/auth/token", json={"name": "admin", "password": "x"})
    assert refused.status_code == 429 and "from testclient" in refused.json()["detail"]
    with pytest.raises(Unauthorized):
        users.login(api.server.database, api.server.passwords, api.server.logins, "admin", "x",
              "10.0.0.9")  # fmt: skip


def test_an_unknown_name_takes_as_long_as_a_wrong_password(api: Api) -> None:
    """No telling names apart by time: an unknown name (and a user without a password)
    costs an argon2 verification too. Paired and interleaved, so that a loaded machine
    slows the three alike: each round logs in once with each name, in a rotating order,
    and the medians of the per-round ratios are within 40% of 1. The cost is measured
    in CPU time of this process (argon2's threads included): the work done, which is
    what the dummy verification must match; wall time on a shared machine measures
    the other processes too (this test failed once under load with wall time)."""
    import statistics
    import time

    api.client.post("/api/v1/users", json={"name": "erin", "role": "auditor",
                                           "password": "right-one"}, headers=api.auth("admin"))  # fmt: skip
    server = api.server
    throttle = LoginThrottle(name_limit=100, address_limit=100)
    names = ("erin", "nobody-at-all", "auditor")  # known, unknown, no password

    def cost(name: str, address: str) -> float:
        start = time.process_time()
        with pytest.raises(Unauthorized):
            users.login(server.database, server.passwords, throttle, name, "wrong", address)
        return time.process_time() - start

    ratios: dict[str, list[float]] = {"nobody-at-all": [], "auditor": []}
    for i in range(9):
        order = names[i % 3 :] + names[: i % 3]
        took = {name: cost(name, f"10.1.{i}.{n}") for n, name in enumerate(order)}
        for name in ratios:
            ratios[name].append(took[name] / took["erin"])
    unknown, no_password = (statistics.median(ratios[n]) for n in ratios)
    assert 0.6 < unknown < 1 / 0.6, ratios
    assert 0.6 < no_password < 1 / 0.6, ratios

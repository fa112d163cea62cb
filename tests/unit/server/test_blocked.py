"""Blocked counts bounded per check-in and per second since the previous one (17.7)."""

from __future__ import annotations

from micropatch.server import blocked

from .conftest import Api


def blocked_event(time: float, count: object) -> dict[str, object]:
    return {"kind": "blocked", "time": time, "pid": 7, "patch_id": "p", "data": {"count": count}}


def test_a_million_blocked_attempts_are_not_believed(api: Api) -> None:
    api.enroll("noisy")
    first = [blocked_event(1.0, 1_000_000), blocked_event(2.0, 5)]
    r = api.client.post("/api/v1/checkin", json={"events": first}, headers=api.auth("noisy"))
    assert r.status_code == 200 and r.json()["events_accepted"] == 2
    # At once again: about BURST more allowed, not another FIRST seconds' worth.
    again = [blocked_event(3.0, 50_000)]
    r = api.client.post("/api/v1/checkin", json={"events": again}, headers=api.auth("noisy"))
    assert r.status_code == 200
    stored = api.client.get("/api/v1/events?kind=blocked", headers=api.auth("auditor")).json()
    data = {e["time"]: e["data"] for e in stored}
    allowed = int(blocked.RATE * blocked.FIRST) + blocked.BURST
    assert data[1.0]["count"] == allowed and data[1.0]["reported"] == 1_000_000
    assert (
        "over" in data[1.0]["dropped"] and "a second since the previous one" in data[1.0]["dropped"]
    )
    assert data[2.0]["count"] == 0 and data[2.0]["reported"] == 5  # nothing left for it
    assert blocked.BURST <= data[3.0]["count"] < blocked.BURST + 1000  # < 1 s elapsed
    assert data[3.0]["reported"] == 50_000


def test_counts_within_the_allowance_are_kept_as_sent(api: Api) -> None:
    api.enroll("quiet")
    events = [blocked_event(1.0, 3), blocked_event(2.0, "many"), blocked_event(3.0, 2)]
    r = api.client.post("/api/v1/checkin", json={"events": events}, headers=api.auth("quiet"))
    assert r.status_code == 200
    stored = api.client.get("/api/v1/events?kind=blocked", headers=api.auth("auditor")).json()
    assert sorted((e["time"], e["data"]) for e in stored) == [
        (1.0, {"count": 3}), (2.0, {"count": "many"}), (3.0, {"count": 2})
    ]  # fmt: skip


def test_the_allowance_grows_with_time_up_to_a_bound() -> None:
    assert blocked.allowance(0.0) == blocked.BURST
    assert blocked.allowance(None) == blocked.allowance(blocked.FIRST)
    assert blocked.allowance(10.0) == int(10 * blocked.RATE) + blocked.BURST
    assert blocked.allowance(10**9) == blocked.PER_CHECKIN
    assert blocked.allowance(-5.0) == blocked.BURST  # a clock that went back

"""Held check-ins (server/push.py): answered when the host's answer changes — a publish,
a policy change, a revocation — and only then; the requests at work bounded apart from
them (server/capacity.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from micropatch.server.capacity import Capacity
from micropatch.server.catalogue import Catalogue
from micropatch.server.errors import Busy
from micropatch.server.push import POLL, WAKE_RATE, Push

from .conftest import Api, MakeArtifact
from .test_api import module_of

WOKEN_WITHIN = 5.0  # seconds: the bound (POLL is 0.5 s)


class Held:
    """A check-in with `wait` sent from a thread of its own: its answer and how long it took."""

    def __init__(self, client: TestClient, token: str, body: dict[str, Any]) -> None:
        self.answer: dict[str, Any] = {}
        self.status = 0
        self.seconds = 0.0
        self.headers: Any = {}

        def send() -> None:
            started = time.monotonic()
            try:
                r = client.post("/api/v1/checkin", json=body,
                                headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                self.seconds = time.monotonic() - started
                self.status, self.headers = r.status_code, r.headers
                self.answer = r.json() if r.headers.get("content-type", "").startswith(
                    "application/json"
                ) else {"text": r.text}  # fmt: skip
            except Exception as e:  # said by the test that waits on it, not lost in a thread
                self.answer = {"exception": repr(e)}

        self.thread = threading.Thread(target=send)
        self.thread.start()

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the held check-in was never answered"
        assert self.status == 200, self.answer
        return self.answer


def wait_held(api: Api, n: int) -> None:
    """Until the server holds n check-ins (a bounded poll: the request is in flight)."""
    deadline = time.monotonic() + 30
    while api.server.push.held != n:
        assert time.monotonic() < deadline, f"{api.server.push.held} held, not {n}"
        time.sleep(0.01)


@pytest.fixture
def live(api: Api) -> Iterator[TestClient]:
    """The API with its lifespan running (the revision follower)."""
    with TestClient(api.app) as client:
        yield client


def test_publish_policy_and_revoke_wake_a_held_check_in(
    api: Api, live: TestClient, make_artifact: MakeArtifact
) -> None:
    data = make_artifact("fix-push", 1)
    api.enroll("web-1")
    first = live.post("/api/v1/checkin", json={"modules": [module_of(data)]},
                      headers=api.auth("web-1")).json()  # fmt: skip
    assert first["hold"] == 60 and first["patches"] == []
    ops = api.auth("operator")

    def held_through(change: Any, digest: str) -> dict[str, Any]:
        held = Held(live, api.tokens["web-1"], {"wait": 60, "policy_digest": digest})
        wait_held(api, 1)
        changed = time.monotonic()
        change()
        answer = held.result()
        took = time.monotonic() - changed
        assert took < WOKEN_WITHIN, f"answered {took:.1f} s after the change"
        assert answer["policy_digest"] != digest
        assert 0 <= answer["after"] <= 1 / WAKE_RATE  # one held: its return not spread
        return answer

    answer = held_through(
        lambda: live.post("/api/v1/patches", content=data, headers=ops), first["policy_digest"]
    )
    assert [(p["patch_id"], p["state"]) for p in answer["patches"]] == [("fix-push", "enabled")]
    answer = held_through(
        lambda: live.put("/api/v1/policies/", json={"patches": {"fix-push": "disabled"}},
                         headers=ops),
        answer["policy_digest"],
    )  # fmt: skip
    assert [(p["patch_id"], p["state"]) for p in answer["patches"]] == [("fix-push", "disabled")]
    answer = held_through(
        lambda: live.post("/api/v1/patches/fix-push/revoke", json={}, headers=ops),
        answer["policy_digest"],
    )
    assert answer["patches"] == [] and [r["patch_id"] for r in answer["revoked"]] == ["fix-push"]
    assert api.server.push.held == 0


def test_a_change_for_other_hosts_does_not_wake_it(
    api: Api, live: TestClient, make_artifact: MakeArtifact
) -> None:
    """A patch for a module the host does not map: the hold runs to its end (`wait`,
    spread by up to 10% less), and the answer is the one the agent has."""
    api.enroll("db-1")
    first = live.post("/api/v1/checkin", json={"modules": []}, headers=api.auth("db-1")).json()
    held = Held(live, api.tokens["db-1"], {"wait": 3, "policy_digest": first["policy_digest"]})
    wait_held(api, 1)
    live.post("/api/v1/patches", content=make_artifact("fix-other", 1),
              headers=api.auth("operator"))  # fmt: skip
    answer = held.result()
    assert answer["policy_digest"] == first["policy_digest"] and answer["patches"] == []
    assert 3 * 0.9 - POLL <= held.seconds < 3 + 5, held.seconds


def test_an_agent_without_the_answer_gets_it_at_once(api: Api, live: TestClient) -> None:
    """A digest that is not the answer's (a new agent, a lost answer): no hold."""
    api.enroll("web-2")
    started = time.monotonic()
    r = live.post("/api/v1/checkin", json={"wait": 60, "policy_digest": "stale"},
                  headers=api.auth("web-2"))  # fmt: skip
    assert r.status_code == 200 and time.monotonic() - started < 5
    assert r.json()["policy_digest"] not in ("", "stale")


def test_a_full_server_holds_nothing_and_says_so(api: Api, live: TestClient) -> None:
    """At capacity it offers no hold (hold 0: check in every interval) and answers a
    check-in sent with `wait` at once."""
    api.enroll("web-3")
    api.server.push.capacity = 0
    first = live.post("/api/v1/checkin", json={}, headers=api.auth("web-3")).json()
    assert first["hold"] == 0
    started = time.monotonic()
    r = live.post("/api/v1/checkin", json={"wait": 60, "policy_digest": first["policy_digest"]},
                  headers=api.auth("web-3"))  # fmt: skip
    assert r.status_code == 200 and time.monotonic() - started < 5


def test_held_check_ins_are_not_requests_at_work() -> None:
    """Past its requests at work, a 503 at once with Retry-After; a held
    check-in does not count."""
    push = Push(capacity=10)
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    capacity = Capacity(app, push=push, requests=1)

    async def call() -> tuple[int, dict[bytes, bytes]]:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        await capacity({"type": "http", "path": "/"}, _no_body, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    async def scenario() -> None:
        first = asyncio.ensure_future(call())
        await asyncio.sleep(0)
        status, headers = await call()  # the one at work is still there
        assert status == 503 and headers[b"retry-after"] == b"2"
        push.held = 1  # it is held, now: not at work
        second = asyncio.ensure_future(call())
        await asyncio.sleep(0)
        release.set()
        assert (await first)[0] == 200 and (await second)[0] == 200

    asyncio.run(scenario())


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def test_a_change_that_answers_many_spreads_their_return() -> None:
    """The check-ins a change answered are told to come back over held / WAKE_RATE s."""
    push = Push(capacity=20_000)
    push.held = 10_000
    push.publish(Catalogue(7, {}, {}, {}))
    assert push.spread == 10_000 / WAKE_RATE
    push.publish(Catalogue(6, {}, {}, {}))  # an older one changes nothing
    assert push.spread == 10_000 / WAKE_RATE


def test_check_ins_that_wait_queue_for_their_turn_not_at_work() -> None:
    """A check-in with `wait` past the STORING being stored waits for its turn, not
    at work (no 503 while other requests are at work); Busy once it waited its
    time; no turn is lost."""
    push = Push(capacity=10, storing=1)

    async def scenario() -> None:
        push.start()
        release = asyncio.Event()

        async def store(seconds: float = 5.0) -> str:
            async with push.turn(seconds):
                await release.wait()
                return "stored"

        first = asyncio.ensure_future(store())
        second = asyncio.ensure_future(store())
        await asyncio.sleep(0.01)
        assert push.queued == 1  # the second waits for its turn
        capacity = Capacity(_ok, push=push, requests=2)
        sent: list[Any] = []
        capacity.in_flight = 2  # both are in flight: one at work, one queued

        async def send(message: Any) -> None:
            sent.append(message)

        await capacity({"type": "http", "path": "/"}, _no_body, send)
        assert sent[0]["status"] == 200  # one at work of two: the queued one is not
        with pytest.raises(Busy, match=r"busy with other check-ins for 0\.05 s"):
            await store(0.05)
        assert push.queued == 1
        release.set()
        assert await first == "stored" and await second == "stored"
        assert push.queued == 0
        assert await asyncio.wait_for(store(), 1) == "stored"  # the turn came back

    asyncio.run(scenario())


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_a_check_in_that_waits_too_long_for_its_turn_is_busy(api: Api) -> None:
    """The database busy with a long write, the one turn taken by a check-in waiting
    for it: the next one queues, and gets no turn within half its wait: 503 with
    Retry-After, nothing stored (its inventory is not the server's). The first is
    stored and answered once the database is free."""
    api.enroll("web-4")
    api.enroll("web-5")
    api.server.push.storing = 1
    inventory = {"inventory_digest": "ab" * 32, "modules": [], "processes": []}
    with TestClient(api.app) as client:
        with api.server.database.session() as session:  # the long write
            if session.bind is not None and session.bind.dialect.name == "postgresql":
                # PostgreSQL lets writers run side by side: make this one stand in their way.
                session.execute(text("LOCK TABLE hosts IN ACCESS EXCLUSIVE MODE"))
            # Both have something to store (an inventory): a quiet one is only read.
            first = Held(
                client, api.tokens["web-5"], {"wait": 60, "policy_digest": "x"} | inventory
            )
            deadline = time.monotonic() + 30
            while not api.server.push._turns.locked():  # the first has the one turn
                assert time.monotonic() < deadline, "the first check-in never took the turn"
                assert first.thread.is_alive(), (first.status, first.seconds, first.answer)
                time.sleep(0.01)
            second = Held(
                client, api.tokens["web-4"], {"wait": 1, "policy_digest": "x"} | inventory
            )
            while api.server.push.queued != 1:  # the second waits for it
                assert time.monotonic() < deadline and second.thread.is_alive()
                time.sleep(0.01)
            second.thread.join(30)
            assert second.status == 503 and "Retry-After" in second.headers, second.answer
            assert "busy with other check-ins for 0.5 s" in second.answer["detail"]
            assert 0.5 <= second.seconds < 5 and api.server.push.queued == 0
        assert first.result()["policy_digest"] != "x"  # stored, answered at once
    with TestClient(api.app) as client:
        r = client.post("/api/v1/checkin", json={}, headers=api.auth("web-4"))
        assert r.status_code == 200 and r.json()["inventory_digest"] is None


def test_hosts_with_the_same_patches_share_their_answer(
    api: Api, live: TestClient, make_artifact: MakeArtifact
) -> None:
    """One answer computed per group and set of relevant patches, and only shared by
    hosts that are told the same: another group, or another module, another answer."""
    data = make_artifact("fix-share", 1)
    live.post("/api/v1/patches", content=data, headers=api.auth("operator"))
    live.post("/api/v1/groups", json={"path": "/web", "default_state": "disabled"},
              headers=api.auth("admin"))  # fmt: skip
    for name, group in (("a-1", "/"), ("a-2", "/"), ("b-1", "/"), ("w-1", "/web")):
        api.enroll(name, group)
    other = {"name": "libz.so", "path": "/lib/libz.so", "build_id": "cd" * 20, "sha256": "ef" * 32}
    sent = {"a-1": [module_of(data)], "a-2": [module_of(data), other], "b-1": [other],
            "w-1": [module_of(data)]}  # fmt: skip
    answers = {
        name: live.post(
            "/api/v1/checkin", json={"modules": modules, "processes": []}, headers=api.auth(name)
        ).json()
        for name, modules in sent.items()
    }
    digest = {name: a["policy_digest"] for name, a in answers.items()}
    assert digest["a-1"] == digest["a-2"] != digest["b-1"] != digest["w-1"] != digest["a-1"]
    assert [p["state"] for p in answers["w-1"]["patches"]] == ["disabled"]
    assert answers["b-1"]["patches"] == [] and len(answers["a-2"]["patches"]) == 1
    with api.server.database.reading() as session:
        assert len(api.server.catalogues.current(session).memo) == 3

"""A held check-in with nothing to store (server/checkin.py `look_up`, server/seen.py):
answered and held without a turn of the database's writer, its host's `last_seen`
written with the others' a second later; one with something to store is stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from micropatch.server import models as m
from micropatch.server.errors import Busy
from micropatch.server.push import Push
from micropatch.server.seen import FLUSH, Seen

from .conftest import Api
from .test_push import Held, wait_held


@pytest.fixture
def live(api: Api) -> Iterator[TestClient]:
    with TestClient(api.app) as client:
        yield client


@contextmanager
def long_write(api: Api) -> Iterator[None]:
    """A writing transaction that stands in every other writer's way, not a reader's
    (SQLite: it has the one write turn; PostgreSQL: it locks the hosts table against
    writes, as SQLite's one writer does)."""
    with api.server.database.session() as session:
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            session.execute(text("LOCK TABLE hosts IN EXCLUSIVE MODE"))
        else:
            session.execute(text("UPDATE revisions SET value = value"))  # SQLite's write lock
        yield


def last_seen(api: Api, name: str) -> float | None:
    with api.server.database.reading() as session:
        return session.scalar(select(m.Host.last_seen).where(m.Host.name == name))


def test_a_quiet_held_check_in_needs_no_write_turn(api: Api, live: TestClient) -> None:
    """While another transaction writes, a check-in with `wait` and nothing new is
    answered (a stale digest: at once) and held (the answer's digest); its time is
    written once the writer is done, within about FLUSH seconds."""
    api.enroll("q-1")
    first = live.post("/api/v1/checkin", json={"hostname": "q-1"}, headers=api.auth("q-1"))
    digest, seen_before = first.json()["policy_digest"], last_seen(api, "q-1")
    assert seen_before is not None
    time.sleep(0.05)  # a later time to see written
    with long_write(api):
        started = time.monotonic()
        r = live.post("/api/v1/checkin", json={"wait": 60, "policy_digest": "stale",
                      "hostname": "q-1"}, headers=api.auth("q-1"))  # fmt: skip
        assert r.status_code == 200 and r.json()["policy_digest"] == digest
        assert time.monotonic() - started < 5  # not queued behind the writer
        held = Held(live, api.tokens["q-1"], {"wait": 2, "policy_digest": digest})
        wait_held(api, 1)  # held while the writer still writes
        assert api.server.push._turns._value == api.server.push.storing  # took no turn
    assert held.result()["policy_digest"] == digest
    deadline = time.monotonic() + FLUSH + 10
    while (last_seen(api, "q-1") or 0) <= seen_before:
        assert time.monotonic() < deadline, "last_seen was never written"
        time.sleep(0.05)


def test_a_check_in_with_something_to_store_is_stored(api: Api, live: TestClient) -> None:
    """A new name, an inventory or events: stored at once, as any check-in."""
    api.enroll("q-2")
    digest = live.post("/api/v1/checkin", json={}, headers=api.auth("q-2")).json()["policy_digest"]
    for extra in (
        {"hostname": "q-2-renamed"},
        {"modules": [], "processes": [], "inventory_digest": "cd" * 32},
        {"events": [{"kind": "agent", "time": time.time(), "message": "hello"}]},
    ):
        r = live.post("/api/v1/checkin", json={"wait": 60, "policy_digest": "stale"} | extra,
                      headers=api.auth("q-2"))  # fmt: skip
        assert r.status_code == 200 and r.json()["policy_digest"] == digest
    answer = r.json()
    assert answer["events_accepted"] == 1 and answer["inventory_digest"] == "cd" * 32
    assert last_seen(api, "q-2-renamed") is not None


def test_a_quiet_check_in_with_an_unknown_credential_is_refused(api: Api, live: TestClient) -> None:
    r = live.post("/api/v1/checkin", json={"wait": 60, "policy_digest": "x"},
                  headers={"Authorization": "Bearer mph_nobody"})  # fmt: skip
    assert r.status_code == 401 and "unknown or expired credentials" in r.json()["detail"]


class BusyDatabase:
    """A database whose writer stays busy: `session` fails as the real one does
    after its TURN_TIMEOUT."""

    @contextmanager
    def session(self) -> Iterator[Any]:
        raise Busy("the database stayed busy with other requests for 10 s: try again shortly")
        yield  # pragma: no cover


def test_times_that_cannot_be_written_are_kept_for_the_next_write(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    api.enroll("q-3")
    with api.server.database.reading() as session:
        host_id = session.scalar(select(m.Host.id).where(m.Host.name == "q-3"))
    seen = Seen()
    seen.saw(host_id, 1000.0)
    seen.saw(host_id, 900.0)  # an older time does not replace a newer one
    assert seen.write(BusyDatabase()) == 0  # type: ignore[arg-type]
    assert "cannot store when 1 hosts were last seen: the database stayed busy" in caplog.text
    assert seen.pending() == 1 and last_seen(api, "q-3") is None
    assert seen.write(api.server.database) == 1 and last_seen(api, "q-3") == 1000.0
    seen.saw(host_id, 500.0)  # older than the stored time: the stored one stays
    assert seen.write(api.server.database) == 1 and last_seen(api, "q-3") == 1000.0


def test_reads_take_turns_of_their_own_queued_not_at_work() -> None:
    """A check-in to read gets its turn while every turn to store is taken; past
    READING of them, it queues (counted as queued, not at work), then Busy."""
    push = Push(capacity=10, storing=1, reading=1)

    async def scenario() -> None:
        push.start()
        release = asyncio.Event()

        async def take(read: bool, seconds: float = 5.0) -> str:
            async with push.turn(seconds, read=read):
                await release.wait()
                return "read" if read else "stored"

        stored = asyncio.ensure_future(take(False))
        await asyncio.sleep(0.01)
        read = asyncio.ensure_future(take(True))
        await asyncio.sleep(0.01)
        assert push.queued == 0  # the read did not wait for the store's turn
        with pytest.raises(Busy, match=r"busy with other check-ins for 0\.05 s"):
            await take(True, 0.05)  # the one read turn is taken: queued, then Busy
        assert push.queued == 0
        release.set()
        assert (await stored, await read) == ("stored", "read")

    asyncio.run(scenario())


def test_a_quiet_check_in_costs_one_thread_hop(
    api: Api, live: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its read, and nothing else: no dependency runs in a thread (each waits for one
    of the few, counted as at work, under load)."""
    import anyio.to_thread

    api.enroll("q-4")
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", None) or repr(func))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    for _ in range(3):
        r = live.post("/api/v1/checkin", json={"wait": 60, "policy_digest": "stale"},
                      headers=api.auth("q-4"))  # fmt: skip
        assert r.status_code == 200
    assert hops == ["_read"] * 3, hops

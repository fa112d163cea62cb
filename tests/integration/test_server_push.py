"""Held check-ins on a real `micropatch server run` (server/push.py): a change made
through any server process answers the check-ins held by every process within
seconds; a server killed ends the held connections at once (the agents see it and
reconnect), and restarted it holds them again."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from unit.server.conftest import (  # noqa: F401 (fixtures)
    fresh_postgres,
    make_artifact,
    module,
    signing_key,
)

from .test_server import ENV, data_dir, database, free_port, micropatch  # noqa: F401 (fixtures)
from .test_server_faults import Running, answered_by, enroll, running, worker_pids  # noqa: F401

WOKEN_WITHIN = 5.0


class HeldCheckIn(threading.Thread):
    """A check-in sent with `wait` on a connection of its own; after its answer, which
    server process answered (`answered_by`, while the connection is still open)."""

    def __init__(self, server: Running, credential: str, digest: str, workers: set[int]) -> None:
        super().__init__(daemon=True)
        self.server, self.credential, self.digest, self.workers = (
            server, credential, digest, workers,
        )  # fmt: skip
        self.answer: dict[str, Any] | None = None
        self.error: str | None = None
        self.pid: int | None = None
        self.done_at = 0.0

    def run(self) -> None:
        body = {"wait": 120, "policy_digest": self.digest}
        with httpx.Client(timeout=180) as c:
            try:
                r = c.post(f"{self.server.url}/api/v1/checkin", json=body,
                           headers={"Authorization": f"Bearer {self.credential}"})  # fmt: skip
                self.answer = r.json()
                if self.workers:
                    self.pid = answered_by(r, self.server.port, self.workers)
            except httpx.HTTPError as e:
                self.error = type(e).__name__
            self.done_at = time.monotonic()


def hold(server: Running, credentials: list[str], workers: set[int]) -> list[HeldCheckIn]:
    """One held check-in per credential (each first checks in to learn its digest)."""
    held = []
    for credential in credentials:
        r = httpx.post(f"{server.url}/api/v1/checkin", json={}, timeout=60,
                       headers={"Authorization": f"Bearer {credential}"})  # fmt: skip
        assert r.status_code == 200 and r.json()["hold"] > 0, r.text
        held.append(HeldCheckIn(server, credential, r.json()["policy_digest"], workers))
    for h in held:
        h.start()
    return held


def settled(held: list[HeldCheckIn], seconds: float = 3.0) -> None:
    """Time for the check-ins to reach the server and be held (none answered yet)."""
    time.sleep(seconds)
    answered = [h.answer or h.error for h in held if not h.is_alive()]
    assert not answered, f"answered before any change: {answered}"


def change_policy(server: Running, admin: str, state: str) -> float:
    r = httpx.put(f"{server.url}/api/v1/policies/", json={"default_state": state}, timeout=60,
                  headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
    assert r.status_code == 200, r.text
    return time.monotonic()


def woken(held: list[HeldCheckIn], since: float, check: Callable[[dict[str, Any]], bool]) -> None:
    for h in held:
        h.join(timeout=60)
        assert not h.is_alive() and h.answer is not None, h.error
        assert check(h.answer), h.answer
        assert h.done_at - since < WOKEN_WITHIN, f"answered {h.done_at - since:.1f} s after"


def admin_token(server: Running) -> str:
    return micropatch("server", "admin", "create-user", "boss", "--role", "admin",
                      "--data-dir", server.data).stdout.strip()  # fmt: skip


def test_a_policy_change_answers_held_check_ins(running: Running) -> None:  # noqa: F811
    credentials = enroll(running, 6)
    admin = admin_token(running)
    held = hold(running, credentials, set())
    settled(held)
    since = change_policy(running, admin, "disabled")
    woken(held, since, lambda a: a["policy"]["default_state"]["state"] == "disabled")


def test_held_check_ins_end_with_a_killed_server_and_are_held_again(running: Running) -> None:  # noqa: F811
    """SIGKILL: each held connection ends at once (reset or closed), not after its hold.
    Restarted, the server holds check-ins again and a change answers them."""
    credentials = enroll(running, 4)
    admin = admin_token(running)
    held = hold(running, credentials, set())
    settled(held)
    killed = time.monotonic()
    running.stop(signal.SIGKILL)
    for h in held:
        h.join(timeout=30)
        assert not h.is_alive(), "a held check-in outlived the server"
        assert h.error is not None and h.answer is None
        assert h.done_at - killed < 5, f"noticed {h.done_at - killed:.1f} s after the kill"
    running.start()
    held = hold(running, credentials, set())
    settled(held)
    since = change_policy(running, admin, "disabled")
    woken(held, since, lambda a: a["policy"]["default_state"]["state"] == "disabled")


def test_a_change_through_one_worker_answers_those_held_by_every_worker(
    data_dir: Path,  # noqa: F811
) -> None:
    """`server run --workers 2` (PostgreSQL): each process follows the policy revision,
    so a change made through either answers the check-ins both hold."""
    if not ENV.get("MICROPATCH_SERVER_DATABASE"):
        pytest.skip("--workers needs PostgreSQL: set MICROPATCH_TEST_POSTGRES=postgresql://…")
    server = Running(data_dir)
    server.workers = 2
    server.start()
    try:
        credentials = enroll(server, 12)
        admin = admin_token(server)
        workers = worker_pids(server)
        assert len(workers) == 2, workers
        held = hold(server, credentials, workers)
        settled(held)
        since = change_policy(server, admin, "disabled")
        woken(held, since, lambda a: a["policy"]["default_state"]["state"] == "disabled")
        by = {h.pid for h in held}
        assert by == workers, f"held by {by}, not by each of {workers}: retry with more hosts"
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()

"""The agent's held check-ins (agent/fleet/checkin.py) against a fake fleet server that
holds: sent at once with `wait` and the answer's digest; not sent to a server that
does not offer holds; cut short by stop; a silent server noticed after the wait plus
HOLD_MARGIN; the next check-in after `after`, or after the interval when not held;
backoff with jitter; after a 503, seconds (its Retry-After), not the interval. (Real
agents and a real server: tests/integration/test_fleet_push.py.)"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from micropatch.agent.fleet import backoff, checkin
from micropatch.agent.service import Agent

from .test_fleet import make_agent

BUSY_AFTER = "1"  # the Retry-After of the fake server's 503s


class HoldingServer:
    """Answers enrollment; a check-in with `wait` is held until `release` is set or
    `wait` passes (or forever, with `silent`)."""

    def __init__(self) -> None:
        self.checkins: list[dict[str, Any]] = []
        self.answer: dict[str, Any] = {"hold": 30, "policy_digest": "d1"}
        self.release = threading.Event()
        self.silent = False
        self.holding = threading.Event()
        self.busy = 0  # check-ins to answer 503 with Retry-After: BUSY_AFTER
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/api/v1/enroll":
                    reply: dict[str, Any] = {"host_id": 7, "credential": "mph_secret",
                                             "group": "/", "checkin_interval": 60,
                                             "repository": "http://x/repository"}  # fmt: skip
                    status = 201
                elif fake.busy > 0:
                    fake.busy -= 1
                    fake.checkins.append(body | {"refused": time.monotonic()})
                    data = json.dumps({"detail": "the server is at work: retry"}).encode()
                    self.send_response(503)
                    self.send_header("Retry-After", BUSY_AFTER)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                else:
                    fake.checkins.append(body | {"answered": time.monotonic()})
                    if body.get("wait"):
                        fake.holding.set()
                        if fake.silent:
                            time.sleep(60)
                        fake.release.wait(body["wait"])
                    reply = {"host_id": 7, "group": "/", "checkin_interval": 60,
                             "repository": "http://x/repository", "patches": [], "revoked": [],
                             "policy": {"patches": [], "exclusions": []},
                             "events_accepted": len(body["events"]),
                             "inventory_digest": None, **fake.answer}  # fmt: skip
                    status = 200
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the agent hung up (stopped, or gave up on a silent hold)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[HoldingServer]:
    s = HoldingServer()
    yield s
    s.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(tmp_path)
    a.fleet.inventory.scan = lambda: []  # type: ignore[method-assign]
    yield a
    a.close()


def test_the_next_check_in_is_held_with_the_answers_digest(agent, server):
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.fleet.check_in()
    assert "wait" not in server.checkins[0]  # nothing known of the server yet
    server.release.set()
    agent.fleet.check_in()
    held = server.checkins[-1]
    assert (held["wait"], held["policy_digest"]) == (30, "d1")  # the hold, within 60 s
    assert agent.fleet.status()["hold"] == 30 and agent.fleet.status()["checkins"] == 2


def test_a_server_that_holds_none_is_checked_in_with_every_interval(agent, server):
    """An older server (no `hold`, no digest) or a full one (hold 0): no `wait` (an
    older server refuses unknown fields), and the next check-in after the interval."""
    agent.fleet.enroll(server.url, "mpe_good", None)
    for answer in ({}, {"hold": 0, "policy_digest": "d1"}):
        server.answer = answer
        agent.fleet.check_in()
        agent.fleet.check_in()
        assert "wait" not in server.checkins[-1]
        assert agent.fleet._next_in is None  # the interval


def test_the_loop_waits_after_then_holds(agent, server):
    """A changed answer (after 0.3): the next check-in about 0.3 s later, held; the
    loop runs on a thread of its own and stop cuts the held request short."""
    server.answer = {"hold": 30, "policy_digest": "d1", "after": 0.3}
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.fleet.start()  # the check-in thread: at once, then held
    assert server.holding.wait(20), "the next check-in was not held"
    first, held = server.checkins[0], server.checkins[-1]
    assert "wait" not in first and held["wait"] == 30
    started = time.monotonic()
    agent.fleet.stop()
    assert time.monotonic() - started < 3, "stop waited for the held check-in"
    assert agent.fleet._thread is not None and not agent.fleet._thread.is_alive()
    assert agent.fleet.status()["failures"] == 0  # cut short by stop: not "unreachable"
    assert not [e for e in agent.events.query() if "unreachable" in e.message]


def test_a_silent_held_check_in_is_dead_after_the_wait_and_the_margin(agent, server, monkeypatch):
    monkeypatch.setattr(checkin, "HOLD_MARGIN", 1.0)
    server.answer = {"hold": 1, "policy_digest": "d1"}
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.fleet.check_in()
    server.silent = True
    started = time.monotonic()
    with pytest.raises(OSError):
        agent.fleet.check_in()  # wait 1 s + margin 1 s, then the socket's timeout
    took = time.monotonic() - started
    assert 1.5 < took < 10, took
    delay = agent.fleet._failed(TimeoutError("timed out"))
    assert 60 <= delay <= 120  # the interval doubled, with jitter (half to all of it)
    said = [e.message for e in agent.events.query() if "unreachable" in e.message]
    assert len(said) == 1


def test_backoff_has_jitter(agent, server):
    agent.fleet.enroll(server.url, "mpe_good", None)
    delays = {agent.fleet._failed(OSError("down")) for _ in range(8)}
    assert len(delays) > 1 and all(d <= backoff.MAX_BACKOFF for d in delays)


def test_when_the_next_check_in_goes(agent, server):
    """After a change (or the first answer): `after`; after a hold that ran to its end:
    at once; after one not held (sent without wait, or answered at once unchanged):
    the interval — never check-ins back to back."""
    fleet = agent.fleet
    answer = {"hold": 30, "policy_digest": "d1", "after": 0.5}
    fleet._held(answer, 0, 0.01)
    assert fleet._next_in == 0.5  # new: d1
    fleet._held(answer | {"after": 0}, 30, 29.0)
    assert fleet._next_in == 0.0  # held 29 s, unchanged
    fleet._held(answer, 30, 0.01)
    assert fleet._next_in is None  # meant to be held, answered at once, unchanged
    assert not fleet._rehold
    fleet._held(answer, 0, 0.01)
    assert fleet._next_in is None  # sent without wait (revocations under way)
    assert fleet._rehold  # the loop checks in again once they are done
    fleet._held(answer | {"policy_digest": "d2", "after": 100}, 30, 3.0)
    assert fleet._next_in == 60  # a change: after, at most the interval


def test_busy_backoff_is_retry_after_plus_a_jitter_that_grows_to_seconds():
    """After a 503 with Retry-After: that, plus a jitter doubled per busy answer in a
    row, at most BUSY_SPREAD: seconds, never the interval (agent/fleet/backoff.py)."""
    for streak, spread in ((1, 2.0), (2, 4.0), (3, 8.0), (6, backoff.BUSY_SPREAD)):
        delays = [backoff.busy(2.0, streak) for _ in range(200)]
        assert all(2.0 <= d <= 2.0 + spread for d in delays), (streak, max(delays))
        assert max(delays) - min(delays) > spread / 4  # spread, not all at once
    assert 0.0 <= backoff.busy(0, 1) <= 1.0  # no floor to wait, still up to a second
    assert backoff.busy(10**9, 1) <= backoff.MAX_RETRY_AFTER + 30
    assert [backoff.retry_after(v) for v in ("2", " 5 ", "x", "-1", "nan", None)] == [
        2.0, 5.0, None, None, None, None,
    ]  # fmt: skip


def test_a_busy_server_is_retried_in_seconds_and_held_again(agent, server):
    """Three 503s with Retry-After: 1 in a row: the agent's own loop comes back after
    each within a few seconds (not the interval, 60 s, doubled), says it once, and
    holds a check-in again once answered."""
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.fleet.check_in()  # the answer's digest and hold: d1, 30
    server.busy = 3
    agent.fleet.start()
    assert server.holding.wait(30), "the agent did not come back after the 503s"
    refused = [c["refused"] for c in server.checkins if "refused" in c]
    held = [c for c in server.checkins if c.get("wait")]
    assert len(refused) == 3 and held and held[-1]["policy_digest"] == "d1"
    gaps = [b - a for a, b in zip(refused, [*refused[1:], held[-1]["answered"]], strict=True)]
    # Retry-After 1 s plus a jitter of up to 1, 2 then 4 s (timing: a loaded machine).
    assert all(1.0 <= g <= 1.0 + s + 1.0 for g, s in zip(gaps, (1, 2, 4), strict=True)), gaps
    said = [e.message for e in agent.events.query() if "HTTP 503" in e.message]
    assert len(said) == 1 and "the server is at work" in said[0]
    server.release.set()  # the held one answered: the streak is over
    deadline = time.monotonic() + 20
    while agent.fleet.status()["failures"]:
        assert time.monotonic() < deadline, agent.fleet.status()
        time.sleep(0.05)
    assert agent.fleet._busy == 0

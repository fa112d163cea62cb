"""agent/fleet.py in-process against a fake fleet server (http.server in a thread): the
event cursor (nothing lost, nothing sent twice, across failures and restarts), one
"unreachable" event, backoff, the server's policy applied, enrollment kept 0600.
(With a real server and real agents: tests/integration/test_fleet_e2e.py.)"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from micropatch.agent.config import AgentConfig
from micropatch.agent.events import Event
from micropatch.agent.fleet import Fleet, HttpError
from micropatch.agent.paths import AgentPaths
from micropatch.agent.policy import Exclusion
from micropatch.agent.service import Agent
from micropatch.errors import AgentError


class FakeServer:
    def __init__(self) -> None:
        self.checkins: list[dict[str, Any]] = []
        self.status = 200
        self.answer: dict[str, Any] = {}
        self.digest: str | None = None  # the inventory digest the server holds
        self.error: dict[str, Any] | None = None  # the body of an error status
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/api/v1/enroll":
                    ok = body["token"] == "mpe_good"
                    reply = ({"host_id": 7, "credential": "mph_secret", "group": "/prod",
                              "checkin_interval": 60, "repository": "http://x/repository"}
                             if ok else {"detail": "unknown enrollment token"})  # fmt: skip
                    status = 201 if ok else 401
                else:
                    assert self.headers["Authorization"] == "Bearer mph_secret"
                    fake.checkins.append(body)
                    status = fake.status
                    if "modules" in body and status == 200:
                        fake.digest = body["inventory_digest"]
                    reply = {"host_id": 7, "group": "/prod", "checkin_interval": 60,
                             "repository": "http://x/repository", "patches": [], "revoked": [],
                             "policy": {"patches": [], "exclusions": []},
                             "events_accepted": len(body["events"]),
                             "inventory_digest": fake.digest, **fake.answer}  # fmt: skip
                    if status >= 400 and fake.error is not None:
                        reply = fake.error
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    s = FakeServer()
    yield s
    s.close()


def make_agent(tmp_path: Path) -> Agent:
    paths = AgentPaths(tmp_path / "state", tmp_path / "agent.sock", tmp_path / "trusted")
    (tmp_path / "trusted").mkdir(exist_ok=True)
    (tmp_path / "trusted" / "repository-root.json").write_text('{"signed": {}}')
    return Agent(AgentConfig(inventory_interval=3600), paths, stream=io.StringIO())


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(tmp_path)
    a.fleet.inventory.scan = lambda: []  # type: ignore[method-assign]
    yield a
    a.close()


def sent(server: FakeServer) -> list[str]:
    return [e["message"] for c in server.checkins for e in c["events"]]


def test_enroll_keeps_the_credential_private_and_refuses_a_bad_token(agent, server, tmp_path):
    with pytest.raises(AgentError, match=r"enrollment refused.*401"):
        agent.fleet.enroll(server.url, "mpe_bad", None)
    assert agent.fleet.enrollment is None
    done = agent.fleet.enroll(server.url + "/", "mpe_good", None)
    assert (done["host_id"], done["group"], done["server"]) == (7, "/prod", server.url)
    saved = tmp_path / "state" / "fleet.json"
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    assert json.loads(saved.read_text())["credential"] == "mph_secret"
    root = tmp_path / "state" / "tuf" / "metadata" / "root.json"
    assert root.read_text() == '{"signed": {}}'
    assert Fleet(agent).enrollment == agent.fleet.enrollment  # read back at the next start


def test_no_root_no_enrollment(agent, server, tmp_path):
    (tmp_path / "trusted" / "repository-root.json").unlink()
    with pytest.raises(AgentError, match="no trusted root"):
        agent.fleet.enroll(server.url, "mpe_good", None)


def test_events_are_sent_once_across_failures_and_restarts(agent, server, tmp_path):
    agent.report(Event("agent", time.time(), message="before enrollment"))
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.report(Event("agent", time.time(), pid=5, message="one"))
    agent.fleet.check_in()
    assert sent(server)[-1] == "one" and "before enrollment" not in sent(server)
    assert any(m.startswith("enrolled with") for m in sent(server))
    agent.report(Event("agent", time.time(), pid=5, message="two"))
    server.status = 500  # the server fails: the cursor stays
    with pytest.raises(HttpError):
        agent.fleet.check_in()
    server.status = 200
    agent.fleet.check_in()
    assert sent(server).count("two") == 2  # offered again, since the first was refused
    agent.fleet.check_in()
    assert sent(server).count("two") == 2  # and not after it was taken
    cursor = agent.fleet.cursor()
    agent.report(Event("agent", time.time(), message="three"))
    agent.close()
    again = make_agent(tmp_path)  # a restart: the cursor is in agent.db
    again.fleet.inventory.scan = lambda: []  # type: ignore[method-assign]
    assert again.fleet.cursor() == cursor
    again.fleet.check_in()
    assert [m for m in sent(server) if m in ("one", "two", "three")] == [
        "one",
        "two",
        "two",
        "three",
    ]
    again.close()


def test_the_inventory_is_sent_only_when_the_server_does_not_hold_it(agent, server):
    modules = [{"name": "libc.so.6", "path": "/usr/lib/libc.so.6", "build_id": "ab",
                "sha256": "0" * 64}]  # fmt: skip
    agent.fleet.inventory.scan = lambda: list(modules)  # type: ignore[method-assign]
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.fleet.check_in()
    first = server.checkins[-1]
    assert first["modules"] == modules and first["processes"] == []
    assert server.digest == first["inventory_digest"]
    agent.fleet.check_in()  # unchanged: only the digest
    assert "modules" not in server.checkins[-1] and "processes" not in server.checkins[-1]
    assert server.checkins[-1]["inventory_digest"] == first["inventory_digest"]
    # The same modules found in another order are the same inventory.
    modules.insert(0, {"name": "a", "path": "/a", "build_id": None, "sha256": "1" * 64})
    agent.fleet._scanned = None  # rescan now
    agent.fleet.check_in()
    changed = server.checkins[-1]
    assert (
        changed["modules"] == modules and changed["inventory_digest"] != first["inventory_digest"]
    )
    modules.reverse()
    agent.fleet._scanned = None
    agent.fleet.check_in()
    assert "modules" not in server.checkins[-1]
    # A server that lost it (restored from an older backup): sent again at the next one.
    server.digest = "something else"
    agent.fleet.check_in()
    assert "modules" not in server.checkins[-1]  # it learns this from the answer
    agent.fleet.check_in()
    assert server.checkins[-1]["modules"] == modules
    # A failed check-in changes nothing the agent believes the server holds.
    server.status = 500
    with pytest.raises(HttpError):
        agent.fleet.check_in()
    server.status = 200
    agent.fleet.check_in()
    assert "modules" not in server.checkins[-1]


def test_unreachable_is_said_once_with_backoff(agent, server):
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.fleet.check_in()
    server.close()
    delays = []
    for _ in range(4):
        try:
            agent.fleet.check_in()
        except OSError as e:
            delays.append(agent.fleet._failed(e))
    # Doubled, at most 10 minutes, with jitter (half to all of it: a fleet comes back spread).
    for delay, full in zip(delays, [120.0, 240.0, 480.0, 600.0], strict=True):
        assert full / 2 <= delay <= full
    said = [e.message for e in agent.events.query() if "unreachable" in e.message]
    assert len(said) == 1 and agent.fleet.status()["failures"] == 4


def test_the_servers_exclusions_replace_the_local_ones(agent, server):
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.state.exclude(Exclusion("exe", "/opt/local/*"))
    server.answer = {"policy": {"patches": [], "exclusions": [
        {"kind": "unit", "value": "nginx", "patch_id": None, "decided_by": "/"},
        {"kind": "user", "value": "no-such-user-anywhere", "patch_id": None, "decided_by": "/"},
    ]}}  # fmt: skip
    generation = agent.generation
    agent.fleet.check_in()
    assert agent.state.exclusions() == [Exclusion("unit", "nginx.service")]
    assert agent.generation == generation + 1  # reconciled live
    agent.fleet.check_in()
    assert agent.generation == generation + 1  # nothing changed: no new pass
    ignored = [e for e in agent.events.query() if "exclusion ignored" in e.message]
    assert len(ignored) == 1


def test_a_repository_that_fails_is_said_once_and_the_check_in_goes_on(agent, server):
    agent.fleet.enroll(server.url, "mpe_good", None)
    server.answer = {"patches": [{
        "patch_id": "fix-a", "version": 1, "artifact_id": "0" * 64, "title": None,
        "target": "fix-a-v1-000000000000.mpatch", "state": "enabled", "decided_by": "/",
        "reason": "", "module": {"name": "libx.so", "build_id": "ab", "sha256": "0" * 64},
    }], "repository": "http://127.0.0.1:1/repository"}  # fmt: skip
    for _ in range(3):
        agent.fleet.check_in()  # the check-in succeeds; the download does not
    said = [e for e in agent.events.query() if e.message.startswith("fleet repository")]
    assert len(said) == 1 and agent.fleet.status()["failures"] == 0
    assert agent.store.patches() == {}


def test_a_refusal_is_said_as_what_it_is_with_the_servers_message(agent, server):
    """Issue 15.7: a 4xx is not "unreachable": the event says the server refused the
    check-in, with what the server said (a validation error's first problems)."""
    agent.fleet.enroll(server.url, "mpe_good", None)
    agent.fleet.check_in()
    server.status = 422
    server.error = {"detail": [
        {"loc": ["body", "processes", 0, "patches", 0, "version"], "type": "less_than_equal",
         "msg": "Input should be less than or equal to 2147483647"},
        {"loc": ["body", "events", 3, "version"], "msg": "Input should be less than or equal to 2147483647"},
    ]}  # fmt: skip
    for _ in range(3):
        with pytest.raises(HttpError) as refused:
            agent.fleet.check_in()
        agent.fleet._failed(refused.value)
    said = [e.message for e in agent.events.query() if e.message.startswith("fleet server")]
    assert said == [
        f"fleet server {server.url} refused the check-in (HTTP 422): processes.0.patches.0."
        "version: Input should be less than or equal to 2147483647; events.3.version: Input "
        "should be less than or equal to 2147483647; working on with the patches and policy "
        "at hand, retrying"
    ]  # once, not once per attempt
    assert agent.fleet.status()["last_error"].startswith("HTTP 422: processes.0.patches.0.version")
    server.status, server.error = 401, {"detail": "unknown host credential"}
    with pytest.raises(HttpError) as refused:
        agent.fleet.check_in()
    agent.fleet._failed(refused.value)
    said = [e.message for e in agent.events.query() if e.message.startswith("fleet server")]
    assert said[-1].startswith(f"fleet server {server.url} refused the check-in (HTTP 401): "
                               "unknown host credential;")  # fmt: skip
    assert said[-1].endswith("enroll it again (agent enroll)")
    server.status = 500
    server.error = {"detail": "Internal Server Error"}
    with pytest.raises(HttpError) as failed:
        agent.fleet.check_in()
    agent.fleet._failed(failed.value)
    assert agent.events.query()[-1].message.startswith(
        f"fleet server {server.url} failed the check-in (HTTP 500: Internal Server Error)"
    )
    assert not [e for e in agent.events.query() if "unreachable" in e.message]
    server.status = 200
    agent.fleet.check_in()
    assert agent.events.query()[-1].message.endswith("took a check-in again after 5 failed ones")

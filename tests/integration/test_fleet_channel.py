"""Issue 15.7, end to end: a real server, a real agent (in its own PID namespace, with
no exec interception: it marks no filesystem), real targets.

- A patch applied by hand with version 2147483648 (past 32 bits) does not break the
  check-ins (it once made every one fail with HTTP 422): it is not the store's, so
  it is not reported at all.
- A published patch with version 2147483648 travels the whole way: downloaded,
  applied, its applied state, applied and blocked events on the server, revoked by
  that version.
- The server takes a check-in item by item: bad items left out and named, the rest
  stored.
- A refusal (HTTP 401: a credential the server does not know) is said as what it
  is, with the server's message, not as "unreachable".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from targets.fleet import FleetAgent, Host, agent_config, wait_for

from . import test_fleet_e2e
from .agentproc import GUARD, micropatch, signed
from .patching import patch_source

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="needs root, unshare and nsenter (a PID namespace stands for the host)",
)
fleet = test_fleet_e2e.fleet  # the fixture: a repository, a server, hosts torn down

BIG = 2**31  # 2147483648: one past a 32-bit column
CHECKIN = 1.0
MARGIN = 15.0


def test_versions_past_32_bits_bad_items_and_refusals(targets, tmp_path: Path, fleet) -> None:
    server, data = fleet["server"], fleet["data"]
    admin = micropatch("server", "admin", "create-user", "ada", "--role", "admin",
                       "--data-dir", data).stdout.strip()  # fmt: skip
    api = httpx.Client(
        base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {admin}"}
    )
    host = Host(tmp_path, "h-1")
    fleet["hosts"].append(host)
    by_hand, served = host.start(targets.forker), host.start(targets.vuln_pie)
    config = agent_config(CHECKIN, blocked_interval=0.2) + "new_processes = false\n"
    agent = FleetAgent(host, fleet["public"], fleet["root"], config).start()
    fleet["agents"].append(agent)
    token = micropatch("server", "admin", "enrollment-token", "--data-dir", data).stdout.strip()
    done = micropatch("agent", "enroll", server.url, "--token", token, "--socket", agent.socket)
    assert done.returncode == 0, done.stderr
    host_id = agent.status()["fleet"]["host_id"]

    def checked_in_after(moment: float) -> bool:
        fleet_state = agent.status()["fleet"]
        assert fleet_state["failures"] == 0, fleet_state
        return bool(fleet_state["last_checkin"] and fleet_state["last_checkin"] > moment)

    # Applied by hand (not through the agent), version 2147483648, blocking an attempt.
    source = tmp_path / "hand.toml"
    source.write_text(patch_source(targets.forker, [GUARD], id="hand-fix", version=BIG))
    applied = subprocess.run(
        [*host.enter(), "micropatch", "apply", str(source), "--pid", str(by_hand.pid),
         "--allow-unsigned"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "MICROPATCH_NO_AGENT": "1"},
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert by_hand.cmd("call 65") == "-1"
    moment = time.time()
    agent.client.call("rescan")
    wait_for(lambda: checked_in_after(moment + CHECKIN), CHECKIN + MARGIN, "check-ins go on")

    # Published, version 2147483648: every step of the way.
    artifact = signed(tmp_path, targets.vuln_pie, [GUARD], fleet["key"], id="fleet-fix",
                      version=BIG)  # fmt: skip
    done = micropatch("publish", artifact, "--server", server.url, "--token", admin)
    assert done.returncode == 0, done.stderr

    def carried() -> list[tuple[int, str, int]]:
        return [(p["pid"], i, v) for p in agent.status()["processes"] for i, v in p["patches"].items()]  # fmt: skip

    wait_for(lambda: (served.pid, "fleet-fix", BIG) in carried(), CHECKIN + MARGIN, "applied")
    assert served.cmd("call 65") == "-1"

    def on_server() -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
        host_row = api.get(f"/api/v1/hosts/{host_id}").json()
        events = api.get("/api/v1/events", params={"host_id": host_id, "limit": 10_000}).json()
        return [(p["patch_id"], p["version"]) for p in host_row["processes"]], events

    def blocked_there() -> bool:
        processes, events = on_server()
        return processes == [("fleet-fix", BIG)] and any(
            e["kind"] == "blocked" and e["version"] == BIG for e in events
        )

    wait_for(blocked_there, CHECKIN + MARGIN, "the applied state and the blocked attempt")
    _, events = on_server()
    assert {(e["kind"], e["version"]) for e in events if e["patch_id"] == "fleet-fix"} >= {
        ("applied", BIG), ("blocked", BIG)}  # fmt: skip
    assert not [e for e in events if e["patch_id"] == "hand-fix"]  # not the store's
    assert not [e for e in agent.events() if "refused" in e["message"]]

    # Revoked by that very version: removed live, then from the store.
    r = api.post("/api/v1/patches/fleet-fix/revoke", json={"version": BIG})
    assert r.status_code == 200, r.text
    wait_for(lambda: not carried() or carried() == [], CHECKIN + MARGIN, "removed")
    assert served.cmd("call 65") == "-2"

    # The server takes a check-in item by item.
    credential = json.loads((agent.state / "fleet.json").read_text())["credential"]
    body = {
        "modules": [{"name": "good.so", "sha256": "1" * 64},
                    {"name": "bad.so", "sha256": "not a digest"}],
        "processes": [{"pid": 0, "patches": [{"patch_id": "x", "version": 1}]},
                      {"pid": 42, "patches": [{"patch_id": "fleet-fix", "version": BIG}]}],
        "events": [{"kind": "not-a-kind", "time": 1.0},
                   {"kind": "agent", "time": time.time(), "message": "item by item"}],
    }  # fmt: skip
    r = httpx.post(f"{server.url}/api/v1/checkin", json=body, timeout=30,
                   headers={"Authorization": f"Bearer {credential}"})  # fmt: skip
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [line.split(":")[0] for line in answer["ignored"]] == ["modules[1]", "processes[0]", "events[0]"]  # fmt: skip
    assert answer["events_accepted"] == 1
    processes, events = on_server()
    assert processes == [("fleet-fix", BIG)]
    assert api.get(f"/api/v1/hosts/{host_id}").json()["modules"] == 1
    assert any(e["message"] == "item by item" for e in events)

    # A refusal is said as what it is, with the server's message.
    agent.stop()
    enrollment = json.loads((agent.state / "fleet.json").read_text())
    (agent.state / "fleet.json").write_text(json.dumps({**enrollment, "credential": "mph_forged"}))
    agent.start()

    def refused() -> list[dict[str, Any]]:
        return [e for e in agent.events() if "refused the check-in" in e["message"]]

    [said] = wait_for(refused, CHECKIN + MARGIN, "the refusal said")
    assert said["message"].startswith(
        f"fleet server {server.url} refused the check-in (HTTP 401): "
    )
    assert said["data"]["status"] == 401 and said["data"]["error"]
    assert not [e for e in agent.events() if "unreachable" in e["message"]]
    time.sleep(3 * CHECKIN)
    assert len(refused()) == 1  # once, not once per attempt
    assert agent.status()["fleet"]["last_error"].startswith("HTTP 401: ")

"""Push with real agents (issue 17.8): two hosts (PID+UTS namespaces, tests/targets/fleet.py),
each a real `micropatch agent run` with the server's check-in interval (30 s here, as
test_fleet_e2e's server runs) and a vuln_pie target. Their check-ins are held: a
publish, a policy change and a revocation each reach both within seconds, far less
than the interval. Then the server is SIGKILLed while they wait: they notice at
once, retry with backoff, and once it is back, hold again and converge."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from targets.fleet import FleetAgent, Host, NsTarget, wait_for

from .agentproc import GUARD, micropatch, signed
from .test_fleet_e2e import Server, fleet  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="needs root, unshare and nsenter (PID namespaces stand for hosts)",
)

INTERVAL = 30  # the server's --checkin-interval (test_fleet_e2e.Server)
PUSHED = 10.0  # seconds a change may take to reach both agents on a loaded test machine


def carries(agent: FleetAgent) -> list[tuple[str, int]]:
    return [(p, v) for c in agent.status()["processes"] for p, v in c["patches"].items()]


def held(agent: FleetAgent) -> bool:
    """The server offers holds and the agent has checked in since: its check-in is held."""
    f = agent.status()["fleet"]
    return bool(f["last_checkin"]) and f["hold"] > 0 and f["checkins"] >= 1


def start_fleet(fleet: dict[str, Any], targets: Any, config: str) -> tuple[list, list, str]:  # noqa: F811
    tmp: Path = fleet["tmp"]
    admin = micropatch("server", "admin", "create-user", "ada", "--role", "admin",
                       "--data-dir", fleet["data"]).stdout.strip()  # fmt: skip
    agents: list[FleetAgent] = fleet["agents"]
    per_host: list[NsTarget] = []
    for name in ("web-1", "db-1"):
        host = Host(tmp, name)
        fleet["hosts"].append(host)
        per_host.append(host.start(targets.vuln_pie))
        agent = FleetAgent(host, fleet["public"], fleet["root"], config).start()
        agents.append(agent)
        token = micropatch("server", "admin", "enrollment-token",
                           "--data-dir", fleet["data"]).stdout.strip()  # fmt: skip
        done = micropatch("agent", "enroll", fleet["server"].url, "--token", token,
                          "--socket", agent.socket)  # fmt: skip
        assert done.returncode == 0, done.stderr
    for agent in agents:
        wait_for(lambda a=agent: held(a), 60, f"{agent.host.name} holds a check-in")
    return agents, per_host, admin


def pushed(agents: list[FleetAgent], check: Any, what: str) -> float:
    """Seconds until `check(agent)` holds for every agent (at most PUSHED)."""
    start = time.monotonic()
    for agent in agents:
        wait_for(lambda a=agent: check(a), PUSHED, f"{agent.host.name}: {what}")
    return time.monotonic() - start


def test_publish_policy_and_revoke_are_pushed(targets, fleet) -> None:  # noqa: F811
    server: Server = fleet["server"]
    agents, per_host, admin = start_fleet(fleet, targets, "inventory_interval = 5\n")
    api = httpx.Client(base_url=server.url, timeout=30,
                       headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
    assert {a.status()["fleet"]["checkin_interval"] for a in agents} == {INTERVAL}
    before = {a.host.name: a.status()["fleet"]["checkins"] for a in agents}

    artifact = signed(fleet["tmp"], targets.vuln_pie, [GUARD], fleet["key"], id="push-fix")
    done = micropatch("publish", artifact, "--server", server.url, "--token", admin)
    assert done.returncode == 0, done.stderr
    pushed(agents, lambda a: carries(a) == [("push-fix", 1)], "applies the published patch")
    assert {t.cmd("call 65") for t in per_host} == {"-1"}

    r = api.put("/api/v1/policies/", json={"patches": {"push-fix": "disabled"}})
    assert r.status_code == 200, r.text
    pushed(agents, lambda a: carries(a) == [], "removes the disabled patch")
    assert {t.cmd("call 65") for t in per_host} == {"-2"}
    r = api.put("/api/v1/policies/", json={"patches": {"push-fix": "enabled"}})
    assert r.status_code == 200, r.text
    pushed(agents, lambda a: carries(a) == [("push-fix", 1)], "applies it again")

    r = api.post("/api/v1/patches/push-fix/revoke", json={})
    assert r.status_code == 200, r.text
    pushed(agents, lambda a: carries(a) == [], "removes the revoked patch")
    assert {t.cmd("call 65") for t in per_host} == {"-2"}
    # Not more check-ins than changes, and a few to report what they did: no polling.
    for a in agents:
        made = a.status()["fleet"]["checkins"] - before[a.host.name]
        assert made <= 4 * 3, f"{a.host.name}: {made} check-ins for 4 changes"


def test_a_killed_server_is_noticed_and_the_agents_converge_after_it(targets, fleet) -> None:  # noqa: F811
    """agent.toml checkin_interval = 5: the held check-ins wait 5 s, the backoff starts
    at 5-10 s. SIGKILL while they wait: both notice at once (said once); restarted,
    a publish reaches both after their backoff, and they hold check-ins again."""
    server: Server = fleet["server"]
    agents, per_host, admin = start_fleet(fleet, targets, "checkin_interval = 5\n"
                                          "inventory_interval = 5\n")  # fmt: skip
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    wait_for(lambda: all(a.status()["fleet"]["failures"] >= 1 for a in agents), 20,
             "both agents notice the server is gone")  # fmt: skip
    unreachable = [e for e in agents[0].events() if "unreachable" in e["message"]]
    assert len(unreachable) == 1, unreachable
    # Back, and a publish at once: the agents, in their backoff, see it at their next try.
    artifact = signed(fleet["tmp"], targets.vuln_pie, [GUARD], fleet["key"], id="late-fix")
    server.start()
    done = micropatch("publish", artifact, "--server", server.url, "--token", admin)
    assert done.returncode == 0, done.stderr
    for agent in agents:
        # The backoff: 5 s doubled per failure, with jitter, then the check-in.
        wait_for(lambda a=agent: carries(a) == [("late-fix", 1)], 60,
                 f"{agent.host.name} converges after the restart")  # fmt: skip
        wait_for(lambda a=agent: held(a) and a.status()["fleet"]["failures"] == 0, 30,
                 f"{agent.host.name} holds a check-in again")  # fmt: skip
    assert {t.cmd("call 65") for t in per_host} == {"-1"}
    r = httpx.put(f"{server.url}/api/v1/policies/", json={"patches": {"late-fix": "disabled"}},
                  headers={"Authorization": f"Bearer {admin}"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    pushed(agents, lambda a: carries(a) == [], "removes it, pushed again")

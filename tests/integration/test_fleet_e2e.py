"""Issue 9 end to end: `micropatch server run`, three real agents enrolled with it, real
target processes, and the patch life cycle through the fleet: publish → applied on
every host within a check-in; disabled for one group → removed live there only; an
exploit input blocked → the event on the server; revoked → removed everywhere. Then
the server goes down and comes back, and an agent restarts without sending an event
twice.

Each "host" is a PID and UTS namespace (`unshare --pid --uts --mount-proc`, a
`sleep` as its init, its own host name): its agent and its targets are started in it with `nsenter`, so each agent
sees (and patches) its own processes only, as on separate machines. The state
directories, sockets and trust directories are separate; the file system is shared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from targets.fleet import FleetAgent, Host, NsTarget, agent_config, wait_for

from micropatch.trust.keys import generate_key, write_key_pair

from .agentproc import GUARD, micropatch, signed
from .test_server import free_port

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="needs root, unshare and nsenter (PID namespaces stand for hosts)",
)

CHECKIN = 1.0  # the agents' check-in interval (agent.toml), seconds
MARGIN = 15.0  # what one check-in may take beyond it on a loaded test machine


class Server:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            ["micropatch", "server", "run", "--data-dir", str(self.data),
             "--listen", f"127.0.0.1:{self.port}", "--checkin-interval", "30"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        seen = []
        for line in self.proc.stderr:
            seen.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(seen))
        # Keep reading its log so that the pipe never fills.
        import threading

        stream = self.proc.stderr
        threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    keys = tmp_path / "keys"
    keys.mkdir()
    private, public = write_key_pair(generate_key("patches", expires_days=30), keys / "patches")
    data = tmp_path / "data"
    done = micropatch(
        "repo", "init", data / "repository", "--offline-dir", tmp_path / "offline",
        "--root-keys", 1, "--root-threshold", 1, "--targets-key", private, "--online-targets",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    server = Server(data).start()
    hosts: list[Host] = []
    agents: list[FleetAgent] = []
    try:
        yield {"server": server, "data": data, "key": private, "public": public,
               "root": data / "repository/public/metadata/1.root.json",
               "hosts": hosts, "agents": agents, "tmp": tmp_path}  # fmt: skip
    finally:
        for a in agents:
            a.stop()
        for h in hosts:
            h.close()
        server.stop()


def test_publish_disable_block_revoke_offline_restart(targets, tmp_path, fleet) -> None:
    server: Server = fleet["server"]
    data: Path = fleet["data"]
    admin = micropatch("server", "admin", "create-user", "ada", "--role", "admin",
                       "--data-dir", data).stdout.strip()  # fmt: skip
    api = httpx.Client(base_url=server.url, timeout=30,
                       headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
    for group in ("/a", "/b"):
        r = api.post("/api/v1/groups", json={"path": group})
        assert r.status_code == 201, r.text

    # Three hosts: web-1 and web-2 in /a, db-1 in /b; each enrolled with a one-time token.
    agents: list[FleetAgent] = fleet["agents"]
    groups = {"web-1": "/a", "web-2": "/a", "db-1": "/b"}
    per_host: dict[str, NsTarget] = {}
    for name, group in groups.items():
        host = Host(tmp_path, name)
        fleet["hosts"].append(host)
        per_host[name] = host.start(targets.vuln_pie)
        agent = FleetAgent(host, fleet["public"], fleet["root"],
                           agent_config(CHECKIN, blocked_interval=0.2)).start()  # fmt: skip
        agents.append(agent)
        token = micropatch("server", "admin", "enrollment-token", "--group", group,
                           "--data-dir", data).stdout.strip()  # fmt: skip
        done = micropatch("agent", "enroll", server.url, "--token", token,
                          "--socket", agent.socket)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"(group {group})" in done.stdout
        credential = json.loads((agent.state / "fleet.json").read_text())["credential"]
        assert credential.startswith("mph_")
        assert oct((agent.state / "fleet.json").stat().st_mode & 0o777) == "0o600"
    reused = micropatch("agent", "enroll", server.url, "--token", token,
                        "--socket", agents[0].socket)  # fmt: skip
    assert reused.returncode == 1 and "already used" in reused.stderr
    by_name = dict(zip(groups, agents, strict=True))
    hosts = {h["name"]: h for h in api.get("/api/v1/hosts").json()}
    assert set(hosts) >= set(groups)

    def carries(name: str) -> list[tuple[str, int]]:
        return [
            (p, v) for c in by_name[name].status()["processes"] for p, v in c["patches"].items()
        ]

    # Inventory reaches the server: the target's module (vuln_pie) with its build-id.
    def inventory_known() -> bool:
        return all(by_name[n].status()["fleet"]["last_checkin"] for n in groups)

    wait_for(inventory_known, 30, "a first check-in of every agent")

    # Publish: every agent downloads it through TUF and applies it within a check-in.
    artifact = signed(tmp_path, targets.vuln_pie, [GUARD], fleet["key"], id="fleet-fix")
    published = time.monotonic()
    done = micropatch("publish", artifact, "--server", server.url, "--token", admin)
    assert done.returncode == 0, done.stderr
    for name in groups:
        wait_for(lambda n=name: carries(n) == [("fleet-fix", 1)], CHECKIN + MARGIN,
                 f"{name} applies the published patch")  # fmt: skip
    took = time.monotonic() - published
    assert took <= CHECKIN + MARGIN
    assert {t.cmd("call 65") for t in per_host.values()} == {"-1"}  # blocked on every host
    assert per_host["web-1"].cmd("call 3") == "3"

    # The blocked attempts reach the server's events API.
    def blocked_on_server() -> list[dict[str, Any]]:
        return api.get("/api/v1/events", params={"kind": "blocked"}).json()

    blocked = wait_for(lambda: len({e["host_id"] for e in blocked_on_server()}) == 3
                       and blocked_on_server(), CHECKIN + MARGIN, "blocked events on the server")  # fmt: skip
    assert {e["patch_id"] for e in blocked} == {"fleet-fix"}

    # Applied state per process reaches the server too.
    web1_id = by_name["web-1"].status()["fleet"]["host_id"]

    def applied_on_server() -> list[tuple[str, int]]:
        host = api.get(f"/api/v1/hosts/{web1_id}").json()
        return [(p["patch_id"], p["version"]) for p in host["processes"]]

    wait_for(lambda: applied_on_server() == [("fleet-fix", 1)], CHECKIN + MARGIN,
             "the applied state on the server")  # fmt: skip
    assert api.get(f"/api/v1/hosts/{web1_id}").json()["modules"] >= 1

    # Disabled for /b: removed live on db-1 only.
    r = api.put("/api/v1/policies/b", json={"patches": {"fleet-fix": "disabled"}})
    assert r.status_code == 200, r.text
    wait_for(lambda: carries("db-1") == [], CHECKIN + MARGIN, "db-1 removes it")
    assert per_host["db-1"].cmd("call 65") == "-2"  # unpatched again
    time.sleep(2 * CHECKIN)
    assert carries("web-1") == carries("web-2") == [("fleet-fix", 1)]
    assert [p["state"] for p in by_name["db-1"].status()["patches"]] == ["disabled"]

    # The server goes down: the agents keep working, say so once, and recover.
    server.stop()
    # Two failed check-ins (not a sleep: a loaded machine may take longer), so that
    # "said once" below has a second failure to be silent about.
    wait_for(lambda: by_name["web-1"].status()["fleet"]["failures"] >= 2, 30,
             "web-1 fails to check in twice")  # fmt: skip
    assert by_name["web-1"].status()["ready"]
    assert per_host["web-1"].cmd("call 70") == "-1"  # still protected (and one more blocked)
    unreachable = [e for e in by_name["web-1"].events() if "unreachable" in e["message"]]
    assert len(unreachable) == 1, unreachable
    server.start()
    wait_for(lambda: by_name["web-1"].status()["fleet"]["failures"] == 0, 30,
             "web-1 checks in again")  # fmt: skip

    # web-1 restarts: nothing is sent twice, nothing is lost.
    by_name["web-1"].stop()
    by_name["web-1"].start()
    time.sleep(3 * CHECKIN)

    def server_events(host_id: int) -> list[dict[str, Any]]:
        return api.get("/api/v1/events", params={"host_id": host_id, "limit": 10_000}).json()

    wait_for(lambda: any(e["message"] == "stopping" for e in server_events(web1_id)), 30,
             "the stopping event of the first run")  # fmt: skip
    # Nothing lost: every event since the enrollment reaches the server (waited for: a
    # check-in may take seconds on a loaded machine), once.
    local = [e for e in by_name["web-1"].events()]
    enrolled_at = min(e["time"] for e in local if e["message"].startswith("enrolled with"))

    def missing() -> list[dict[str, Any]]:
        sent = {(e["kind"], e["time"]) for e in server_events(web1_id)}
        return [e for e in local if e["time"] > enrolled_at and (e["kind"], e["time"]) not in sent]

    wait_for(lambda: not missing(), CHECKIN + MARGIN, "every event of web-1 on the server")
    on_server = server_events(web1_id)
    keys = [(e["kind"], e["time"], e["pid"], e["message"]) for e in on_server]
    assert len(keys) == len(set(keys)), "an event reached the server twice"
    assert any(e["message"].startswith("enrolled with") for e in on_server)  # from the start
    assert sum(e["data"].get("count", 0) for e in on_server if e["kind"] == "blocked") == 2

    # Revoked: removed from every process, then from every store.
    r = api.post("/api/v1/patches/fleet-fix/revoke", json={})
    assert r.status_code == 200, r.text
    for name in groups:
        wait_for(lambda n=name: carries(n) == [] and by_name[n].status()["patches"] == [],
                 CHECKIN + MARGIN, f"{name} removes the revoked patch")  # fmt: skip
    assert {t.cmd("call 65") for t in per_host.values()} == {"-2"}
    assert not list((by_name["web-2"].state / "store").glob("*.mpatch"))

"""A real fleet on one machine for benchmarks/fleet_publish.py: `micropatch server run`
(SQLite, after the key ceremony) and three hosts as in tests/targets/fleet.py, each a
PID and UTS namespace with its own `micropatch agent run` and a vuln_pie target;
and what each agent's own records say about one change (`split`)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import peer_tools
from benchmarks.server_run import BenchError, Server, key_ceremony, micropatch

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from targets.fleet import (  # noqa: E402
    FleetAgent,
    Host,
    NsTarget,
    available,
    build_vuln_pie,
    signed_guard,
)

__all__ = ["HOSTS", "PATCH_ID", "Fleet", "available", "carried", "signed_guard", "split"]

HOSTS = ("web-1", "web-2", "db-1")
PATCH_ID = "fleet-bench"
READY = 120.0  # seconds for every agent to check in and be held after the setup


class Fleet:
    """The server, three hosts with an agent and a target each; `close` stops all.
    `checkin`: the server's --checkin-interval (None: its default) and `config` each
    agent's agent.toml ("": the defaults)."""

    def __init__(self, workdir: Path, checkin: int | None, config: str) -> None:
        self.workdir = workdir
        self.hosts: list[Host] = []
        self.agents: list[FleetAgent] = []
        self.targets: list[NsTarget] = []
        data = key_ceremony(workdir)
        self.key = workdir / "keys" / "patches.key"
        public = workdir / "keys" / "patches.pub"
        root = data / "repository" / "public" / "metadata" / "1.root.json"
        self.module = build_vuln_pie(workdir / "targets")
        self.admin = micropatch("server", "admin", "create-user", "bench-admin",
                                "--role", "admin", "--data-dir", data).strip()  # fmt: skip
        self.operator = micropatch("server", "admin", "create-user", "bench-operator",
                                   "--role", "operator", "--data-dir", data).strip()  # fmt: skip
        self.server = Server(data, None, **({"checkin_interval": checkin} if checkin else {}))
        try:
            self.server.start()
            for name in HOSTS:
                host = Host(workdir, name)
                self.hosts.append(host)
                self.targets.append(host.start(self.module))
                command = peer_tools.micropatch_command()
                agent = FleetAgent(host, public, root, config, command=command)
                self.agents.append(agent)
                agent.start()
                token = micropatch("server", "admin", "enrollment-token", "--data-dir", data)
                micropatch("agent", "enroll", self.server.url, "--token", token.strip(),
                           "--socket", agent.socket)  # fmt: skip
            deadline = time.monotonic() + READY
            while not all(self.fleet_status(a).get("last_checkin") for a in self.agents):
                if time.monotonic() > deadline:
                    raise BenchError("an agent never checked in")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def fleet_status(agent: FleetAgent) -> dict[str, Any]:
        return dict(agent.status().get("fleet") or {})

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.operator}"}
        r = httpx.request(method, f"{self.server.url}/api/v1{path}", timeout=60, headers=auth,
                          **kwargs)  # fmt: skip
        if r.status_code >= 400:
            raise BenchError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r

    def close(self) -> None:
        for a in self.agents:
            with contextlib.suppress(Exception):
                a.stop()
        for h in self.hosts:
            with contextlib.suppress(Exception):
                h.close()
        self.server.stop()


def carried(status: dict[str, Any], pid: int) -> int | None:
    """The version of the patch the process `pid` carries, per the agent's status."""
    for c in status.get("processes", []):
        if c.get("pid") == pid:
            v = c.get("patches", {}).get(PATCH_ID)
            return int(v) if v is not None else None
    return None


def split(
    agent: FleetAgent,
    target: NsTarget,
    version: int,
    start_wall: float,
    seconds: float,
    checkin: float | None,
) -> dict[str, Any]:
    """One agent's publish → applied, and its parts from the agent's own records:
    (a) publish → the answer that carried it (`last_checkin`), (b) answer → the
    applied/updated event, split into (b1) download and admission and (b2) live apply."""
    events = agent.events(patch_id=PATCH_ID, since=start_wall)
    applied = [e for e in events if e["kind"] in ("applied", "updated")
               and e.get("version") == version and e.get("pid") == target.pid]  # fmt: skip
    downloaded = [e for e in events if e["kind"] == "agent" and e.get("version") == version
                  and str(e.get("message", "")).startswith("downloaded ")]  # fmt: skip
    out: dict[str, Any] = {
        "seconds": seconds, "last_checkin": checkin, "checkin_wait": None,
        "answer_to_applied": None, "download": None, "live_apply": None,
        "event_kind": None, "paused_ms": None, "note": "",
    }  # fmt: skip
    if not applied:
        out["note"] = "no applied/updated event of this version for the target"
        return out
    event = applied[0]
    out["event_kind"] = event["kind"]
    out["paused_ms"] = (event.get("data") or {}).get("paused_ms")
    if checkin is None or not start_wall <= checkin <= event["time"]:
        out["note"] = f"last_checkin {checkin} not between the publish and the apply"
        return out
    out["checkin_wait"] = checkin - start_wall
    out["answer_to_applied"] = event["time"] - checkin
    if downloaded:
        out["download"] = downloaded[0]["time"] - checkin
        out["live_apply"] = event["time"] - downloaded[0]["time"]
    return out

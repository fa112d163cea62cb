"""A CPython patch through the whole fleet: `micropatch server run`, a real agent
enrolled with it in a sandboxed host, a real interpreter there that imported the
module. The inventory carries the module's source SHA-256; publish → the agent
downloads it (TUF) and applies it live; the blocked calls and the applied state
reach the server; revoke → removed from the interpreter and the store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from targets.fleet import FleetAgent, Host, NsTarget, agent_config, wait_for

from micropatch.runtimes.cpython.build import build
from micropatch.trust.keys import load_private_key

from ..agentproc import micropatch
from ..test_fleet_e2e import CHECKIN, MARGIN, fleet  # noqa: F401 (the fixture)
from .conftest import HERE, patch_toml
from .test_live import LONG

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="needs root, unshare and nsenter (PID namespaces stand for hosts)",
)
WITHIN = CHECKIN + MARGIN + 5.0  # + the agent's pass after the download


def test_a_cpython_patch_through_the_fleet(
    tmp_path: Path,
    fleet: dict[str, Any],  # noqa: F811 (the fixture imported above)
    shop: Path,
    python: str,
    clib: Path,
) -> None:
    server, data = fleet["server"], fleet["data"]
    admin = micropatch("server", "admin", "create-user", "ada", "--role", "admin",
                       "--data-dir", data).stdout.strip()  # fmt: skip
    api = httpx.Client(base_url=server.url, timeout=30,
                       headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
    host = Host(tmp_path, "py-1")
    fleet["hosts"].append(host)
    target = NsTarget([*host.enter(), python, "-u", str(HERE / "pyshop.py"), str(shop),
                       "--clib", str(clib)])  # fmt: skip
    host.targets.append(target)
    agent = FleetAgent(host, fleet["public"], fleet["root"],
                       agent_config(CHECKIN, blocked_interval=0.2)).start()  # fmt: skip
    fleet["agents"].append(agent)
    token = micropatch("server", "admin", "enrollment-token", "--data-dir", data).stdout.strip()
    done = micropatch("agent", "enroll", server.url, "--token", token, "--socket", agent.socket)
    assert done.returncode == 0, done.stderr
    host_id = json.loads((agent.state / "fleet.json").read_text())["host_id"]

    # The interpreter's module, by its source's SHA-256, is in the host's inventory.
    digest = hashlib.sha256((shop / "shop" / "parsers.py").read_bytes()).hexdigest()
    source = shop / "hdr-fix.toml"
    source.write_text(patch_toml(shop, [{
        "at": "parse_header", "when": "len(line) > limit",
        "then": "blocked; raise ValueError('header too long')",
    }]))  # fmt: skip
    built = build(source, shop / "shop" / "parsers.py", python=python)
    artifact = built.signed(load_private_key(fleet["key"])).write(tmp_path / "out")
    done = micropatch("publish", artifact, "--server", server.url, "--token", admin)
    assert done.returncode == 0, done.stderr

    def patched() -> bool:
        return "header too long" in target.cmd(f"call {LONG}")

    wait_for(patched, WITHIN, "the agent applies the published CPython patch")
    [listed] = api.get("/api/v1/patches").json()
    assert (listed["runtime"], listed["module"]["sha256"]) == ("cpython", digest)
    assert listed["hosts_relevant"] == 1  # matched by the inventory's SHA-256

    def blocked_on_server() -> list[dict[str, Any]]:
        return api.get("/api/v1/events", params={"kind": "blocked"}).json()

    blocked = wait_for(blocked_on_server, WITHIN, "blocked events on the server")
    assert {(e["patch_id"], e["host_id"]) for e in blocked} == {("hdr-fix", host_id)}

    def applied_on_server() -> list[tuple[str, int]]:
        found = api.get(f"/api/v1/hosts/{host_id}").json()["processes"]
        return [(p["patch_id"], p["version"]) for p in found]

    wait_for(lambda: applied_on_server() == [("hdr-fix", 1)], WITHIN, "the applied state")

    r = api.post("/api/v1/patches/hdr-fix/revoke", json={})
    assert r.status_code == 200, r.text
    wait_for(lambda: not patched(), WITHIN, "the agent removes the revoked patch")
    wait_for(lambda: not list((agent.state / "store").glob("*.mpatch")), WITHIN,
             "the revoked artifact dropped from the store")  # fmt: skip

"""Issue 15.6: the unit `agent install` writes keeps what the engine needs (real-time
priority for the stop window) and is ordered before the services it protects,
checked with systemd's own verifier on transactions that include it; an agent that
cannot have real-time priority says so at start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from targets.fleet import wait_for
from targets.isolation import Sandbox, children

from micropatch.agent.client import AgentClient
from micropatch.errors import ControlError

from .agentproc import NEEDS, micropatch

needs_analyze = pytest.mark.skipif(
    not shutil.which("systemd-analyze"), reason="needs systemd-analyze"
)


def installed_unit(root: Path) -> Path:
    done = micropatch("agent", "install", "--root", root)
    assert done.returncode == 0, done.stderr
    return root / "etc/systemd/system/micropatch-agent.service"


def settings(unit: Path) -> dict[str, list[str]]:
    """KEY -> every value it is given (systemd adds up repeated list settings)."""
    found: dict[str, list[str]] = defaultdict(list)
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found[key.strip()].append(value.strip())
    return found


def test_the_unit_keeps_real_time_priority(tmp_path: Path) -> None:
    unit = settings(installed_unit(tmp_path))
    capabilities = " ".join(unit["CapabilityBoundingSet"]).split()
    assert "CAP_SYS_NICE" in capabilities and "CAP_SYS_PTRACE" in capabilities
    assert unit.get("RestrictRealtime", ["no"]) == ["no"]
    assert "LimitRTPRIO" not in unit and "CPUSchedulingPolicy" not in unit


def verify(units: Path, unit: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of `unit` in `units` (the system's units after them):
    it loads the unit and builds the transaction that starts it, ordering cycles
    included."""
    return subprocess.run(
        ["systemd-analyze", "verify", str(units / unit)], capture_output=True, text=True,
        timeout=120, env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


SERVICE = """\
[Unit]
Description=a service the agent protects (default dependencies)
{extra}
[Service]
ExecStart=/bin/true

[Install]
WantedBy=multi-user.target
"""
BOOT = """\
[Unit]
Description=a boot: the targets, the agent and a protected service in one transaction
Requires=basic.target multi-user.target micropatch-agent.service protected.service

[Service]
ExecStart=/bin/true
"""


@needs_analyze
def test_the_unit_is_ordered_before_every_service_it_protects(tmp_path: Path) -> None:
    units = installed_unit(tmp_path).parent
    alone = verify(units, "micropatch-agent.service")
    assert alone.returncode == 0 and not alone.stderr.strip(), alone.stderr
    # A boot with the agent and a service: no ordering cycle, nothing to complain about.
    (units / "protected.service").write_text(SERVICE.format(extra=""))
    (units / "boot.service").write_text(BOOT)
    boot = verify(units, "boot.service")
    assert boot.returncode == 0 and not boot.stderr.strip(), boot.stderr
    # A service with the default dependencies cannot start before the agent: asking
    # for it is a cycle (it is after basic.target, which is after the agent). With the
    # agent only Before=multi-user.target (as it was), this verified cleanly.
    (units / "protected.service").write_text(
        SERVICE.format(extra="Before=micropatch-agent.service\n")
    )
    cycle = verify(units, "boot.service")
    assert cycle.returncode != 0 and "ordering cycle" in cycle.stderr, cycle.stderr
    assert "micropatch-agent.service" in cycle.stderr


@NEEDS
def test_an_agent_without_real_time_priority_says_so_at_start(tmp_path: Path, box: Sandbox) -> None:
    """Run as root but with CAP_SYS_NICE out of its bounding set (as under a unit that
    drops it) and RLIMIT_RTPRIO 0: the agent runs, and its first events say why
    stop windows may stretch. With the capability, not a word of it. In a sandbox,
    as every agent of the tests: it sees none of the host's processes."""
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv")
    (tmp_path / "trusted").mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f"new_processes = false\nfilesystems = [{json.dumps(str(box.root))}]\n")

    def run(prefix: list[str], name: str) -> list[dict[str, object]]:
        socket = tmp_path / f"{name}.sock"
        out = tmp_path / f"{name}.out"
        with open(out, "wb") as stdout:
            proc = subprocess.Popen(
                [*box.enter(), *prefix, shutil.which("micropatch") or "micropatch", "agent",
                 "run", "--state-dir", str(tmp_path / name), "--socket", str(socket), "--trust-dir", str(tmp_path / "trusted"),
                 "--config", str(config)], stdout=stdout, stderr=subprocess.PIPE,
            )  # fmt: skip
        client = AgentClient(socket, timeout=30)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the agent exited: {proc.stderr and proc.stderr.read()!r}")
            try:
                return bool(client.call("ping")["ready"])
            except ControlError:
                return False

        try:
            wait_for(ready, 60, "the agent ready")
        finally:
            for pid in children(proc.pid):  # the agent: nsenter forked it
                os.kill(pid, signal.SIGTERM)
            proc.wait(60)
        return [json.loads(line) for line in out.read_text().splitlines() if line]

    normal = run([], "normal")
    assert not [e for e in normal if "real-time" in str(e["message"])]
    dropped = run(["prlimit", "--rtprio=0", "setpriv", "--bounding-set", "-sys_nice",
                   "--inh-caps", "-sys_nice", "--"], "dropped")  # fmt: skip
    [said] = [e for e in dropped if "real-time" in str(e["message"])]
    assert said["kind"] == "agent" and "CAP_SYS_NICE" in str(said["message"])
    assert said["data"] == {"realtime": "Operation not permitted"}

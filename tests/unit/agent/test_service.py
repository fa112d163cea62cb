"""agent/service.py in-process: the Catalog NEWPROC asks, the crash hooks CRASH calls,
sd_notify. (The agent as a real process is tests/integration/test_agent.py.)"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import time

import pytest
from integration.patching import patch_source

from micropatch.agent.config import AgentConfig
from micropatch.agent.crashes import CrashTracker
from micropatch.agent.events import Event
from micropatch.agent.paths import AgentPaths
from micropatch.agent.service import Agent, sd_notify
from micropatch.build.artifact import build
from micropatch.elf.identity import identify
from micropatch.process.select import read_info
from micropatch.trust.keys import generate_key, write_key_pair

FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}


@pytest.fixture
def agent(tmp_path):
    paths = AgentPaths(tmp_path / "state", tmp_path / "agent.sock", tmp_path / "trusted")
    a = Agent(AgentConfig(), paths, stream=io.StringIO())
    yield a
    a.close()


def kinds(agent: Agent) -> list[str]:
    return [e.kind for e in agent.events.query()]


def test_crashes_count_against_the_patches_carried_and_auto_disable(agent):
    changes: list[int] = []
    agent.on_change(lambda: changes.append(agent.generation))
    agent.crash_tracker = CrashTracker(2, 600)
    me = os.getpid()
    agent.report(Event("applied", time.time(), me, "/bin/x", "fix", 1, "x"))
    assert agent.carried(me) == ("/bin/x", ["fix"])
    agent.on_exit(me, 0)  # a clean exit: no crash
    assert agent.carried(me) == (None, []) and kinds(agent) == ["applied"]
    for _ in range(2):
        agent.report(Event("applied", time.time(), me, "/bin/x", "fix", 1, "x"))
        agent.on_exit(me, signal.SIGSEGV)
    assert kinds(agent) == ["applied", "applied", "crashed", "applied", "crashed", "disabled"]
    crashed = agent.events.query()[2]
    assert crashed.data == {"signal": 11, "patches": ["fix"]} and "SIGSEGV" in crashed.message
    assert agent.state.view().auto_disabled == {("fix", "/bin/x")}
    assert agent.changed().is_set() and changes == [1]
    agent.auto_disable("fix", "/bin/x", "again")  # already: no second event
    assert kinds(agent).count("disabled") == 1


def test_catalog_wanted_watched_changed(agent, targets, tmp_path):
    key = generate_key("dev", expires_days=30)
    agent.paths.trust_dir.mkdir()
    write_key_pair(key, tmp_path / "dev")
    shutil.copy(tmp_path / "dev.pub", agent.paths.trust_dir / "dev.pub")
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX], id="fix"))
    data = build(source, targets.vuln_pie).signed(key).to_bytes()
    assert agent.add(data, "fix.mpatch")["state"] == "enabled"
    with open(targets.vuln_pie, "rb") as f:
        identity = identify(f)
    info = read_info(os.getpid())

    class ModuleFile:  # NEWPROC's shape: a file with its identity
        def __init__(self, identity):
            self.identity = identity

    assert [p.id for p in agent.wanted(info, ModuleFile(identity))] == ["fix"]
    assert [p.id for p in agent.wanted(info, identity)] == ["fix"]
    with open(targets.libvuln, "rb") as f:
        assert agent.wanted(info, identify(f)) == []  # another file
    assert [t.module for t in agent.watched()] == ["vuln_pie"]
    agent.changed().clear()
    agent.exclude("exe", info.exe, None, remove=False)
    assert agent.changed().is_set()
    assert agent.wanted(info, identity) == []
    assert [t.module for t in agent.watched()] == ["vuln_pie"]  # still enabled elsewhere
    agent.set_enabled("fix", False)
    assert agent.watched() == []
    snapshot = agent.snapshot()
    assert snapshot["patches"][0]["state"] == "disabled" and not snapshot["ready"]


def test_sd_notify(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify("READY=1")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"

"""A real agent (`micropatch agent run`, in its own sandbox) carrying a signed CPython
patch: `agent add` patches the running interpreter that imported the module, live;
blocked calls become events; disable removes it; `agent status` and the process
status show it; an interpreter without the module is never touched."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from targets.fleet import wait_for
from targets.isolation import NsTarget, Sandbox, available

from micropatch.runtimes.cpython import states
from micropatch.runtimes.cpython.build import build
from micropatch.runtimes.cpython.page import MAPS_NAME
from micropatch.trust.keys import load_private_key

from ..agentproc import AgentProcess
from .conftest import HERE, patch_toml
from .test_live import LONG

pytestmark = pytest.mark.skipif(not available(), reason="needs root, unshare and nsenter")


def _signed(shop: Path, python: str, key: Path, version: int = 1) -> Path:
    source = shop / f"hdr-fix-{version}.toml"
    then = "blocked; raise ValueError('header too long')" if version == 1 else "return ('x', '')"
    source.write_text(patch_toml(shop, [{
        "at": "parse_header", "when": "len(line) > limit", "then": then,
    }], version=version))  # fmt: skip
    built = build(source, shop / "shop" / "parsers.py", python=python)
    return built.signed(load_private_key(key)).write(shop / f"hdr-fix-v{version}.mpatch")


def _interpreter(box: Sandbox, python: str, shop: Path, clib: Path, *args: str) -> NsTarget:
    return NsTarget(box, python, "-u", str(HERE / "pyshop.py"), str(shop), "--clib", str(clib),
                    *args)  # fmt: skip


def _call(t: NsTarget, text: str) -> str:
    t.send(f"call {text}")
    return t.readline(20)


def _kinds(agent: AgentProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in agent.events() if e["kind"] == kind and e.get("patch_id") == "hdr-fix"]


def test_agent_applies_counts_and_removes_a_python_patch(
    box: Sandbox, agent: AgentProcess, keys: Path, shop: Path, python: str, clib: Path
) -> None:
    target = _interpreter(box, python, shop, clib)
    bare = _interpreter(box, python, shop, clib, "--bare")
    try:
        agent.start()
        done = agent.cli("add", _signed(shop, python, keys))
        assert done.returncode == 0, done.stdout + done.stderr
        [applied] = wait_for(lambda: _kinds(agent, "applied"), 30, "the applied event")
        assert applied["pid"] == target.ns_pid and applied["module"] == "shop.parsers"
        assert applied["data"]["runtime"] == "cpython"
        assert "header too long" in _call(target, LONG)
        [state] = states.status(target.pid)
        assert (state.patch_id, state.version, state.blocked) == ("hdr-fix", 1, 3)

        # The agent reads the counters every 0.2 s: it may read them between two of the
        # three blocked calls, and say them in two events (counts 1 and 2, say).
        def blocked_events() -> list[dict[str, Any]] | None:
            said = _kinds(agent, "blocked")
            return said if sum(e["data"]["count"] for e in said) >= 3 else None

        blocked = wait_for(blocked_events, 30, "blocked events counting 3")
        assert sum(e["data"]["count"] for e in blocked) == 3
        assert blocked[-1]["data"]["total"] == 3
        assert MAPS_NAME not in Path(f"/proc/{bare.pid}/maps").read_text()

        # `agent status`: the patch with its runtime, carriers and blocked count.
        def listed() -> dict[str, Any]:
            [p] = [p for p in agent.status()["patches"] if p["id"] == "hdr-fix"]
            return dict(p)

        wait_for(lambda: listed()["blocked"] == 3, 30, "the blocked count in the status")
        patch = listed()
        assert (patch["runtime"], patch["processes"]) == ("cpython", 1)
        assert patch["carriers"] == [target.ns_pid] and patch["module"] == "shop.parsers"
        [process] = [c for c in agent.status()["processes"] if c["pid"] == target.ns_pid]
        assert process["patches"] == {"hdr-fix": 1}
        done = agent.cli("status")
        assert done.returncode == 0 and "hdr-fix" in done.stdout, done.stdout + done.stderr

        done = agent.cli("disable", "hdr-fix")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: _kinds(agent, "removed"), 30, "the removed event")
        assert states.status(target.pid) == []
        assert "header too long" not in _call(target, LONG)

        # Enabled again, then `agent update` to version 2: updated in place.
        assert agent.cli("enable", "hdr-fix").returncode == 0
        wait_for(lambda: len(_kinds(agent, "applied")) == 2, 30, "applied again")
        done = agent.cli("update", _signed(shop, python, keys, version=2))
        assert done.returncode == 0, done.stdout + done.stderr
        [updated] = wait_for(lambda: _kinds(agent, "updated"), 30, "the updated event")
        assert updated["version"] == 2 and "('x', '')" in _call(target, LONG)
    finally:
        target.close()
        bare.close()


def test_a_crash_of_a_patched_interpreter_counts_against_the_patch(
    keys: Path, shop: Path, python: str, clib: Path, tmp_path: Path
) -> None:
    # In the host's PID namespace (its own mount namespace and tmpfs): the kernel serves
    # the proc connector's exit events only there (as tests/integration/test_agent_crashes).
    # The agent sees every interpreter of the host there: `shop`'s source is this
    # test's own (its SHA-256), so it patches none of other test sessions on the machine.
    box = Sandbox(tmp_path / "host", pid=False)
    agent = AgentProcess(box, tmp_path, tmp_path / "agent.sock",
                         "blocked_interval = 0.2\ncrash_limit = 1\n")  # fmt: skip
    target = _interpreter(box, python, shop, clib)
    try:
        agent.start()
        assert agent.cli("add", _signed(shop, python, keys)).returncode == 0
        try:
            [applied] = wait_for(lambda: _kinds(agent, "applied"), 30, "the applied event")
        except AssertionError as e:
            raise AssertionError(f"{e}; events: {agent.events()}; {agent.stderr()}") from None
        assert applied["pid"] == target.pid
        os.kill(target.pid, signal.SIGSEGV)
        [crashed] = wait_for(lambda: _kinds(agent, "crashed"), 30, "the crashed event")
        assert crashed["pid"] == target.ns_pid and crashed["data"]["patches"] == ["hdr-fix"]
        [disabled] = wait_for(lambda: _kinds(agent, "disabled"), 30, "auto-disable")
        assert disabled["data"]["auto"] is True and disabled["exe"] == crashed["exe"]
    finally:
        target.close()
        agent.kill()
        box.close()

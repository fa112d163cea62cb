"""`micropatch apply|remove|update|status` of a CPython patch through a real agent (in
its sandbox), as for native patches (tests/integration/test_agent_cli.py): admitted
by the agent, an operator's event, a pin that the agent's next pass keeps, shown by
`agent status` and `status`; MICROPATCH_NO_AGENT=1 runs directly. And an interpreter
in a PID namespace of its own (a container's) patched from outside it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from targets.fleet import wait_for
from targets.isolation import NsTarget, Sandbox, available

from micropatch.runtimes.cpython import engine, states

from ..agentproc import AgentProcess, micropatch
from .conftest import make_py_patch
from .test_agent_python import _call, _interpreter, _kinds, _signed
from .test_live import BLOCKED_LONG, LONG, ORIGINAL_LONG

pytestmark = pytest.mark.skipif(not available(), reason="needs root, unshare and nsenter")


def _carried(pid: int) -> list[tuple[str, int]]:
    return [(s.patch_id, s.version) for s in states.status(pid)]


def _pass(agent: AgentProcess) -> None:
    """Wait for a whole pass of the agent begun after this call: the second pass to
    end after the first rescan (a pass under way at the rescan ends first, then the
    one the rescan woke, which a second rescan while it runs keeps from being the
    last)."""
    before = agent.status()["passes"]
    agent.client.call("rescan")
    wait_for(lambda: agent.status()["passes"] >= before + 1, 60, "a pass after the rescan")
    agent.client.call("rescan")
    wait_for(lambda: agent.status()["passes"] >= before + 2, 60, "a second pass")


def _carriers(agent: AgentProcess) -> list[int]:
    [patch] = [p for p in agent.status()["patches"] if p["id"] == "hdr-fix"]
    return list(patch["carriers"])


def test_cli_apply_remove_update_status_of_a_python_patch_go_through_the_agent(
    box: Sandbox, agent: AgentProcess, keys: Path, shop: Path, python: str, clib: Path
) -> None:
    first = _interpreter(box, python, shop, clib)
    second = _interpreter(box, python, shop, clib, "--main", "sleep")
    env = {"MICROPATCH_AGENT_SOCKET": str(agent.socket)}
    artifact = _signed(shop, python, keys)
    try:
        agent.start()
        # apply --pid: admitted and run by the agent, in force when it returns.
        done = micropatch("apply", artifact, "--pid", first.ns_pid, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(by the agent)" in done.stdout and "(through the agent)" in done.stdout
        assert "header too long" in _call(first, LONG)
        assert _carried(first.pid) == [("hdr-fix", 1)] and _carried(second.pid) == []
        [event] = _kinds(agent, "applied")
        assert (event["pid"], event["module"]) == (first.ns_pid, "shop.parsers")
        assert event["data"]["when"] == "operator" and event["data"]["runtime"] == "cpython"
        # `agent status`: applied by hand, not in the store: listed as such, from the page.
        [manual] = agent.status()["manual"]
        assert (manual["id"], manual["pid"], manual["module"]) == (
            "hdr-fix",
            first.ns_pid,
            "shop.parsers",
        )
        # `status` through the agent reads the interpreter's page (agent's pids).
        shown = micropatch("status", "--pid", first.ns_pid, env=env)
        assert shown.returncode == 0, shown.stderr
        [row] = shown.stdout.splitlines()[1:]
        assert row.split("\t")[2:5] == ["shop.parsers (cpython)", "hdr-fix", "1"], row

        # The same patch in the store, disabled: the pin keeps it on `first`; the pass
        # does not put it on `second`; `agent status` shows its carrier.
        done = agent.cli("add", "--disabled", artifact)
        assert done.returncode == 0, done.stdout + done.stderr
        _pass(agent)
        assert _carried(first.pid) == [("hdr-fix", 1)] and _carried(second.pid) == []
        assert _carriers(agent) == [first.ns_pid]

        # Enabled: the pass patches `second`; a manual remove of `first` is pinned.
        assert agent.cli("enable", "hdr-fix").returncode == 0
        wait_for(lambda: _carried(second.pid) == [("hdr-fix", 1)], 30, "the pass on second")
        done = micropatch("remove", "hdr-fix", "--pid", first.ns_pid, env=env)
        assert done.returncode == 0 and "removed hdr-fix" in done.stdout, done.stderr
        assert "(through the agent)" in done.stdout
        assert "header too long" not in _call(first, LONG)
        [removed] = _kinds(agent, "removed")
        assert removed["data"]["when"] == "operator" and removed["module"] == "shop.parsers"
        wait_for(lambda: _carriers(agent) == [second.ns_pid], 30, "agent status after remove")
        _pass(agent)
        assert _carried(first.pid) == [] and _carried(second.pid) == [("hdr-fix", 1)]

        # update --all through the agent: the carriers of an older version, found there
        # (`first` has a page without the patch: skipped).
        v2 = _signed(shop, python, keys, version=2)
        done = micropatch("update", v2, "--all", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(through the agent)" in done.stdout
        assert "update: 1 done, 0 failed, 1 skipped, 0 gone" in done.stdout, done.stdout
        assert _carried(second.pid) == [("hdr-fix", 2)] and _carried(first.pid) == []
        [updated] = _kinds(agent, "updated")
        assert updated["data"]["when"] == "operator" and updated["version"] == 2

        # Errors come back as the engine's: not applied, exit status 1.
        again = micropatch("remove", "hdr-fix", "--pid", first.ns_pid, env=env)
        assert again.returncode == 1 and "not applied" in again.stderr, again.stderr

        # MICROPATCH_NO_AGENT=1: directly (host pids), no event, no pin.
        done = micropatch("apply", artifact, "--pid", first.pid,
                          env={**env, "MICROPATCH_NO_AGENT": "1",
                               "MICROPATCH_TRUST_DIR": str(agent.trust)})  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(through the agent)" not in done.stdout
        assert _carried(first.pid) == [("hdr-fix", 1)]
        operator = [e for e in _kinds(agent, "applied") if e["data"]["when"] == "operator"]
        assert len(operator) == 1

        # --timeout reaches the agent's engine: a C call holding the GIL longer is refused
        # after it (the message names it; the default, 5 s, would say 5 s).
        first.send("hold 8")
        assert first.readline(20) == "holding"
        held = micropatch("remove", "hdr-fix", "--pid", first.ns_pid, "--timeout", "0.5", env=env)
        assert held.returncode == 1 and "within 0.5 s" in held.stderr, held.stderr
        assert first.readline(20) == "released"
        assert _carried(first.pid) == [("hdr-fix", 1)]
    finally:
        first.close()
        second.close()


def _ask_by_signal(t: NsTarget, shop: Path, text: str) -> list[str]:
    """`call` for an interpreter whose main thread does not read stdin (--main busy)."""
    (shop / "ask").write_text(text)
    os.kill(t.pid, signal.SIGUSR1)
    result: list[str] = json.loads(t.readline(20))
    return result


def test_an_interpreter_in_a_pid_namespace_of_its_own_is_patched_from_outside(
    box: Sandbox, shop: Path, python: str, clib: Path
) -> None:
    """A container's interpreter, from the host: CPython records its threads' ids as
    its own PID namespace numbers them; the engine maps them to the host's (they
    were refused as "no thread state names a thread of the process")."""
    stdin = _interpreter(box, python, shop, clib)
    busy = _interpreter(box, python, shop, clib, "--main", "busy", "--workers", "sleep:1")
    alone = _interpreter(box, python, shop, clib, "--main", "busy")
    patch = make_py_patch(shop, python)
    try:
        assert stdin.pid != stdin.ns_pid
        outcome = engine.apply(patch, stdin.pid)  # its main thread, parked in read()
        assert f"thread {stdin.pid} " in outcome.entered, outcome.entered
        assert "header too long" in _call(stdin, LONG)
        outcome = engine.apply(patch, busy.pid)  # the worker, parked in clock_nanosleep
        worker = max(int(t) for t in os.listdir(f"/proc/{busy.pid}/task"))
        assert f"thread {worker} " in outcome.entered, outcome.entered
        assert _ask_by_signal(busy, shop, LONG) == BLOCKED_LONG
        outcome = engine.apply(patch, alone.pid)  # the main thread, at a pending call
        assert "pending call" in outcome.entered, outcome.entered
        assert _ask_by_signal(alone, shop, LONG) == BLOCKED_LONG
        for t in (stdin, busy, alone):
            engine.remove("hdr-fix", t.pid)
        assert "header too long" not in _call(stdin, LONG)
        assert _ask_by_signal(alone, shop, LONG) == ORIGINAL_LONG
    finally:
        for t in (stdin, busy, alone):
            t.close()

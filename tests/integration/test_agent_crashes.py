"""Issue 15.5: crashes of workers forked from a patched master (nginx style) count
toward that executable's crash auto-disable, and every `crashed` event names the
patch it may implicate.

The agent runs in a sandbox in the host's PID namespace (its own mount namespace
and tmpfs: the kernel serves the proc connector only to a listener in the initial
PID namespace), with `new_processes = false` and a rescan an hour away: only the
fork events can tell it what the children carry. The target is the session's own
build of forker."""

from __future__ import annotations

import signal
from pathlib import Path

from targets.fleet import wait_for
from targets.isolation import NsTarget, Sandbox

from .agentproc import NEEDS, AgentProcess, applied, kinds, signed
from .test_agent_safety import FAULTY

pytestmark = NEEDS

CONFIG = "crash_limit = 2\nnew_processes = false\nrescan_interval = 3600\nblocked_interval = 0.2\n"


def test_crashes_of_forked_children_auto_disable_the_patch_for_the_executable(
    targets, tmp_path: Path, keys: Path
) -> None:
    box = Sandbox(tmp_path / "host", pid=False)
    master = NsTarget(box, targets.path("forker"))
    agent = AgentProcess(box, tmp_path, tmp_path / "agent.sock", CONFIG).start()
    try:
        done = agent.cli("add", signed(tmp_path, targets.forker, [FAULTY], keys))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: applied(master.pid) == [("agent-fix", 1)], what="the master patched")
        assert master.cmd("fork 3") == "child 3"  # a patched child that works: no crash
        # Children that exec another program (which crashes) took no patch with them.
        for _ in range(2):
            assert master.cmd("forkexec") == f"child failed signal {int(signal.SIGSEGV)}"
        # Two workers forked after the patch run its faulty path and die of SIGILL.
        for _ in range(2):
            assert master.cmd("fork 1000") == f"child failed signal {int(signal.SIGILL)}"
        try:
            [disabled] = wait_for(lambda: kinds(agent.events(), "disabled"), what="auto-disable")
        except AssertionError as e:
            raise AssertionError(f"{e}; events: {agent.events()}") from None
        crashed = kinds(agent.events(), "crashed")
        assert len(crashed) == 2 and master.pid not in {e["pid"] for e in crashed}, crashed
        for event in crashed:
            assert (event["patch_id"], event["version"], event["module"]) == (
                "agent-fix", 1, "forker")  # fmt: skip
            assert event["exe"] == str(targets.forker)
            assert event["data"] == {"signal": int(signal.SIGILL), "patches": ["agent-fix"],
                                     "parent": master.pid}  # fmt: skip
            assert f"forked from pid {master.pid}" in event["message"]
        assert (disabled["patch_id"], disabled["exe"]) == ("agent-fix", str(targets.forker))
        assert disabled["data"]["auto"] is True
        # Live: the master loses the patch; its next worker runs the original code.
        wait_for(lambda: applied(master.pid) == [], what="removed from the master")
        assert master.cmd("fork 1000") == "child -2"
        [patch] = agent.status()["patches"]
        assert [d["exe"] for d in patch["auto_disabled"]] == [str(targets.forker)]
    finally:
        agent.kill()
        master.close()
        box.close()

"""A frozen agent does not freeze the processes it patches (issue 20 item 2).

The agent stops itself (SIGSTOP, for real: `faults.environment(point, "stop")`)
inside the stop in which it applies a patch. Its stop watchdog must SIGKILL it
within the stop timeout plus `stop_limit`; the target's threads run again at once;
restarted (as systemd would), the agent reports a `watchdog` event naming what was
held and its first pass repairs the target, which ends patched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from targets.isolation import children

from micropatch import faults
from micropatch.process.world import STOP_TIMEOUT

from .agentproc import FIX, NEEDS, AgentProcess, applied, kinds, signed

pytestmark = NEEDS

LIMIT = 0.5
SLACK = 2.0  # a loaded machine: the supervisor's wake-up, the kill, our own polling


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _traced_stopped(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "t":
            return True
    return False


@pytest.mark.parametrize("point", ["stopped", "intent-recorded", "jump-0-written"])
def test_a_frozen_agent_is_killed_and_its_successor_repairs(
    targets, nstart, box, tmp_path, keys, monkeypatch, point
):
    t = nstart("vuln_pie")
    agent = AgentProcess(box, tmp_path, tmp_path / "agent.sock",
                         config=f"blocked_interval = 0.2\nstop_limit = {LIMIT}\n")  # fmt: skip
    try:
        for name, value in faults.environment(point, action="stop").items():
            monkeypatch.setenv(name, value)  # the agent stops itself at `point`
        agent.start()
        monkeypatch.undo()  # the commands below and the successor run unarmed
        artifact = signed(tmp_path, targets.vuln_pie, [FIX], keys)
        add = subprocess.Popen(["micropatch", "agent", "add", str(artifact),
                                "--socket", str(agent.socket)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert agent.proc is not None
        [patcher] = children(agent.proc.pid)  # the agent, forked by nsenter
        deadline = time.monotonic() + 60
        while _state(patcher) != "T":  # frozen at `point`
            assert time.monotonic() < deadline, ("the agent never froze", agent.stderr())
            time.sleep(0.001)
        frozen = time.monotonic()
        assert _traced_stopped(t.pid), "the agent froze outside a stop"
        bound = frozen + STOP_TIMEOUT + LIMIT + SLACK
        while _traced_stopped(t.pid):
            assert time.monotonic() < bound, "the target is still held: the watchdog did not act"
            time.sleep(0.002)
        held = time.monotonic() - frozen
        while _state(patcher) not in ("gone", "Z"):  # killed: its tracees went first
            assert time.monotonic() < bound + 5, "the frozen agent is not dead"
            time.sleep(0.002)
        # nsenter stopped itself when the agent did (util-linux passes a child's stop
        # on): continued, it sees the agent's death and exits.
        os.kill(agent.proc.pid, signal.SIGCONT)
        assert agent.proc.wait(timeout=30) != 0
        _, add_err = add.communicate(timeout=60)
        assert add.returncode == 0, add_err
        err = agent.stderr()
        assert "micropatch: watchdog: the stop of process" in err and "killed the patcher" in err
        assert t.cmd("call 65") in ("-1", "-2")  # it runs: patched or not, never half
        agent.start()  # what systemd does (Restart=on-failure)
        assert applied(t.pid) == [("agent-fix", 1)] and t.cmd("call 65") == "-1"
        [event] = kinds(agent.events(), "watchdog")
        assert event["pid"] == t.ns_pid and "killed by its stop watchdog" in event["message"]
        assert event["data"]["limit"] == STOP_TIMEOUT + LIMIT
        assert held <= event["data"]["held"] + 0.5, (held, event)
        assert not (agent.state / "watchdog.json").exists()
    finally:
        agent.kill()

"""Issue 15.8, operator ergonomics, with a real agent in a sandbox
(tests/integration/agentproc.py) and real targets started there:

- `agent add|update|enable|disable --wait` return once every matching running
  process carries the patch (or none does) and say how many; a process that cannot
  be patched makes `--wait` fail after `--timeout`, naming it and why;
- a write verb refused by the socket's peer check prints the permission message,
  not "Broken pipe";
- an `events --follow` client that hangs up leaves no traceback in the agent's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from targets.fleet import wait_for

from .agentproc import FIX, FIX_V2, NEEDS, AgentProcess, applied, signed

pytestmark = NEEDS
CONFIG = "new_processes = false\nrescan_interval = 3600\nblocked_interval = 0.2\n"


@pytest.fixture
def agent(box, tmp_path: Path, keys: Path):
    a = AgentProcess(box, tmp_path, tmp_path / "agent.sock", CONFIG)
    yield a
    a.kill()


def test_wait_returns_when_every_matching_process_is_done(targets, nstart, tmp_path, keys, agent):
    ts = [nstart("vuln_pie") for _ in range(3)]
    agent.start()
    done = agent.cli("add", "--wait", signed(tmp_path, targets.vuln_pie, [FIX], keys))
    assert done.returncode == 0, done.stderr
    assert "carried by 3 running processes" in done.stdout, done.stdout
    assert [applied(t.pid) for t in ts] == [[("agent-fix", 1)]] * 3  # already, no polling
    v2 = signed(tmp_path, targets.vuln_pie, [FIX_V2], keys, version=2)
    done = agent.cli("update", "--wait", v2)
    assert done.returncode == 0, done.stderr
    assert "agent-fix v2 carried by 3 running processes" in done.stdout, done.stdout
    assert [applied(t.pid) for t in ts] == [[("agent-fix", 2)]] * 3
    again = agent.cli("update", v2)
    assert again.returncode == 1 and "an update needs a newer version" in again.stderr
    unknown = agent.cli("update", signed(tmp_path, targets.vuln_pie, [FIX], keys, id="other"))
    assert unknown.returncode == 1 and "no patch other in the agent's store" in unknown.stderr
    assert agent.status()["patches"][0]["id"] == "agent-fix"  # nothing added by a refusal
    done = agent.cli("disable", "--wait", "agent-fix")
    assert done.returncode == 0 and "agent-fix carried by none" in done.stdout, done.stdout
    assert [applied(t.pid) for t in ts] == [[]] * 3
    done = agent.cli("enable", "--wait", "--timeout", "30", "agent-fix")
    assert done.returncode == 0 and "carried by 3 running processes" in done.stdout
    assert [applied(t.pid) for t in ts] == [[("agent-fix", 2)]] * 3


def test_wait_names_what_cannot_be_done(targets, nstart, tmp_path, keys, agent):
    """A seccomp filter that denies mmap: the patch can never be applied there."""
    denied = nstart("seccomp")
    agent.start()
    artifact = signed(tmp_path, targets.seccomp, [FIX], keys, id="sec-fix")
    # The timeout must outlast one pass over every process on the host, which on a loaded
    # shared machine took over 3 s ("no pass over the running processes ended").
    done = agent.cli("add", "--wait", "--timeout", "10", artifact)
    assert done.returncode == 1, done.stdout
    assert "added sec-fix v1 (enabled)" in done.stdout  # the add itself happened
    message = " ".join(done.stderr.split())
    assert "sec-fix v1: not settled within 10 s: 0 of 1 matching processes carry it" in message
    assert f"pid {denied.ns_pid} ({targets.seccomp}) to apply:" in message and "seccomp" in message
    assert applied(denied.pid) == []


def _same_python() -> bool:
    if not Path("/usr/bin/python3").exists():
        return False
    done = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip() == str(sys.version_info[:2])


@pytest.mark.skipif(not _same_python(), reason="needs a system python3 of this version")
def test_a_write_refused_by_the_peer_check_says_so(box, tmp_path, keys):
    """A uid the agent does not accept, reaching its socket anyway (a socket bind-mounted
    into a container, say): refused before its request is read; a large one (an
    artifact) used to end in "Broken pipe"."""
    run_dir = Path(tempfile.mkdtemp(prefix="mp-agent-", dir="/tmp"))
    run_dir.chmod(0o711)
    big = run_dir / "big.mpatch"
    big.write_bytes(os.urandom(3 << 20))  # far more than a socket buffer
    big.chmod(0o644)
    a = AgentProcess(box, tmp_path, run_dir / "a.sock", CONFIG)
    try:
        a.start()
        (run_dir / "a.sock").chmod(0o666)
        src = Path(__file__).resolve().parents[2] / "src"
        site = next(p for p in sys.path if p.endswith("site-packages"))
        done = subprocess.run(
            ["/usr/bin/python3", "-c", "from micropatch.cli.entry import main; main()",
             "agent", "add", str(big), "--socket", str(run_dir / "a.sock")],
            capture_output=True, text=True, user=1, group=1, extra_groups=[], cwd="/",
            env={"PYTHONPATH": f"{src}:{site}", "COLUMNS": "250"}, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1, done.stdout
        assert "Broken pipe" not in done.stderr
        assert "permission denied: uid 1 " in done.stderr and "may not use the micropatch agent" in done.stderr  # fmt: skip
    finally:
        a.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_follower_hanging_up_leaves_no_traceback(tmp_path, keys, agent):
    agent.start()
    follower = subprocess.Popen(
        ["micropatch", "agent", "events", "--follow", "--json", "--limit", "1",
         "--socket", agent.socket], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert follower.stdout is not None
    assert '"kind": "agent"' in follower.stdout.readline()  # following: the history came
    follower.send_signal(signal.SIGKILL)
    follower.wait()
    # Events to send it (and the keepalive each second): the agent finds it gone.
    for uid in ("12345", "12346"):
        assert agent.cli("exclude", "--user", uid).returncode == 0
    wait_for(lambda: agent.events()[-1]["message"].endswith("--user 12346"))
    import time

    time.sleep(2.5)  # two keepalives
    assert agent.client.call("ping")["ready"]
    assert "Traceback" not in agent.stderr() and "Broken pipe" not in agent.stderr(), agent.stderr()

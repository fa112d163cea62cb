"""The agent's control socket and the CLI through it, as real processes: who may use
which verb, `micropatch apply|remove|status|update` sent to the agent, one agent per
socket, and the systemd unit `agent install` writes. Each agent runs in a sandbox
(tests/integration/agentproc.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from targets.fleet import wait_for

from .agentproc import FIX, FIX_V2, NEEDS, AgentProcess, applied, kinds, micropatch, signed

pytestmark = NEEDS


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs a system python3")
def test_socket_refuses_non_root_and_allows_the_read_only_group_read_verbs(box, tmp_path, keys):
    """uid 65534 cannot reach the socket (0600); with read_only_group it can read, not write.

    The client runs as nobody from a copy of the package in a directory nobody can
    read: the checkout may be anywhere, inside a 0700 directory too."""
    run_dir = Path(tempfile.mkdtemp(prefix="mp-agent-", dir="/tmp"))
    run_dir.chmod(0o711)
    lib = run_dir / "lib"
    package = Path(__import__("micropatch").__file__).resolve().parent
    shutil.copytree(package, lib / "micropatch", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    src = str(lib)
    script = (
        "import sys\nfrom micropatch.agent.client import AgentClient\n"
        "try:\n    AgentClient(sys.argv[1]).call(sys.argv[2])\n    print('ok')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )

    def as_nobody(socket: Path, op: str) -> str:
        done = subprocess.run(
            ["/usr/bin/python3", "-c", script, str(socket), op], capture_output=True, text=True,
            user=65534, group=65534, extra_groups=[], env={"PYTHONPATH": src}, timeout=60,
        )  # fmt: skip
        return done.stdout.strip() + done.stderr

    try:
        root_only = AgentProcess(box, tmp_path, run_dir / "a.sock").start()
        try:
            assert oct((run_dir / "a.sock").stat().st_mode & 0o777) == "0o600"
            answer = as_nobody(run_dir / "a.sock", "status")
            assert answer.startswith("ControlError permission denied"), answer
            assert root_only.client.call("status")["ready"]
        finally:
            root_only.stop()
        grouped = AgentProcess(
            box,
            tmp_path,
            run_dir / "b.sock",
            'read_only_group = "nogroup"\nblocked_interval = 0.2\n',
        ).start()
        try:
            st = (run_dir / "b.sock").stat()
            assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o660", 65534)
            assert as_nobody(run_dir / "b.sock", "status") == "ok"
            assert as_nobody(run_dir / "b.sock", "events") == "ok"
            answer = as_nobody(run_dir / "b.sock", "rescan")
            assert answer.startswith("ControlError permission denied: `rescan` changes"), answer
        finally:
            grouped.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_cli_apply_remove_status_go_through_the_agent(targets, nstart, tmp_path, keys, agent):
    t = nstart("vuln_pie")
    agent.start()
    env = {"MICROPATCH_AGENT_SOCKET": str(agent.socket)}
    artifact = signed(tmp_path, targets.vuln_pie, [FIX], keys)
    done = micropatch("apply", artifact, "--pid", t.ns_pid, env=env)  # the agent's pid
    assert done.returncode == 0, done.stderr
    assert "(by the agent)" in done.stdout and "(through the agent)" in done.stdout
    assert t.cmd("call 65") == "-1"
    shown = micropatch("status", "--pid", t.ns_pid, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1].split("\t")[3:5] == ["agent-fix", "1"]
    [event] = kinds(agent.events(), "applied", t.ns_pid)
    assert event["data"]["when"] == "operator"
    # `status` through the agent imports no engine, ELF reader, assembler or crypto.
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", shutil.which("micropatch"), "status", "--pid", str(t.ns_pid)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert timed.returncode == 0, timed.stderr
    heavy = [m for m in ("pydantic", "elftools", "iced_x86", "keystone", "cryptography")
             if f" {m}" in timed.stderr]  # fmt: skip
    assert heavy == [], heavy
    # The same patch added to the store: t is not patched twice, another process is.
    other = nstart("vuln_pie")
    assert agent.cli("add", artifact).returncode == 0
    wait_for(lambda: applied(other.pid) == [("agent-fix", 1)], what="the store patch applied")
    assert applied(t.pid) == [("agent-fix", 1)]
    # A manual remove is pinned: the agent's next pass does not put it back.
    done = micropatch("remove", "agent-fix", "--pid", t.ns_pid, env=env)
    assert done.returncode == 0 and "removed agent-fix" in done.stdout, done.stderr
    agent.client.call("rescan")
    third = nstart("vuln_pie")
    agent.client.call("rescan")
    wait_for(lambda: applied(third.pid) == [("agent-fix", 1)], what="a later pass")
    assert applied(t.pid) == [] and applied(other.pid) == [("agent-fix", 1)]
    # --all through the agent: the carriers of an older version, found by the agent.
    v2 = signed(tmp_path, targets.vuln_pie, [FIX_V2], keys, version=2)
    done = micropatch("update", v2, "--all", "--exe", f"{targets.vuln_pie.parent}/*", env=env)
    assert done.returncode == 0, done.stderr
    assert "update: 2 done, 0 failed, 0 skipped, 0 gone" in done.stdout
    assert applied(other.pid) == applied(third.pid) == [("agent-fix", 2)]
    # Errors come back as the engine's, with the exit status of a direct run.
    again = micropatch("remove", "agent-fix", "--pid", t.ns_pid, env=env)
    assert again.returncode == 1 and "is not applied to process" in again.stderr


def test_agent_status_lists_a_patch_applied_through_it_that_its_store_lacks(
    targets, nstart, tmp_path, keys, agent
):
    t = nstart("vuln_pie")
    agent.start()
    env = {"MICROPATCH_AGENT_SOCKET": str(agent.socket)}
    artifact = signed(tmp_path, targets.vuln_pie, [FIX], keys)
    done = micropatch("apply", artifact, "--pid", t.ns_pid, env=env)
    assert done.returncode == 0 and "(through the agent)" in done.stdout, done.stderr
    [manual] = agent.status()["manual"]
    assert manual["id"] == "agent-fix" and manual["version"] == 1 and manual["pid"] == t.ns_pid
    assert manual["module"] == targets.vuln_pie.name
    shown = agent.cli("status")  # piped: tab-separated rows, notes after '#'
    assert shown.returncode == 0, shown.stderr
    rows = [line.split("\t") for line in shown.stdout.splitlines() if not line.startswith("#")]
    assert rows[1][:5] == ["agent-fix", "1", "manual", targets.vuln_pie.name, "1"], shown.stdout
    assert f"# manual: agent-fix v1 in pid {t.ns_pid} (" in shown.stdout
    assert "`micropatch agent add ARTIFACT`" in shown.stdout
    # A pass of the agent keeps it listed (read back from the process).
    agent.client.call("rescan")
    wait_for(lambda: agent.status()["passes"] >= 2, what="a second pass")
    assert [m["pid"] for m in agent.status()["manual"]] == [t.ns_pid]
    # Added to the store, it is the store's; the operator's pin shows, and keeps it in
    # the process when the patch is disabled.
    assert agent.cli("add", artifact, "--wait").returncode == 0
    [stored] = agent.status()["patches"]
    assert agent.status()["manual"] == [] and stored["pins"] == [{"pid": t.ns_pid, "wanted": True}]
    assert agent.cli("disable", "agent-fix").returncode == 0
    shown = agent.cli("status").stdout
    assert "\tdisabled\t" in shown and "\tmanual\t" not in shown, shown
    assert f"# pinned: agent-fix kept in pid {t.ns_pid} by `micropatch apply`" in shown
    assert applied(t.pid) == [("agent-fix", 1)]
    assert micropatch("remove", "agent-fix", "--pid", t.ns_pid, env=env).returncode == 0
    shown = agent.cli("status").stdout
    assert f"# pinned: agent-fix kept off pid {t.ns_pid} by `micropatch remove`" in shown


def test_a_second_agent_on_the_same_socket_refuses_to_start(box, tmp_path, agent):
    agent.start()
    second = box.run("micropatch", "agent", "run", "--state-dir", tmp_path / "other", "--socket",
                     agent.socket, "--trust-dir", agent.trust, "--config", agent.config,
                     timeout=120)  # fmt: skip
    assert second.returncode == 1 and "another agent already answers" in second.stderr
    assert agent.client.call("ping")["ready"]  # the first one is untouched


def test_install_writes_a_unit_systemd_accepts(tmp_path):
    done = micropatch("agent", "install", "--root", tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"written under {tmp_path}: this host's systemd is left as it was" in done.stdout
    unit = tmp_path / "etc/systemd/system/micropatch-agent.service"
    text = unit.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    command = exec_start.removeprefix("ExecStart=").split()
    assert Path(command[0]).is_absolute() and command[1:3] == ["agent", "run"]
    assert "CAP_SYS_PTRACE" in text and "CAP_SYS_ADMIN" in text
    config = tmp_path / "etc/micropatch/agent.toml"
    assert 'default_state = "enabled"' in config.read_text()
    assert (tmp_path / "var/lib/micropatch").is_dir() and (
        tmp_path / "etc/micropatch/trusted"
    ).is_dir()
    config.write_text('default_state = "disabled"\n')
    assert micropatch("agent", "install", "--root", tmp_path).returncode == 0
    assert config.read_text() == 'default_state = "disabled"\n'  # never overwritten
    if shutil.which("systemd-analyze"):
        verified = subprocess.run(["systemd-analyze", "verify", str(unit)],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
        problems = [line for line in verified.stderr.splitlines() if "micropatch-agent" in line]
        assert not problems, verified.stderr
    removed = micropatch("agent", "uninstall", "--root", tmp_path)
    assert removed.returncode == 0 and not unit.exists() and config.exists()

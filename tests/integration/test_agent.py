"""Issue 8: the host agent, as a real process (`micropatch agent run`) with a temporary
state directory, socket and trust directory, patching real targets.

The patch targets the session's own build of vuln_pie (its build-id is this
session's), so the agent touches no process of another test run on this host."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from targets.fleet import wait_for

from micropatch import live
from micropatch.agent.client import AgentClient
from micropatch.build.artifact import build as build_artifact
from micropatch.errors import ControlError, UnknownPatch
from micropatch.trust.keys import generate_key, load_private_key, write_key_pair

from .patching import assert_untouched, patch_source

# copy_packet: `call 65` answers -2 ("would have overflowed"); v1 makes it -1, v2 64.
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
FIX_V2 = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, 64\nok:"}
GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}


def micropatch(*args: object, env: dict[str, str] | None = None, **kw: Any):
    done = subprocess.run(
        ["micropatch", *map(str, args)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "250", **(env or {})}, **kw,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


class AgentProcess:
    """`micropatch agent run` in the background, its events (stdout) in a file."""

    def __init__(self, root: Path, socket: Path, config: str = "") -> None:
        self.root = root
        self.state = root / "state"
        self.socket = socket
        self.trust = root / "trusted"
        self.config = root / "agent.toml"
        self.config.write_text(config or "blocked_interval = 0.2\n")
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = AgentClient(socket, timeout=60)

    def start(self) -> AgentProcess:
        self.runs += 1
        self.stdout = self.root / f"agent-{self.runs}.out"
        with open(self.stdout, "wb") as out, open(self.root / f"agent-{self.runs}.err", "wb") as e:
            self.proc = subprocess.Popen(
                ["micropatch", "agent", "run", "--state-dir", self.state, "--socket", self.socket,
                 "--trust-dir", self.trust, "--config", self.config],
                stdout=out, stderr=e,
            )  # fmt: skip
        wait_for(self._ready, 60, "the agent to be ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited: {self.stderr()}")
        try:
            return bool(self.client.call("ping")["ready"])
        except ControlError:
            return False

    def stderr(self) -> str:
        return (self.root / f"agent-{self.runs}.err").read_text()

    def events(self) -> list[dict[str, Any]]:
        """The JSON lines this run wrote on stdout."""
        return [json.loads(line) for line in self.stdout.read_text().splitlines() if line]

    def status(self) -> dict[str, Any]:
        return dict(self.client.call("status"))

    def cli(self, *args: object) -> subprocess.CompletedProcess[str]:
        return micropatch("agent", *args, "--socket", self.socket)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """tmp_path/keys/dev.key (and .pub); the agent trusts dev.pub."""
    (tmp_path / "keys").mkdir()
    write_key_pair(generate_key("dev", expires_days=30), tmp_path / "keys" / "dev")
    (tmp_path / "trusted").mkdir()
    shutil.copy(tmp_path / "keys" / "dev.pub", tmp_path / "trusted" / "dev.pub")
    return tmp_path / "keys" / "dev.key"


@pytest.fixture
def agent(tmp_path: Path, keys: Path) -> Iterator[AgentProcess]:
    """An agent (not started) on tmp_path; killed at the end whatever happened."""
    a = AgentProcess(tmp_path, tmp_path / "agent.sock")
    yield a
    if a.proc is not None and a.proc.poll() is None:
        a.proc.kill()
        a.proc.wait()


def signed(tmp_path: Path, module: Path, patchlets, key: Path, *, id="agent-fix", version=1,
           name: str | None = None) -> Path:  # fmt: skip
    """A signed artifact for `module`, written to tmp_path/NAME/."""
    name = name or f"{id}-v{version}"
    source = tmp_path / f"{name}.toml"
    source.write_text(patch_source(module, patchlets, id=id, version=version))
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    return build_artifact(source, module).signed(load_private_key(key)).write(out)


def applied(pid: int) -> list[tuple[str, int]]:
    return [(s.patch_id, s.version) for s in live.status(pid)]


def kinds(events: list[dict[str, Any]], kind: str, pid: int | None = None) -> list[dict]:
    return [e for e in events if e["kind"] == kind and (pid is None or e["pid"] == pid)]


def test_running_processes_are_patched_at_start(targets, start, tmp_path, keys, agent):
    t = start("vuln_pie")
    artifact = signed(tmp_path, targets.vuln_pie, [FIX], keys)
    agent.state.joinpath("store").mkdir(parents=True)
    shutil.copy(artifact, agent.state / "store" / artifact.name)
    agent.start()
    assert applied(t.pid) == [("agent-fix", 1)]  # patched before the agent said ready
    assert t.cmd("call 65") == "-1"
    status = agent.status()
    [patch] = status["patches"]
    assert (patch["id"], patch["state"], patch["processes"]) == ("agent-fix", "enabled", 1)
    assert [p["pid"] for p in status["processes"]] == [t.pid]
    [event] = kinds(agent.events(), "applied", t.pid)
    assert event["patch_id"] == "agent-fix" and event["exe"] == str(targets.vuln_pie)
    assert event["data"]["when"] == "running"
    shown = agent.cli("status")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1].split("\t")[:5] == ["agent-fix", "1", "enabled", "vuln_pie", "1"]  # fmt: skip
    # SIGTERM: a clean stop; the process stays patched, the socket goes.
    assert agent.stop() == 0
    assert applied(t.pid) == [("agent-fix", 1)] and t.cmd("call 65") == "-1"
    assert not agent.socket.exists()


def test_add_patches_running_processes_live_and_a_new_version_updates(targets, start, tmp_path, keys, agent):  # fmt: skip
    agent.start()
    a, b = start("vuln_pie"), start("vuln_pie")
    done = agent.cli("add", signed(tmp_path, targets.vuln_pie, [FIX], keys))
    assert done.returncode == 0, done.stderr
    assert "added agent-fix v1 (enabled)" in done.stdout
    wait_for(lambda: a.cmd("call 65") == "-1" and b.cmd("call 65") == "-1", what="both patched")
    [stored] = (agent.state / "store").glob("*.mpatch")
    assert stored.name.startswith("agent-fix-v1-")
    v2 = signed(tmp_path, targets.vuln_pie, [FIX_V2], keys, version=2)
    done = agent.cli("add", v2)
    assert done.returncode == 0 and "replacing version 1" in done.stdout, done.stdout + done.stderr
    wait_for(lambda: applied(a.pid) == applied(b.pid) == [("agent-fix", 2)], what="updated")
    assert a.cmd("call 65") == "64"
    assert [p.name.split("-")[2] for p in (agent.state / "store").glob("*.mpatch")] == ["v2"]
    assert {e["pid"] for e in kinds(agent.events(), "updated")} == {a.pid, b.pid}
    # An older version is refused: the agent never goes back.
    older = agent.cli("add", signed(tmp_path, targets.vuln_pie, [FIX], keys, name="again"))
    assert older.returncode == 1 and "newer than version 1" in older.stderr


def test_enable_disable_exclude_live(targets, start, tmp_path, keys, agent):
    t = start("vuln_pie")
    agent.start()
    assert agent.cli("add", "--disabled", signed(tmp_path, targets.vuln_pie, [FIX], keys)).returncode == 0  # fmt: skip
    assert agent.status()["patches"][0]["state"] == "disabled"
    assert applied(t.pid) == []
    assert agent.cli("enable", "agent-fix").returncode == 0
    wait_for(lambda: applied(t.pid) == [("agent-fix", 1)], what="enabled")
    assert agent.cli("disable", "agent-fix").returncode == 0
    wait_for(lambda: applied(t.pid) == [], what="disabled")
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
    assert agent.cli("enable", "agent-fix").returncode == 0
    wait_for(lambda: applied(t.pid) == [("agent-fix", 1)], what="enabled again")
    # Exclude by executable glob, for this patch: removed live; lifting it re-applies.
    done = agent.cli("exclude", "--exe", f"{targets.vuln_pie.parent}/*", "--patch", "agent-fix")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: applied(t.pid) == [], what="excluded")
    assert agent.status()["exclusions"] == [
        {"kind": "exe", "pattern": f"{targets.vuln_pie.parent}/*", "patch_id": "agent-fix"}
    ]
    assert agent.cli("exclude", "--remove", "--exe", f"{targets.vuln_pie.parent}/*", "--patch", "agent-fix").returncode == 0  # fmt: skip
    wait_for(lambda: applied(t.pid) == [("agent-fix", 1)], what="exclusion lifted")
    # Exclude a user (root runs the target), for every patch.
    assert agent.cli("exclude", "--user", "root").returncode == 0
    wait_for(lambda: applied(t.pid) == [], what="user excluded")
    assert agent.cli("exclude", "--remove", "--user", "0").returncode == 0  # name or uid
    wait_for(lambda: applied(t.pid) == [("agent-fix", 1)], what="user exclusion lifted")
    unknown = agent.cli("disable", "no-such-patch")
    assert unknown.returncode == 1 and "no patch no-such-patch" in unknown.stderr
    with pytest.raises(UnknownPatch):  # the same error class on the client's side
        agent.client.call("enable", patch_id="no-such-patch")
    removed = [e for e in agent.events() if e["kind"] == "removed"]
    assert len(removed) == 3 and {e["pid"] for e in removed} == {t.pid}


def test_blocked_attempts_become_events(targets, start, tmp_path, keys, agent):
    t = start("vuln_pie")
    agent.start()
    assert agent.cli("add", signed(tmp_path, targets.vuln_pie, [GUARD], keys)).returncode == 0
    wait_for(lambda: applied(t.pid) == [("agent-fix", 1)], what="applied")
    assert [t.cmd("call 65"), t.cmd("call 99"), t.cmd("call 3")] == ["-1", "-1", "3"]

    def blocked() -> list[dict[str, Any]]:
        shown = agent.cli("events", "--json", "--kind", "blocked")
        assert shown.returncode == 0, shown.stderr
        return [json.loads(line) for line in shown.stdout.splitlines()]

    events = wait_for(lambda: sum(e["data"]["count"] for e in blocked()) == 2 and blocked())
    assert {(e["pid"], e["patch_id"]) for e in events} == {(t.pid, "agent-fix")}
    assert events[-1]["data"]["total"] == 2
    assert agent.status()["patches"][0]["blocked"] == 2
    human = agent.cli("events")
    assert "blocked" in human.stdout and f"pid {t.pid}" in human.stdout
    # --follow streams new events as they come.
    follower = subprocess.Popen(
        ["micropatch", "agent", "events", "--follow", "--json", "--kind", "blocked", "--limit", "0",
         "--socket", agent.socket], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # let it subscribe; what came before is the history
        assert t.cmd("call 70") == "-1"
        assert follower.stdout is not None
        line = json.loads(follower.stdout.readline())
        assert (line["kind"], line["data"]["count"], line["data"]["total"]) == ("blocked", 1, 3)
    finally:
        follower.terminate()
        follower.wait()


def test_a_failure_is_one_failed_event_with_the_error_fields(targets, start, tmp_path, keys, agent):  # fmt: skip
    """A seccomp filter that denies mmap: the apply fails cleanly, is reported once,
    and the pass goes on (another process is patched)."""
    denied, fine = start("seccomp"), start("vuln_pie")
    agent.start()
    assert agent.cli("add", signed(tmp_path, targets.seccomp, [FIX], keys, id="sec-fix")).returncode == 0  # fmt: skip
    assert agent.cli("add", signed(tmp_path, targets.vuln_pie, [FIX], keys)).returncode == 0
    wait_for(lambda: applied(fine.pid) == [("agent-fix", 1)], what="the other process patched")
    [failed] = wait_for(lambda: kinds(agent.events(), "failed"), what="a failed event")
    assert (failed["pid"], failed["patch_id"], failed["version"]) == (denied.pid, "sec-fix", 1)
    assert failed["data"]["error"] == "RemoteSyscallError" and failed["data"]["op"] == "apply"
    assert failed["data"]["pid"] == denied.pid and "seccomp" in failed["message"]
    passes = agent.status()["passes"]
    agent.client.call("rescan")
    wait_for(lambda: agent.status()["passes"] > passes, what="another pass")
    assert len(kinds(agent.events(), "failed")) == 1  # retried, not reported again
    assert_untouched(targets, "seccomp", denied.pid, ["copy_packet"])


def test_agent_killed_and_restarted_neither_patches_twice_nor_forgets(targets, start, tmp_path, keys, agent):  # fmt: skip
    a = start("vuln_pie")
    agent.start()
    assert agent.cli("add", signed(tmp_path, targets.vuln_pie, [GUARD], keys)).returncode == 0
    wait_for(lambda: applied(a.pid) == [("agent-fix", 1)], what="applied")
    assert a.cmd("call 65") == "-1"
    wait_for(lambda: agent.status()["patches"][0]["blocked"] == 1, what="blocked counted")
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    b = start("vuln_pie")  # started while no agent runs
    agent.start()
    assert applied(a.pid) == [("agent-fix", 1)]  # not twice
    assert applied(b.pid) == [("agent-fix", 1)]  # and the newcomer is patched
    second = agent.events()
    assert [e["pid"] for e in kinds(second, "applied")] == [b.pid]
    assert kinds(second, "blocked") == []  # already reported by the first run
    assert {p["pid"] for p in agent.status()["processes"]} >= {a.pid, b.pid}
    # It remembers the policy (agent.db) and the registries: disable removes from both.
    assert agent.cli("disable", "agent-fix").returncode == 0
    wait_for(lambda: applied(a.pid) == applied(b.pid) == [], what="removed from both")
    with sqlite3.connect(agent.state / "agent.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_bad_artifacts_in_the_store_are_rejected(targets, start, tmp_path, keys, agent):
    t = start("vuln_pie")
    agent.start()
    store = agent.state / "store"
    (store / "garbage.mpatch").write_bytes(b"{not json")
    write_key_pair(generate_key("stranger"), tmp_path / "stranger")
    foreign = signed(tmp_path, targets.vuln_pie, [FIX], tmp_path / "stranger.key", id="foreign")
    shutil.copy(foreign, store / foreign.name)
    data = bytearray(signed(tmp_path, targets.vuln_pie, [FIX], keys, id="tampered").read_bytes())
    at = data.index(b'"title": "tampered v1"')
    data[at : at + 22] = b'"title": "tampered v7"'  # changed after signing
    (store / "tampered.mpatch").write_bytes(bytes(data))

    def rejected() -> list[dict[str, Any]]:
        return kinds(agent.events(), "rejected")

    events = wait_for(lambda: len(rejected()) == 3 and rejected(), what="3 rejections")
    files = {e["data"]["file"] for e in events}
    assert files == {"garbage.mpatch", foreign.name, "tampered.mpatch"}
    assert not list(store.glob("*.mpatch"))
    assert len(list((store / "rejected").iterdir())) == 3
    assert agent.status()["patches"] == []
    assert applied(t.pid) == [] and t.cmd("call 65") == "-2"
    refused = agent.cli("add", foreign)
    assert refused.returncode == 1 and "trusted" in refused.stderr


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs a system python3")
def test_socket_refuses_non_root_and_allows_the_read_only_group_read_verbs(tmp_path, keys):
    """uid 65534 cannot reach the socket (0600); with read_only_group it can read, not write."""
    src = str(Path(__import__("micropatch").__file__).resolve().parents[1])
    run_dir = Path(tempfile.mkdtemp(prefix="mp-agent-", dir="/tmp"))
    run_dir.chmod(0o711)
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
        root_only = AgentProcess(tmp_path, run_dir / "a.sock").start()
        try:
            assert oct((run_dir / "a.sock").stat().st_mode & 0o777) == "0o600"
            answer = as_nobody(run_dir / "a.sock", "status")
            assert answer.startswith("ControlError permission denied"), answer
            assert root_only.client.call("status")["ready"]
        finally:
            root_only.stop()
        grouped = AgentProcess(
            tmp_path, run_dir / "b.sock", 'read_only_group = "nogroup"\nblocked_interval = 0.2\n'
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


def test_cli_apply_remove_status_go_through_the_agent(targets, start, tmp_path, keys, agent):
    t = start("vuln_pie")
    agent.start()
    env = {"MICROPATCH_AGENT_SOCKET": str(agent.socket)}
    artifact = signed(tmp_path, targets.vuln_pie, [FIX], keys)
    done = micropatch("apply", artifact, "--pid", t.pid, env=env)
    assert done.returncode == 0, done.stderr
    assert "(by the agent)" in done.stdout and "(through the agent)" in done.stdout
    assert t.cmd("call 65") == "-1"
    shown = micropatch("status", "--pid", t.pid, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1].split("\t")[3:5] == ["agent-fix", "1"]
    [event] = kinds(agent.events(), "applied", t.pid)
    assert event["data"]["when"] == "operator"
    # `status` through the agent imports no engine, ELF reader, assembler or crypto.
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", shutil.which("micropatch"), "status", "--pid", str(t.pid)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert timed.returncode == 0, timed.stderr
    heavy = [m for m in ("pydantic", "elftools", "iced_x86", "keystone", "cryptography")
             if f" {m}" in timed.stderr]  # fmt: skip
    assert heavy == [], heavy
    # The same patch added to the store: t is not patched twice, another process is.
    other = start("vuln_pie")
    assert agent.cli("add", artifact).returncode == 0
    wait_for(lambda: applied(other.pid) == [("agent-fix", 1)], what="the store patch applied")
    assert applied(t.pid) == [("agent-fix", 1)]
    # A manual remove is pinned: the agent's next pass does not put it back.
    done = micropatch("remove", "agent-fix", "--pid", t.pid, env=env)
    assert done.returncode == 0 and "removed agent-fix" in done.stdout, done.stderr
    agent.client.call("rescan")
    third = start("vuln_pie")
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
    again = micropatch("remove", "agent-fix", "--pid", t.pid, env=env)
    assert again.returncode == 1 and "is not applied to process" in again.stderr


def test_a_second_agent_on_the_same_socket_refuses_to_start(tmp_path, agent):
    agent.start()
    second = micropatch("agent", "run", "--state-dir", tmp_path / "other", "--socket", agent.socket,
                        "--trust-dir", agent.trust, "--config", agent.config)  # fmt: skip
    assert second.returncode == 1 and "another agent already answers" in second.stderr
    assert agent.client.call("ping")["ready"]  # the first one is untouched


def test_install_writes_a_unit_systemd_accepts(tmp_path):
    done = micropatch("agent", "install", "--root", tmp_path)
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "etc/systemd/system/micropatch-agent.service"
    text = unit.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    command = exec_start.removeprefix("ExecStart=").split()
    assert Path(command[0]).is_absolute() and command[1:3] == ["agent", "run"]
    assert "CAP_SYS_PTRACE" in text and "CAP_SYS_ADMIN" in text
    config = tmp_path / "etc/micropatch/agent.toml"
    assert 'default_state = "enabled"' in config.read_text()
    assert (tmp_path / "var/lib/micropatch").is_dir() and (tmp_path / "etc/micropatch/trusted").is_dir()
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


# A faulty patch: `call 1000` executes ud2 (SIGILL) inside the patchlet.
FAULTY = {"at": "copy_packet", "code": "cmp esi, 1000\njne ok\nud2\nok:"}


def test_a_patch_that_crashes_its_process_is_auto_disabled_for_that_executable(targets, start, tmp_path, keys):  # fmt: skip
    """Issue 8.6: crashes (proc connector exit events, the signal that killed the
    process) count against the patches the process carried; at crash_limit within
    crash_window the patch is disabled for that executable, live, with an event."""
    a = AgentProcess(tmp_path, tmp_path / "agent.sock", "crash_limit = 2\nrescan_interval = 0.5\n")
    a.start()
    try:
        assert a.cli("add", signed(tmp_path, targets.vuln_pie, [FAULTY], keys)).returncode == 0
        bystander = start("vuln_pie")  # carries the patch, never crashes
        wait_for(lambda: applied(bystander.pid) == [("agent-fix", 1)], what="bystander patched")
        crashed = []
        for _ in range(2):
            t = start("vuln_pie")
            wait_for(lambda t=t: applied(t.pid) == [("agent-fix", 1)], what="target patched")
            assert t.cmd("call 3") == "3"
            t.send("call 1000")
            assert t.proc.wait(timeout=10) == -signal.SIGILL
            crashed.append(t.pid)
        try:
            wait_for(lambda: kinds(a.events(), "disabled"), what="auto-disable")
        except AssertionError as e:
            raise AssertionError(f"{e}; events: {a.events()}; stderr: {a.stderr()}") from None
        events = a.events()
        assert [e["pid"] for e in kinds(events, "crashed")] == crashed
        assert all(e["data"]["signal"] == signal.SIGILL for e in kinds(events, "crashed"))
        [disabled] = kinds(events, "disabled")
        assert disabled["patch_id"] == "agent-fix" and disabled["exe"] == str(targets.vuln_pie)
        assert disabled["data"]["auto"] is True
        # Live: the bystander (same executable) loses the patch, a newcomer never gets it.
        wait_for(lambda: applied(bystander.pid) == [], what="removed from the bystander")
        assert bystander.cmd("call 1000") == "-2"  # unpatched, alive
        newcomer = start("vuln_pie")
        time.sleep(1.5)  # three rescans
        assert applied(newcomer.pid) == []
        [patch] = a.status()["patches"]
        assert [d["exe"] for d in patch["auto_disabled"]] == [str(targets.vuln_pie)]
        # Enabling again clears it (and the crash count): patched again.
        assert a.cli("enable", "agent-fix").returncode == 0
        wait_for(lambda: applied(newcomer.pid) == [("agent-fix", 1)], what="enabled again")
    finally:
        a.stop(signal.SIGKILL)


def test_metrics_endpoint_on_localhost(targets, start, tmp_path, keys):
    """Issue 8.7: opt-in Prometheus endpoint, loopback only, fed by the agent."""
    import socket as sockets
    import urllib.request

    with sockets.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = AgentProcess(tmp_path, tmp_path / "agent.sock", f"metrics_port = {port}\nblocked_interval = 0.2\n")  # fmt: skip
    t = start("vuln_pie")
    a.start()
    try:
        assert a.cli("add", signed(tmp_path, targets.vuln_pie, [GUARD], keys)).returncode == 0
        wait_for(lambda: applied(t.pid) == [("agent-fix", 1)], what="applied")
        assert t.cmd("call 65") == "-1"
        wait_for(lambda: kinds(a.events(), "blocked"), what="blocked event")

        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                lines = r.read().decode().splitlines()
            return {
                k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and ln[0] != "#")
            }

        m = scrape()
        assert m['micropatch_patches{state="enabled"}'] == 1
        assert m["micropatch_processes_covered"] >= 1
        assert m['micropatch_blocked_total{patch="agent-fix"}'] == 1
        assert m['micropatch_events_total{kind="applied"}'] >= 1
        # Bound to loopback only: not reachable on another address of this host.
        addresses = {ai[4][0] for ai in sockets.getaddrinfo(sockets.gethostname(), None, sockets.AF_INET)}  # fmt: skip
        for address in addresses - {"127.0.0.1", "127.0.1.1"}:
            with pytest.raises(OSError), sockets.create_connection((address, port), timeout=2):
                pass
    finally:
        a.stop(signal.SIGKILL)


def test_new_processes_are_patched_before_their_code_runs(targets, start, tmp_path, keys):
    """Issue 8.3 through the real agent: a program whose executable is patched, and one
    whose DT_NEEDED library is patched, answer the exploit input as patched the moment
    they are up (the periodic pass is an hour away, so only exec/load patching can
    have done it). The library lies outside the standard directories: `library_dirs`."""
    config = f"rescan_interval = 3600\nlibrary_dirs = [{str(targets.libvuln.parent)!r}]\n"
    a = AgentProcess(tmp_path, tmp_path / "agent.sock", config.replace("'", '"'))
    a.state.joinpath("store").mkdir(parents=True)
    for module, id in ((targets.vuln_pie, "exe-fix"), (targets.libvuln, "lib-fix")):
        artifact = signed(tmp_path, module, [FIX], keys, id=id)
        shutil.copy(artifact, a.state / "store" / artifact.name)
    a.start()
    try:
        for _ in range(5):
            exe, lib = start("vuln_pie"), start("vuln_lib_main")
            assert exe.cmd("call 65") == "-1" and lib.cmd("call 65") == "-1"
            assert applied(exe.pid) == [("exe-fix", 1)] and applied(lib.pid) == [("lib-fix", 1)]
            exe.close(), lib.close()
        events = a.events()
        whens = {(e["patch_id"], e["data"]["when"]) for e in kinds(events, "applied")}
        assert whens == {("exe-fix", "exec"), ("lib-fix", "load")}
        for e in kinds(events, "applied"):  # every one says what happened (issue 15.5)
            at = "its exec" if e["data"]["when"] == "exec" else "the load of libvuln.so"
            assert e["message"].startswith(f"applied {e['patch_id']} v1 in pid {e['pid']} ("), e
            assert f"at {at}, before any of its code ran" in e["message"], e
        assert a.status()["new_processes"]["patched_exec"] == 5
    finally:
        a.stop(signal.SIGKILL)

"""Issue 8: the host agent, as a real process (`micropatch agent run`) with a temporary
state directory, socket and trust directory, patching real targets. Each agent runs
in a sandbox of its own (tests/integration/agentproc.py): it sees the targets
started there, and marks nothing of the host's.

The patch targets the session's own build of vuln_pie (its build-id is this
session's), so the agent touches no process of another test run on this host."""

from __future__ import annotations

import json
import select
import shutil
import signal
import sqlite3
import subprocess
from typing import Any

import pytest
from targets.fleet import wait_for

from micropatch.errors import UnknownPatch
from micropatch.trust.keys import generate_key, write_key_pair

from .agentproc import FIX, FIX_V2, GUARD, NEEDS, applied, kinds, signed
from .patching import assert_untouched

pytestmark = NEEDS


def test_running_processes_are_patched_at_start(targets, nstart, tmp_path, keys, agent):
    t = nstart("vuln_pie")
    artifact = signed(tmp_path, targets.vuln_pie, [FIX], keys)
    agent.state.joinpath("store").mkdir(parents=True)
    shutil.copy(artifact, agent.state / "store" / artifact.name)
    agent.start()
    assert applied(t.pid) == [("agent-fix", 1)]  # patched before the agent said ready
    assert t.cmd("call 65") == "-1"
    status = agent.status()
    [patch] = status["patches"]
    assert (patch["id"], patch["state"], patch["processes"]) == ("agent-fix", "enabled", 1)
    assert [p["pid"] for p in status["processes"]] == [t.ns_pid]
    [event] = kinds(agent.events(), "applied", t.ns_pid)
    assert event["patch_id"] == "agent-fix" and event["exe"] == str(targets.vuln_pie)
    assert event["data"]["when"] == "running"
    shown = agent.cli("status")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1].split("\t")[:5] == ["agent-fix", "1", "enabled", "vuln_pie", "1"]  # fmt: skip
    # SIGTERM: a clean stop; the process stays patched, the socket goes.
    assert agent.stop() == 0
    assert applied(t.pid) == [("agent-fix", 1)] and t.cmd("call 65") == "-1"
    assert not agent.socket.exists()


def test_add_patches_running_processes_live_and_a_new_version_updates(targets, nstart, tmp_path, keys, agent):  # fmt: skip
    agent.start()
    a, b = nstart("vuln_pie"), nstart("vuln_pie")
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
    assert {e["pid"] for e in kinds(agent.events(), "updated")} == {a.ns_pid, b.ns_pid}
    # An older version is refused: the agent never goes back.
    older = agent.cli("add", signed(tmp_path, targets.vuln_pie, [FIX], keys, name="again"))
    assert older.returncode == 1 and "newer than version 1" in older.stderr


def test_enable_disable_exclude_live(targets, nstart, tmp_path, keys, agent):
    t = nstart("vuln_pie")
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
    assert len(removed) == 3 and {e["pid"] for e in removed} == {t.ns_pid}


def test_blocked_attempts_become_events(targets, nstart, tmp_path, keys, agent):
    t = nstart("vuln_pie")
    agent.start()
    assert agent.cli("add", signed(tmp_path, targets.vuln_pie, [GUARD], keys)).returncode == 0
    wait_for(lambda: applied(t.pid) == [("agent-fix", 1)], what="applied")
    assert [t.cmd("call 65"), t.cmd("call 99"), t.cmd("call 3")] == ["-1", "-1", "3"]

    def blocked() -> list[dict[str, Any]]:
        shown = agent.cli("events", "--json", "--kind", "blocked")
        assert shown.returncode == 0, shown.stderr
        return [json.loads(line) for line in shown.stdout.splitlines()]

    events = wait_for(lambda: sum(e["data"]["count"] for e in blocked()) == 2 and blocked())
    assert {(e["pid"], e["patch_id"]) for e in events} == {(t.ns_pid, "agent-fix")}
    assert events[-1]["data"]["total"] == 2
    assert agent.status()["patches"][0]["blocked"] == 2
    human = agent.cli("events")
    assert "blocked" in human.stdout and f"pid {t.ns_pid}" in human.stdout
    # --follow streams new events as they come, after the last --limit of the history,
    # which the agent sends once the follower is subscribed: the line says it is.
    follower = subprocess.Popen(
        ["micropatch", "agent", "events", "--follow", "--json", "--kind", "blocked", "--limit", "1",
         "--socket", agent.socket], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        stdout = follower.stdout

        def line() -> dict[str, Any]:
            assert select.select([stdout], [], [], 60)[0], "no event line within 60 s"
            return dict(json.loads(stdout.readline()))

        assert line()["data"]["total"] == 2  # the history: subscribed
        assert t.cmd("call 70") == "-1"
        new = line()
        assert (new["kind"], new["data"]["count"], new["data"]["total"]) == ("blocked", 1, 3)
    finally:
        follower.terminate()
        follower.wait()


def test_a_failure_is_one_failed_event_with_the_error_fields(targets, nstart, tmp_path, keys, agent):  # fmt: skip
    """A seccomp filter that denies mmap: the apply fails cleanly, is reported once,
    and the pass goes on (another process is patched)."""
    denied, fine = nstart("seccomp"), nstart("vuln_pie")
    agent.start()
    assert agent.cli("add", signed(tmp_path, targets.seccomp, [FIX], keys, id="sec-fix")).returncode == 0  # fmt: skip
    assert agent.cli("add", signed(tmp_path, targets.vuln_pie, [FIX], keys)).returncode == 0
    wait_for(lambda: applied(fine.pid) == [("agent-fix", 1)], what="the other process patched")
    [failed] = wait_for(lambda: kinds(agent.events(), "failed"), what="a failed event")
    assert (failed["pid"], failed["patch_id"], failed["version"]) == (denied.ns_pid, "sec-fix", 1)
    assert failed["data"]["error"] == "RemoteSyscallError" and failed["data"]["op"] == "apply"
    assert failed["data"]["pid"] == denied.ns_pid and "seccomp" in failed["message"]
    passes = agent.status()["passes"]
    agent.client.call("rescan")
    wait_for(lambda: agent.status()["passes"] > passes, what="another pass")
    assert len(kinds(agent.events(), "failed")) == 1  # retried, not reported again
    assert_untouched(targets, "seccomp", denied.pid, ["copy_packet"])


def test_agent_killed_and_restarted_neither_patches_twice_nor_forgets(targets, nstart, tmp_path, keys, agent):  # fmt: skip
    a = nstart("vuln_pie")
    agent.start()
    assert agent.cli("add", signed(tmp_path, targets.vuln_pie, [GUARD], keys)).returncode == 0
    wait_for(lambda: applied(a.pid) == [("agent-fix", 1)], what="applied")
    assert a.cmd("call 65") == "-1"
    wait_for(lambda: agent.status()["patches"][0]["blocked"] == 1, what="blocked counted")
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    b = nstart("vuln_pie")  # started while no agent runs
    agent.start()
    assert applied(a.pid) == [("agent-fix", 1)]  # not twice
    assert applied(b.pid) == [("agent-fix", 1)]  # and the newcomer is patched
    second = agent.events()
    assert [e["pid"] for e in kinds(second, "applied")] == [b.ns_pid]
    assert kinds(second, "blocked") == []  # already reported by the first run
    assert {p["pid"] for p in agent.status()["processes"]} >= {a.ns_pid, b.ns_pid}
    # It remembers the policy (agent.db) and the registries: disable removes from both.
    assert agent.cli("disable", "agent-fix").returncode == 0
    wait_for(lambda: applied(a.pid) == applied(b.pid) == [], what="removed from both")
    with sqlite3.connect(agent.state / "agent.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_bad_artifacts_in_the_store_are_rejected(targets, nstart, tmp_path, keys, agent):
    t = nstart("vuln_pie")
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


def test_a_withdrawn_key_stops_the_next_pass_once_for_every_process(targets, nstart, tmp_path, keys, agent):  # fmt: skip
    # A pass checks each patch's signatures once (agent/verified.py), not per process:
    # with the key gone, the pass that would apply rejects the patch once and touches
    # none of the processes.
    a, b = nstart("vuln_pie"), nstart("vuln_pie")
    agent.start()
    done = agent.cli("add", "--disabled", signed(tmp_path, targets.vuln_pie, [FIX], keys))
    assert done.returncode == 0, done.stderr
    (tmp_path / "trusted" / "dev.pub").unlink()
    assert agent.cli("enable", "agent-fix").returncode == 0
    [rejected] = wait_for(lambda: kinds(agent.events(), "rejected"), what="the rejection")
    assert rejected["patch_id"] == "agent-fix" and "no trusted keys" in rejected["message"]
    assert not kinds(agent.events(), "applied") and not kinds(agent.events(), "failed")
    assert agent.status()["patches"] == []
    for t in (a, b):
        assert applied(t.pid) == [] and t.cmd("call 65") == "-2"
        assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])

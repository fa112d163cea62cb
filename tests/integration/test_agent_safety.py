"""The agent's safety nets and reach, as real processes: crash auto-disable, the
metrics endpoint, and new processes patched before their code runs by the agent
itself (with what `agent status` says of each patch's copies). Agents run in
sandboxes (tests/integration/agentproc.py)."""

from __future__ import annotations

import shutil
import signal
import time

import pytest
from targets.fleet import wait_for
from targets.isolation import NsTarget, Sandbox

from .agentproc import FIX, GUARD, NEEDS, AgentProcess, applied, kinds, signed

pytestmark = NEEDS

# threads' compute(): a patch for a module no process here maps, nor any file holds
THREADS_FIX = {"at": "compute", "code": "nop"}

# A faulty patch: `call 1000` executes ud2 (SIGILL) inside the patchlet.
FAULTY = {"at": "copy_packet", "code": "cmp esi, 1000\njne ok\nud2\nok:"}


def test_a_patch_that_crashes_its_process_is_auto_disabled_for_that_executable(targets, tmp_path, keys):  # fmt: skip
    """Issue 8.6: crashes (proc connector exit events, the signal that killed the
    process) count against the patches the process carried; at crash_limit within
    crash_window the patch is disabled for that executable, live, with an event.

    The one agent test in the host's PID namespace (its own mount namespace and
    tmpfs still): the kernel serves the proc connector only to a listener there."""
    box = Sandbox(tmp_path / "host", pid=False)
    started: list[NsTarget] = []

    def start(name: str) -> NsTarget:
        started.append(NsTarget(box, targets.path(name)))
        return started[-1]

    a = AgentProcess(
        box, tmp_path, tmp_path / "agent.sock", "crash_limit = 2\nrescan_interval = 0.5\n"
    )
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
        a.kill()
        for t in started:
            t.close()
        box.close()


def test_metrics_endpoint_on_localhost(targets, nstart, box, tmp_path, keys):
    """Issue 8.7: opt-in Prometheus endpoint, loopback only, fed by the agent."""
    import socket as sockets
    import urllib.request

    with sockets.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = AgentProcess(box, tmp_path, tmp_path / "agent.sock", f"metrics_port = {port}\nblocked_interval = 0.2\n")  # fmt: skip
    t = nstart("vuln_pie")
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
        assert m["micropatch_late_starts_total"] == 0 and m["micropatch_missed_starts_total"] == 0
        assert m["micropatch_processes_covered"] >= 1
        assert m['micropatch_blocked_total{patch="agent-fix"}'] == 1
        assert m['micropatch_events_total{kind="applied"}'] >= 1
        # Bound to loopback only: not reachable on another address of this host.
        addresses = {ai[4][0] for ai in sockets.getaddrinfo(sockets.gethostname(), None, sockets.AF_INET)}  # fmt: skip
        for address in addresses - {"127.0.0.1", "127.0.1.1"}:
            with pytest.raises(OSError), sockets.create_connection((address, port), timeout=2):
                pass
    finally:
        a.kill()


def test_new_processes_are_patched_before_their_code_runs(targets, box, tmp_path, keys):
    """Issue 8.3 through the real agent: a program whose executable is patched, and one
    whose DT_NEEDED library is patched, answer the exploit input as patched the moment
    they are up (the periodic pass is an hour away, so only exec/load patching can
    have done it). Nothing tells the agent where the library is: the index finds it.
    `agent status` lists where each patch's module was found, and warns of a patch
    whose module is nowhere on the host."""
    inside = box.install(
        {n: targets.path(n) for n in ("vuln_pie", "vuln_lib_main", "libvuln")}, box.root / "srv"
    )
    a = AgentProcess(box, tmp_path, tmp_path / "agent.sock", "rescan_interval = 3600\n")
    a.state.joinpath("store").mkdir(parents=True)
    for module, id in ((targets.vuln_pie, "exe-fix"), (targets.libvuln, "lib-fix"),
                       (targets.threads, "nowhere-fix")):  # fmt: skip
        artifact = signed(tmp_path, module, [FIX if id != "nowhere-fix" else THREADS_FIX], keys,
                          id=id)  # fmt: skip
        shutil.copy(artifact, a.state / "store" / artifact.name)
    a.start()
    try:
        for _ in range(5):
            exe = NsTarget(box, inside["vuln_pie"])
            lib = NsTarget(box, inside["vuln_lib_main"])
            assert exe.cmd("call 65") == "-1" and lib.cmd("call 65") == "-1"
            assert applied(exe.pid) == [("exe-fix", 1)] and applied(lib.pid) == [("lib-fix", 1)]
            exe.close(), lib.close()
        events = a.events()
        whens = {(e["patch_id"], e["data"]["when"]) for e in kinds(events, "applied")}
        assert whens == {("exe-fix", "exec"), ("lib-fix", "load")}
        for e in kinds(events, "applied"):  # every one says what happened (issue 15.5)
            assert e["message"].startswith(f"applied {e['patch_id']} v1 to "), e
            assert f" in pid {e['pid']} (" in e["message"], e
            assert f"at its {e['data']['when']}, before any of its code ran" in e["message"], e
        status = a.status()
        assert status["new_processes"]["patched_exec"] == 5
        patches = {p["id"]: p for p in status["patches"]}
        assert patches["exe-fix"]["copies"] == [str(inside["vuln_pie"])]
        assert patches["lib-fix"]["copies"] == [str(inside["libvuln"])]
        assert patches["exe-fix"]["warning"] is None
        assert patches["nowhere-fix"]["copies"] == []
        assert "no copy of threads" in patches["nowhere-fix"]["warning"]
        shown = a.cli("status")
        assert shown.returncode == 0, shown.stderr
        assert f"# copy of lib-fix: {inside['libvuln']}" in shown.stdout.splitlines()
        assert "# warning: nowhere-fix: no copy of threads" in shown.stdout
        assert "5 patched at exec, 5 at load, 0 late, 0 missed" in shown.stdout
    finally:
        a.kill()

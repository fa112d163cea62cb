"""New processes patched before their first instruction, libraries before they run.

A real NewProcesses (in a child process, tests/targets/newproc.py) with a catalog
of two signed fixes: copy_packet's bounds check in the executable np_exe and in
the library libnpvuln.so. The exploit input (copy_packet(.., 65)) is the first
thing each program does: "-2" unpatched, "-1" patched. The agent and the programs
run in a sandbox (their own PID and mount namespaces, a private tmpfs holding the
programs): the agent marks that tmpfs only, never the host's filesystems.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from targets.isolation import Sandbox, available
from targets.newproc import PATCHED, UNPATCHED, Agent, build, signed_fixes

from micropatch import faults

pytestmark = pytest.mark.skipif(not available(), reason="needs root, unshare and nsenter")

STARTS = 100


@pytest.fixture(scope="module")
def np(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("newproc")
    paths = build(out / "build")
    public, artifacts = signed_fixes(out / "build", paths)
    with Sandbox(out / "host") as box:
        inside = box.install(paths, box.root / "np")
        yield {"box": box, "paths": inside, "public": public, "artifacts": artifacts}


@pytest.fixture(scope="class")
def agent(np: dict[str, Any]) -> Any:
    # Class-scoped: gone before the kill tests, whose own agent must not compete with it.
    with Agent(np["box"], np["public"], np["artifacts"]) as a:
        yield a


def run(np: dict[str, Any], name: str | Path, *args: str, timeout: float = 20) -> str:
    path = np["paths"][name] if isinstance(name, str) else name
    done = np["box"].run(path, *args, timeout=timeout, check=True)
    return str(done.stdout).strip()


class TestAgentRunning:
    """One agent for these tests."""

    def test_executable_patched_on_every_start(self, np: dict[str, Any], agent: Agent) -> None:
        agent.drain()
        results = [run(np, "np_exe") for _ in range(STARTS)]
        assert results == [PATCHED] * STARTS
        assert run(np, "np_exe", "10") == "10"  # the patched function still works
        events = agent.wait_events(len(agent.events) + STARTS + 1)
        applied = [e for e in events if e["kind"] == "applied" and e["patch_id"] == "np-exe-fix"]
        assert len(applied) == STARTS + 1 and {e["when"] for e in applied} == {"exec"}
        assert "at its exec" in applied[-1]["message"]

    def test_needed_library_patched_on_every_start(self, np: dict[str, Any], agent: Agent) -> None:
        agent.drain()
        before = len(agent.events)
        results = [run(np, "np_lib_main") for _ in range(STARTS)]
        # main's call and the library constructor's call, both after the patch
        assert results == [f"{PATCHED} {PATCHED}"] * STARTS
        events = agent.wait_events(before + STARTS)[before:]
        assert [e["when"] for e in events if e["kind"] == "applied"] == ["load"] * STARTS

    def test_dlopen_patched_before_it_returns(self, np: dict[str, Any], agent: Agent) -> None:
        lib = str(np["paths"]["libnpvuln.so"])
        for _ in range(10):
            # the call right after dlopen, and the library's constructor
            assert run(np, "np_dlopen", lib) == f"{PATCHED} {PATCHED}"
        # a process started before the load: the agent does not need to see its exec
        proc = subprocess.Popen(
            [*np["box"].enter(), str(np["paths"]["np_dlopen"]), lib, "65", "wait"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(0.05)
        out, _ = proc.communicate("go\n", timeout=20)
        assert out.strip() == f"{PATCHED} {PATCHED}"

    def test_a_library_loaded_again_after_dlclose_is_patched_again(
        self, np: dict[str, Any], agent: Agent
    ) -> None:
        # the previous load's registry says "applied" at the same address: forgotten
        out = run(np, "np_reload", str(np["paths"]["libnpvuln.so"]))
        assert out.split() == [PATCHED] * 3

    def test_exec_from_a_thread_other_than_the_leader(
        self, np: dict[str, Any], agent: Agent
    ) -> None:
        exe = str(np["paths"]["np_exe"])
        for _ in range(5):
            assert run(np, "np_thread_exec", exe) == PATCHED

    def test_a_copy_under_another_name_is_the_same_build_and_patched(
        self, np: dict[str, Any], agent: Agent
    ) -> None:
        """A renamed copy (a wheel's libfoo-1a2b3c4d.so, a vendored tool): found by
        identity when it appears (no walk: a file event), patched under its own name."""
        box = np["box"]
        renamed = box.root / "np" / "other-name"
        shutil.copy2(box.host_path(np["paths"]["np_exe"]), box.host_path(renamed))
        deadline = time.monotonic() + 10
        while agent.stats()["copies"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.stats()["copies"] == 3
        assert run(np, renamed) == PATCHED
        box.host_path(renamed).unlink()  # and forgotten as soon as it is gone
        deadline = time.monotonic() + 10
        while agent.stats()["copies"] > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.stats()["copies"] == 2

    def test_an_exec_that_fails_after_the_seize_is_let_go(
        self, np: dict[str, Any], agent: Agent
    ) -> None:
        """np_exe's build (same build-id) whose interpreter does not exist: execve fails
        after the agent seized the thread; bash goes on (execfail), and is let go. The
        build-id is np_exe's, the SHA-256 another: the fix pins its build-id only."""
        box = np["box"]
        broken = box.root / "np" / "np_broken"
        data = box.host_path(np["paths"]["np_exe"]).read_bytes()
        interp = b"/lib64/ld-linux-x86-64.so.2\0"
        assert interp in data
        box.host_path(broken).write_bytes(data.replace(interp, b"/lib64/ld-linux-x86-64.so.X\0"))
        box.host_path(broken).chmod(0o755)
        deadline = time.monotonic() + 10
        while agent.stats()["copies"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = agent.stats()["exec_failed"]
        started = time.monotonic()
        done = box.run(
            "bash", "-c", f"shopt -s execfail; exec {broken}; sleep 2.5; echo survived",
            timeout=30,
        )  # fmt: skip
        assert done.stdout.strip() == "survived"
        assert time.monotonic() - started < 10
        assert agent.stats()["exec_failed"] == failed + 1
        box.host_path(broken).unlink()

    def test_unrelated_exec_is_not_traced(self, np: dict[str, Any], agent: Agent) -> None:
        held = agent.stats()["held"]
        # the same source as np_exe, another build; and a system program
        assert run(np, "np_plain") == UNPATCHED
        assert np["box"].run("/bin/true").returncode == 0
        # a watched library read, not loaded: followed and let go
        assert (
            np["box"].run("sh", "-c", f"cat {np['paths']['libnpvuln.so']} >/dev/null").returncode
            == 0
        )
        stats = agent.stats()
        assert stats["held"] == held + 1 and stats["not_loads"] >= 1
        assert stats["released"] == 0

    def test_a_process_traced_by_another_tracer_is_skipped(
        self, np: dict[str, Any], agent: Agent
    ) -> None:
        if not shutil.which("strace"):
            pytest.skip("strace not installed")
        agent.drain()
        done = np["box"].run(
            "strace", "-f", "-o", "/dev/null", np["paths"]["np_exe"], timeout=30, check=True
        )
        assert done.stdout.strip() == UNPATCHED
        skipped = [e for e in agent.wait_events(len(agent.events) + 1, 5) if e["kind"] == "skipped"]
        assert skipped and "traced by pid" in skipped[-1]["message"]

    def test_holds_are_short(self, agent: Agent) -> None:
        stats = agent.stats()
        assert stats["released"] == 0 and stats["failed"] == 0
        assert stats["max_hold_ms"] < 50


def test_what_the_watchdog_allows_is_patched_live_or_counted_missed(np: dict[str, Any]) -> None:
    """No worker at all: every watched exec is allowed by the watchdog after hold_limit
    and runs on, nothing waits longer; then the late watch patches it live (a
    program waiting for its input: patched before it) or counts it missed (one
    that ran and exited first). No start passes silently."""
    env = {"NP_WORKERS": "0", "NP_HOLD_LIMIT": "0.05"}
    with Agent(np["box"], np["public"], np["artifacts"], env=env) as agent:
        started = time.monotonic()
        outputs = [run(np, "np_exe") for _ in range(5)]
        elapsed = time.monotonic() - started
        waiting = subprocess.Popen(
            [*np["box"].enter(), str(np["paths"]["np_exe"]), "65", "wait"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        late: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(late) < 6:
            agent.drain(0.2)
            late = [e for e in agent.events if e["kind"] == "late"]
        out, _ = waiting.communicate("go\n", timeout=20)
        stats = agent.stats()
    assert all(o in (PATCHED, UNPATCHED) for o in outputs)
    assert elapsed < 5 * 0.5, f"{elapsed:.2f} s for 5 held execs"
    assert stats["released"] == 6 and stats["patched_exec"] == 0
    assert 40 <= stats["max_hold_ms"] < 200  # allowed at about hold_limit, not later
    assert stats["late"] + stats["missed"] == 6  # every release accounted for
    assert out.strip() == PATCHED  # the waiting one, patched live before its input
    patched = [e for e in late if e["data"]["outcome"] == "patched"]
    assert patched and all(e["data"]["delay_ms"] < 1000 for e in patched)
    assert all(e["data"]["reason"] == "released by the watchdog" for e in late)


# --- the agent SIGKILLed ------------------------------------------------------------

EXEC_POINTS = [
    "newproc-exec-held",  # holding the exec: seized, not yet allowed
    "newproc-exec-stopped",  # the new image at its exec event stop
    "stopped",  # the rest of the process stopped (held stop)
    "syscall-entered",  # inside the remote mmap of the cave
    "intent-recorded",
    "jump-0-written",
    "committed",
]
LOAD_POINTS = ["newproc-load-following", "syscall-borrowed", "intent-recorded", "committed"]


def _killed_agent(np: dict[str, Any], point: str, program: str) -> str:
    """Start an agent that SIGKILLs itself at `point`, run the program, and return
    its output once it ends (it must end: nothing stays blocked or stopped)."""
    agent = Agent(np["box"], np["public"], np["artifacts"], env=faults.environment(point))
    try:
        started = time.monotonic()
        done = np["box"].run(np["paths"][program], timeout=20)
        elapsed = time.monotonic() - started
        assert agent.proc.wait(10) == -9, "the agent did not reach the fault point"
    finally:
        agent.kill()
    assert done.returncode == 0, done.stderr
    assert elapsed < 5, f"the program took {elapsed:.1f} s"
    return str(done.stdout).strip()


@pytest.mark.parametrize("point", EXEC_POINTS)
def test_agent_killed_at_exec(np: dict[str, Any], point: str) -> None:
    out = _killed_agent(np, point, "np_exe")
    assert out in (PATCHED, UNPATCHED)
    if point.startswith("newproc-"):
        assert out == UNPATCHED  # killed before any change: runs on unpatched
    # the next exec with no agent is untouched
    assert run(np, "np_exe") == UNPATCHED


@pytest.mark.parametrize("point", LOAD_POINTS)
def test_agent_killed_while_following_a_load(np: dict[str, Any], point: str) -> None:
    out = _killed_agent(np, point, "np_lib_main")
    main, ctor = out.split()
    assert main == ctor and main in (PATCHED, UNPATCHED)  # never half

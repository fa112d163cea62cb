"""New processes patched before their first instruction, libraries before they run.

A real NewProcesses (in a child process, tests/targets/newproc.py) with a catalog
of two signed fixes: copy_packet's bounds check in the executable np_exe and in
the library libnpvuln.so. The exploit input (copy_packet(.., 65)) is the first
thing each program does: "-2" unpatched, "-1" patched.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from targets.newproc import PATCHED, UNPATCHED, Agent, build, signed_fixes

from micropatch import faults

STARTS = 100


@pytest.fixture(scope="module")
def np(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("newproc")
    paths = build(out)
    public, artifacts = signed_fixes(out, paths)
    return {"dir": out, "paths": paths, "public": public, "artifacts": artifacts}


@pytest.fixture(scope="class")
def agent(np: dict[str, Any]) -> Any:
    # Class-scoped: gone before the kill tests, whose own agent must not compete with it.
    with Agent(np["public"], np["dir"], np["artifacts"]) as a:
        yield a


def run(path: Path, *args: str, timeout: float = 20) -> str:
    done = subprocess.run(
        [str(path), *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout.strip()


class TestAgentRunning:
    """One agent for these tests."""

    def test_executable_patched_on_every_start(self, np: dict[str, Any], agent: Agent) -> None:
        agent.drain()
        results = [run(np["paths"]["np_exe"]) for _ in range(STARTS)]
        assert results == [PATCHED] * STARTS
        assert run(np["paths"]["np_exe"], "10") == "10"  # the patched function still works
        events = agent.wait_events(len(agent.events) + STARTS + 1)
        applied = [e for e in events if e["kind"] == "applied" and e["patch_id"] == "np-exe-fix"]
        assert len(applied) == STARTS + 1 and {e["when"] for e in applied} == {"exec"}

    def test_needed_library_patched_on_every_start(self, np: dict[str, Any], agent: Agent) -> None:
        agent.drain()
        before = len(agent.events)
        results = [run(np["paths"]["np_lib_main"]) for _ in range(STARTS)]
        # main's call and the library constructor's call, both after the patch
        assert results == [f"{PATCHED} {PATCHED}"] * STARTS
        events = agent.wait_events(before + STARTS)[before:]
        assert [e["when"] for e in events if e["kind"] == "applied"] == ["load"] * STARTS

    def test_dlopen_patched_before_it_returns(self, np: dict[str, Any], agent: Agent) -> None:
        lib = str(np["paths"]["libnpvuln.so"])
        for _ in range(10):
            # the call right after dlopen, and the library's constructor
            assert run(np["paths"]["np_dlopen"], lib) == f"{PATCHED} {PATCHED}"
        # a process started before the load: the agent does not need to see its exec
        proc = subprocess.Popen(
            [str(np["paths"]["np_dlopen"]), lib, "65", "wait"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(0.05)
        out, _ = proc.communicate("go\n", timeout=20)
        assert out.strip() == f"{PATCHED} {PATCHED}"

    def test_a_library_loaded_again_after_dlclose_is_patched_again(
        self, np: dict[str, Any], agent: Agent
    ) -> None:
        # the previous load's registry says "applied" at the same address: forgotten
        out = run(np["paths"]["np_reload"], str(np["paths"]["libnpvuln.so"]))
        assert out.split() == [PATCHED] * 3

    def test_exec_from_a_thread_other_than_the_leader(
        self, np: dict[str, Any], agent: Agent
    ) -> None:
        exe = str(np["paths"]["np_exe"])
        for _ in range(5):
            assert run(np["paths"]["np_thread_exec"], exe) == PATCHED

    def test_an_exec_that_fails_after_the_seize_is_let_go(
        self, np: dict[str, Any], agent: Agent, tmp_path: Path
    ) -> None:
        """np_exe's build (same build-id) whose interpreter does not exist: execve fails
        after the agent seized the thread; bash goes on (execfail), and is let go."""
        broken = tmp_path / "np_exe"
        data = np["paths"]["np_exe"].read_bytes()
        interp = b"/lib64/ld-linux-x86-64.so.2\0"
        assert interp in data
        broken.write_bytes(data.replace(interp, b"/lib64/ld-linux-x86-64.so.X\0"))
        broken.chmod(0o755)
        failed = agent.stats()["exec_failed"]
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-c", f"shopt -s execfail; exec {broken}; sleep 2.5; echo survived"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.stdout.strip() == "survived"
        assert time.monotonic() - started < 10
        assert agent.stats()["exec_failed"] == failed + 1

    def test_unrelated_exec_is_not_traced(self, np: dict[str, Any], agent: Agent) -> None:
        held = agent.stats()["held"]
        # the same build as np_exe under another name, and a system program
        assert run(np["paths"]["np_plain"]) == UNPATCHED
        assert subprocess.run(["/bin/true"], check=False).returncode == 0
        # a watched library read, not loaded: followed and let go
        assert (
            subprocess.run(
                ["cat", str(np["paths"]["libnpvuln.so"])], capture_output=True
            ).returncode
            == 0
        )
        stats = agent.stats()
        assert stats["held"] == held + 1 and stats["not_loads"] >= 1
        assert stats["released"] == 0

    def test_a_process_traced_by_another_tracer_is_skipped(
        self, np: dict[str, Any], agent: Agent
    ) -> None:
        agent.drain()
        done = subprocess.run(
            ["strace", "-f", "-o", "/dev/null", str(np["paths"]["np_exe"])],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert done.stdout.strip() == UNPATCHED
        skipped = [e for e in agent.wait_events(len(agent.events) + 1, 5) if e["kind"] == "skipped"]
        assert skipped and "traced by pid" in skipped[-1]["message"]

    def test_holds_are_short(self, agent: Agent) -> None:
        stats = agent.stats()
        assert stats["released"] == 0 and stats["failed"] == 0
        assert stats["max_hold_ms"] < 50


def test_the_watchdog_allows_what_no_worker_takes_on(np: dict[str, Any]) -> None:
    """No worker at all: every watched exec is allowed by the watchdog after hold_limit,
    and runs unpatched; nothing waits longer."""
    env = {"NP_WORKERS": "0", "NP_HOLD_LIMIT": "0.05"}
    with Agent(np["public"], np["dir"], np["artifacts"], env=env) as agent:
        started = time.monotonic()
        outputs = [run(np["paths"]["np_exe"]) for _ in range(5)]
        elapsed = time.monotonic() - started
        stats = agent.stats()
    assert outputs == [UNPATCHED] * 5
    assert stats["released"] == 5 and stats["patched_exec"] == 0
    assert elapsed < 5 * 0.5, f"{elapsed:.2f} s for 5 held execs"
    assert 40 <= stats["max_hold_ms"] < 200  # allowed at about hold_limit, not later


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


def _killed_agent(np: dict[str, Any], point: str, program: list[str]) -> tuple[str, int]:
    """Start an agent that SIGKILLs itself at `point`, run the program, and return
    its output once it ends (it must end: nothing stays blocked or stopped)."""
    agent = Agent(np["public"], np["dir"], np["artifacts"], env=faults.environment(point))
    try:
        started = time.monotonic()
        done = subprocess.run(program, capture_output=True, text=True, timeout=20, check=False)
        elapsed = time.monotonic() - started
        assert agent.proc.wait(10) == -9, "the agent did not reach the fault point"
    finally:
        agent.kill()
    assert done.returncode == 0, done.stderr
    assert elapsed < 5, f"the program took {elapsed:.1f} s"
    return done.stdout.strip(), done.returncode


@pytest.mark.parametrize("point", EXEC_POINTS)
def test_agent_killed_at_exec(np: dict[str, Any], point: str) -> None:
    out, _ = _killed_agent(np, point, [str(np["paths"]["np_exe"])])
    assert out in (PATCHED, UNPATCHED)
    if point.startswith("newproc-"):
        assert out == UNPATCHED  # killed before any change: runs on unpatched
    # the next exec with no agent is untouched
    assert run(np["paths"]["np_exe"]) == UNPATCHED


@pytest.mark.parametrize("point", LOAD_POINTS)
def test_agent_killed_while_following_a_load(np: dict[str, Any], point: str) -> None:
    out, _ = _killed_agent(np, point, [str(np["paths"]["np_lib_main"])])
    main, ctor = out.split()
    assert main == ctor and main in (PATCHED, UNPATCHED)  # never half

"""The proc connector reports how real processes died (process/connector.py).

Each test subscribes first, then starts a small C program that crashes with one
signal, exits, or is killed, and reads the kernel's exit events for it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micropatch.process.connector import (
    CRASH_SIGNALS,
    ExecEvent,
    ExitEvent,
    ExitWatcher,
    ForkEvent,
    Overrun,
)

CRASHER = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

static void segv(void) { *(volatile int *)0 = 1; }

static void bus(void) {
    /* A shared mapping past the end of an empty file: the access is a SIGBUS. */
    FILE *f = tmpfile();
    volatile char *p = mmap(0, 4096, PROT_READ, MAP_SHARED, fileno(f), 0);
    if (p == MAP_FAILED) exit(90);
    (void)p[0];
}

static void *crash_thread(void *arg) { (void)arg; segv(); return 0; }

int main(int argc, char **argv) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);  /* keep the test quick whatever core_pattern says */
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "segv")) segv();
    else if (!strcmp(what, "bus")) bus();
    else if (!strcmp(what, "ill")) __builtin_trap();  /* ud2 */
    else if (!strcmp(what, "abrt")) abort();
    else if (!strcmp(what, "trap")) __asm__ volatile("int3");
    else if (!strcmp(what, "exit")) exit(argc > 2 ? atoi(argv[2]) : 0);
    else if (!strcmp(what, "thread")) {
        pthread_t t;
        pthread_create(&t, 0, crash_thread, 0);
        pthread_join(t, 0);
    } else if (!strcmp(what, "wait")) {
        printf("ready %d\n", getpid());
        fflush(stdout);
        for (;;) pause();
    }
    return 99;  /* the crash did not happen */
}
"""


@pytest.fixture(scope="module")
def crasher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("connector") / "crasher"
    source = out.with_suffix(".c")
    source.write_text(CRASHER)
    subprocess.run(["cc", "-O0", "-pthread", "-o", str(out), str(source)], check=True)
    return out


def _exits_of(watcher: ExitWatcher, tgid: int, timeout: float = 10.0) -> list[ExitEvent]:
    """Every exit event of process tgid's threads, until its leader's."""
    found: list[ExitEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in watcher.read(0.5):
            assert not isinstance(event, Overrun), "events dropped in a quiet test"
            if isinstance(event, ExitEvent) and event.tgid == tgid:
                found.append(event)
                if event.process_exit:
                    return found
    raise AssertionError(f"no exit event for the leader of {tgid} in {timeout} s: {found}")


def _run(crasher: Path, *args: str) -> tuple[int, list[ExitEvent]]:
    with ExitWatcher() as watcher:
        proc = subprocess.Popen([str(crasher), *args])
        events = _exits_of(watcher, proc.pid)
        returncode = proc.wait(10)
    return returncode, events


@pytest.mark.parametrize(
    ("mode", "sig"),
    [
        ("segv", signal.SIGSEGV),
        ("bus", signal.SIGBUS),
        ("ill", signal.SIGILL),
        ("abrt", signal.SIGABRT),
        ("trap", signal.SIGTRAP),
    ],
)
def test_a_crash_is_reported_with_its_signal(crasher: Path, mode: str, sig: int) -> None:
    returncode, events = _run(crasher, mode)
    assert returncode == -sig  # what the parent sees agrees
    leader = events[-1]
    assert leader.pid == leader.tgid
    assert leader.signal == sig
    assert leader.status is None
    assert not leader.core_dumped  # RLIMIT_CORE 0
    assert leader.exit_signal == signal.SIGCHLD  # what the parent is sent, not the cause
    assert leader.crashed
    assert sig in CRASH_SIGNALS
    assert signal.Signals(sig).name in leader.describe()


def test_a_normal_exit_is_not_a_crash(crasher: Path) -> None:
    returncode, events = _run(crasher, "exit", "7")
    assert returncode == 7
    leader = events[-1]
    assert leader.signal is None
    assert leader.status == 7
    assert leader.exit_code == 7 << 8
    assert not leader.crashed
    assert "status 7" in leader.describe()


def test_exit_zero_is_not_a_crash(crasher: Path) -> None:
    returncode, events = _run(crasher, "exit", "0")
    assert returncode == 0
    assert events[-1].exit_code == 0
    assert events[-1].status == 0
    assert not events[-1].crashed


def test_sigkill_is_not_a_crash(crasher: Path) -> None:
    with ExitWatcher() as watcher:
        proc = subprocess.Popen([str(crasher), "wait"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        proc.kill()
        events = _exits_of(watcher, proc.pid)
        proc.wait(10)
    leader = events[-1]
    assert leader.signal == signal.SIGKILL
    assert not leader.crashed


def test_a_thread_crash_kills_the_process_and_only_the_leader_counts(crasher: Path) -> None:
    returncode, events = _run(crasher, "thread")
    assert returncode == -signal.SIGSEGV
    threads = [e for e in events if not e.process_exit]
    assert threads, "the crashing thread's own exit event"
    for event in threads:
        assert event.signal == signal.SIGSEGV  # the whole group dies of it...
        assert not event.crashed  # ...but a thread is not a process
        assert event.exit_signal == -1  # threads notify nobody
    assert events[-1].crashed


def test_exec_and_fork_events_when_asked(crasher: Path) -> None:
    seen_fork = seen_exec = False
    with ExitWatcher(("exit", "exec", "fork")) as watcher:
        proc = subprocess.Popen([str(crasher), "exit", "0"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (seen_fork and seen_exec):
            for event in watcher.read(0.5):
                if isinstance(event, ForkEvent) and event.child_tgid == proc.pid:
                    seen_fork = event.child_pid == event.child_tgid
                elif isinstance(event, ExecEvent) and event.tgid == proc.pid:
                    seen_exec = True
        proc.wait(10)
    assert seen_fork and seen_exec


def test_only_exits_by_default(crasher: Path) -> None:
    with ExitWatcher() as watcher:
        proc = subprocess.Popen([str(crasher), "exit", "0"])
        kinds = set()
        deadline = time.monotonic() + 10
        leader_seen = False
        while time.monotonic() < deadline and not leader_seen:
            for event in watcher.read(0.5):
                kinds.add(type(event))
                leader_seen |= isinstance(event, ExitEvent) and event.tgid == proc.pid
        proc.wait(10)
    assert kinds == {ExitEvent}


def test_read_times_out_and_close_wakes_a_blocked_reader() -> None:
    import threading

    watcher = ExitWatcher().open()
    started = time.monotonic()
    # Exits of other processes may arrive; an empty read can only be the timeout.
    while watcher.read(0.05):
        pass
    assert time.monotonic() - started < 5
    results: list[object] = []

    def reader() -> None:
        results.extend(iter(watcher))
        results.append("done")

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.1)
    watcher.close()
    thread.join(5)
    assert not thread.is_alive()
    assert results[-1] == "done"
    assert watcher.read(0) == []  # closed: nothing, no error


def test_an_overrun_is_reported(crasher: Path) -> None:
    """A tiny receive buffer that nobody reads overflows: read says Overrun."""
    with ExitWatcher(("exit", "exec", "fork"), receive_buffer=256) as watcher:
        procs = [subprocess.Popen([str(crasher), "exit", "0"]) for _ in range(40)]
        for proc in procs:
            proc.wait(10)
        seen = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            events = watcher.read(0.2)
            if not events:
                break
            seen.extend(events)
            if any(isinstance(e, Overrun) for e in events):
                break
        assert any(isinstance(e, Overrun) for e in seen)
        assert watcher.overruns >= 1


def test_without_cap_net_admin_the_error_says_so(crasher: Path, tmp_path: Path) -> None:
    """An unprivileged process either subscribes (Linux 6.6+ lets anyone listen)
    or gets a ConnectorError naming CAP_NET_ADMIN (older kernels)."""
    import os
    import sys

    script = tmp_path / "unprivileged.py"
    script.write_text(
        "import os\n"
        "from micropatch.process.connector import ExitWatcher, ConnectorError\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)  # no capability left\n"
        "try:\n"
        "    ExitWatcher().open().close()\n"
        "    print('OK')\n"
        "except ConnectorError as e:\n"
        "    print('ERR', e)\n"
    )
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.stdout.startswith(("OK", "ERR")), result.stderr
    if result.stdout.startswith("ERR"):
        assert "CAP_NET_ADMIN" in result.stdout


FORK_AND_ABORT = """
import os, sys
print("ready", flush=True)
sys.stdin.read(1)
child = os.fork()
if child == 0:
    os.abort()  # the forked child crashes, without an exec
os.waitpid(child, 0)
"""


def test_a_real_forked_child_crash_is_known_through_its_parent() -> None:
    """Fork, exec and exit timestamps are CLOCK_MONOTONIC (time.monotonic_ns), which
    Carriers compares: a child forked by a process known to carry a patch, and
    crashing, is known for what it inherited when its exit arrives."""
    from micropatch.agent.covered import Carriers

    carriers = Carriers(lambda pid: 1)
    with ExitWatcher(("exit", "fork", "exec")) as watcher:
        parent = subprocess.Popen(
            [sys.executable, "-c", FORK_AND_ABORT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )  # fmt: skip
        assert parent.stdout is not None and parent.stdout.readline() == b"ready\n"
        before = time.monotonic_ns()  # a read of its registry, after its exec
        carriers.remember(parent.pid, 1, sys.executable, {"fix-1": 1}, {}, read_ns=before)
        assert parent.stdin is not None
        parent.stdin.write(b"x")
        parent.stdin.close()
        parent.wait(10)
        child = exit = None
        deadline = time.monotonic() + 10
        while exit is None and time.monotonic() < deadline:
            for event in watcher.read(1.0):
                if isinstance(event, ForkEvent) and event.parent_tgid == parent.pid:
                    assert event.child_pid == event.child_tgid  # a process, not a thread
                    assert before <= event.timestamp_ns <= time.monotonic_ns()
                    child = carriers.forked(parent.pid, event.child_pid, event.timestamp_ns)
                elif isinstance(event, ExecEvent):
                    carriers.execed(event.tgid, event.timestamp_ns)
                elif isinstance(event, ExitEvent) and child and event.pid == child.pid:
                    exit = event
    assert child is not None and exit is not None, "no fork or exit of the parent's child"
    gone = carriers.forget(exit.pid, exit.timestamp_ns)
    assert gone is not None and gone.carried() == ["fix-1"] and gone.parent == parent.pid
    assert exit.crashed and exit.signal == signal.SIGABRT


def test_the_exit_thread_calls_back_for_process_exits_only(crasher: Path) -> None:
    import threading

    from micropatch.agent.crashes import ExitThread

    seen: list[ExitEvent] = []
    arrived = threading.Condition()

    def on_exit(event: ExitEvent) -> None:
        with arrived:
            seen.append(event)  # every process exit on the host; filtered below
            arrived.notify_all()

    part = ExitThread(on_exit)
    part.start()
    try:
        pids = set()
        for mode in ("thread", "segv"):
            proc = subprocess.Popen([str(crasher), mode])
            pids.add(proc.pid)
            proc.wait(10)
        with arrived:
            assert arrived.wait_for(lambda: pids <= {e.tgid for e in seen}, timeout=10), seen
            ours = [e for e in seen if e.tgid in pids]
    finally:
        part.stop()
        part.stop()
    assert len(ours) == 2  # the crashing thread's own exit is not a process exit
    assert all(e.process_exit and e.signal == signal.SIGSEGV for e in ours)


SUBSCRIBE = """
import time
from micropatch.agent.crashes import ExitThread
from micropatch.process.connector import ConnectorError
started = time.monotonic()
try:
    ExitThread(lambda event: None).start()
    print("subscribed")
except ConnectorError as e:
    print(f"{time.monotonic() - started:.3f}", e)
"""


def test_an_agent_in_a_pid_namespace_of_its_own_is_told_at_once(box) -> None:
    """The kernel ignores a proc connector listener outside the host's PID namespace
    without an error; such an agent (a container's) is told so at once, not after the
    acknowledgement's 2 s timeout at every start."""
    done = box.run(sys.executable, "-c", SUBSCRIBE, timeout=60)
    assert done.returncode == 0, done.stderr
    seconds, _, message = done.stdout.strip().partition(" ")
    assert message.startswith("the proc connector serves only listeners in the host's initial"), done.stdout  # fmt: skip
    assert "runs in a pid namespace of its own" in message
    assert float(seconds) < 1.0  # the acknowledgement was not waited for

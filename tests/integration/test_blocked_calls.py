"""What a stop does to threads parked in blocking system calls (issue 20.3).

The `waiters` target parks one thread in each kind of blocking call and counts
how each call returns (tests/targets/waiters.c). A stop must end none of them
early except the calls with a timeout that docs/engine.md lists; a signal
with a handler sent during the stop must still end an epoll_wait with EINTR;
what arrives during the stop is returned by the restarted call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time

import pytest

from micropatch import live
from micropatch.process.world import stop_world

from .patching import make_patch

# Calls with a timeout that return EINTR when a stop ends their sleep, on this
# kernel (6.x); restarting them would wait their whole timeout again.
STILL_INTERRUPTED = {
    "epoll_wait_timed",
    "epoll_pwait2_timed",
    "sigtimedwait",
    "recv_rcvtimeo",
    "semtimedop",
    "io_uring_enter",
}
# Calls we restart (process/restart.py): EINTR on a bare stop without it.
RESTARTED = {
    "epoll_wait_inf",
    "epoll_pwait_inf",
    "epoll_pwait2_inf",
    "sigwaitinfo",
    "semop",
    "semtimedop_inf",
}
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
STOPS = 20
SYS_EPOLL_WAIT = 232


def _counts(t) -> dict[str, tuple[int, int, int]]:
    assert t.cmd("settle") == "settled"
    out = {}
    for item in t.cmd("counts").split():
        name, value = item.split("=")
        eintr, ok, other = (int(v) for v in value.split("/"))
        out[name] = (eintr, ok, other)
    return out


def _pairs(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in line.split())}


def _interrupted(counts: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    return {name: c[0] for name, c in counts.items() if c[0]}


def test_a_stop_ends_only_timed_calls(start) -> None:
    t = start("waiters")
    kinds = set(_counts(t))
    assert len(kinds) == 32, "this test runs as root (IPC namespace) with io_uring enabled"
    for _ in range(STOPS):
        with stop_world(t.pid):
            pass
        t.cmd("settle")
    counts = _counts(t)
    assert _interrupted(counts) == {name: STOPS for name in STILL_INTERRUPTED}
    assert all(c[1:] == (0, 0) for c in counts.values()), counts


def test_apply_and_remove_while_parked(targets, start) -> None:
    t = start("waiters")
    patch = make_patch(targets.path("waiters"), [FIX])
    for _ in range(5):
        assert live.apply(patch, t.pid).action == "applied"
        assert t.cmd("call 65") == "-1"
        assert live.remove(patch.id, t.pid).action == "removed"
        assert t.cmd("call 65") == "-2"
    counts = _counts(t)
    assert set(_interrupted(counts)) <= STILL_INTERRUPTED
    assert not any(counts[name][0] for name in RESTARTED)


def test_what_arrives_during_the_stop_is_returned(start) -> None:
    """An event and a waited-for signal sent while the threads are stopped are
    returned by the restarted epoll_wait and sigwaitinfo."""
    t = start("waiters")
    fds, tids = _pairs(t.cmd("fds")), _pairs(t.cmd("tids"))
    with stop_world(t.pid):
        with open(f"/proc/{t.pid}/fd/{fds['epoll']}", "wb", buffering=0) as pipe:
            pipe.write(b"x")
        _tgkill(t.pid, tids["sigwaitinfo"], signal.SIGRTMIN + 5)
    counts = _counts(t)
    assert counts["epoll_wait_inf"] == (0, 1, 0)
    assert counts["sigwaitinfo"] == (0, 1, 0)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("epoll_wait_inf", (1, 0, 0)),  # epoll_wait never restarts after a handler
        ("epoll_pwait2_inf", (1, 0, 0)),
        ("semop", (1, 0, 0)),
        ("read_pipe", (0, 0, 0)),  # SA_RESTART: read() restarts after it
    ],
)
def test_a_handler_during_the_stop_still_sees_eintr(start, kind, expected) -> None:
    """A signal with a handler sent during the stop: the call we restart returns
    EINTR after the handler, as it would have without the stop."""
    t = start("waiters")
    tids = _pairs(t.cmd("tids"))
    with stop_world(t.pid):
        _tgkill(t.pid, tids[kind], signal.SIGUSR1)
    counts = _counts(t)
    assert t.cmd("handled") == "1"
    assert counts[kind] == expected
    del counts[kind]
    assert _interrupted(counts) == {name: 1 for name in STILL_INTERRUPTED}


def test_the_borrowed_thread_gets_its_eintr_back(targets, start) -> None:
    """The main thread, parked in epoll_wait(-1), is borrowed for the first cave's
    system calls: from the stub the kernel restarts nothing, so it returns EINTR
    as before (not run again unconditionally, which would hide a handler's EINTR)."""
    t = start("waiters")
    t.send("epoll_main")
    deadline = time.monotonic() + 10
    while _syscall(t.pid) != SYS_EPOLL_WAIT:
        assert time.monotonic() < deadline, "the main thread never waited in epoll_wait"
        time.sleep(0.001)
    live.apply(make_patch(targets.path("waiters"), [FIX]), t.pid)
    assert t.readline() == f"epoll -1 {errno.EINTR}"
    assert t.cmd("call 65") == "-1"


def test_a_patcher_killed_in_the_stop_leaves_the_restart(start) -> None:
    """The restart is in the thread's registers, in the kernel: a patcher SIGKILLed
    while frozen inside its stop (as a watchdog would) leaves the calls to restart."""
    t = start("waiters")
    child = os.fork()
    if child == 0:  # the patcher: stops the world, then freezes
        try:
            with stop_world(t.pid):
                os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while _state(child) != "T":
        assert time.monotonic() < deadline, "the patcher never froze"
        time.sleep(0.001)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    counts = _counts(t)
    assert _interrupted(counts) == {name: 1 for name in STILL_INTERRUPTED}
    assert t.cmd("call 65") == "-2"


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _syscall(tid: int) -> int:
    with open(f"/proc/{tid}/syscall") as f:
        first = f.read().split()[0]
    return int(first) if first.lstrip("-").isdigit() else -1


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """A thread-directed signal (Python's pthread_kill needs a pthread_t)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, sig) != 0:  # SYS_tgkill
        raise OSError(ctypes.get_errno(), "tgkill")

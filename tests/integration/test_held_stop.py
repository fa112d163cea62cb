"""The engine inside a stop the caller already holds (`live.engine.holding`, `apply_held`).

The caller's thread traces one thread of the target and holds it at a system
call exit stop; the engine stops the other threads, applies, lets them go, and
leaves the held thread stopped and ours. The completed call's result must
survive the remote system calls made from that thread: a read() that returned
a command line must not be run again (the line would be lost).
"""

from __future__ import annotations

import pytest

from micropatch import live
from micropatch.errors import AlreadyApplied
from micropatch.live.engine import apply_held, holding
from micropatch.process import ptrace
from micropatch.process.linux import PTRACE_O_TRACESYSGOOD
from micropatch.process.procfs import read_status
from micropatch.process.tracing import next_stop, syscall_info
from micropatch.process.world import wait_stop

from .patching import make_patch

FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
NR_READ = 0


def _hold_at_read_exit(t) -> int:
    """Seize the main thread (blocked in read() of its command line), send a command,
    and hold the thread at the read's exit stop; returns the read's result."""
    pid = t.pid
    ptrace.seize(pid, PTRACE_O_TRACESYSGOOD)
    ptrace.interrupt(pid)
    stop = None
    status = wait_stop(pid, pid)
    assert status is not None
    sent = False
    for _ in range(20):
        stop = next_stop(pid, pid, stop, 5)
        info = syscall_info(pid) if stop.syscall else None
        if info is not None and info.entry and info.nr == NR_READ and not sent:
            t.send("call 65")
            sent = True
        elif info is not None and not info.entry and sent:
            return info.result
    raise AssertionError("never saw the read() complete")


@pytest.mark.parametrize("name", ["vuln_pie", "blocker"])
def test_apply_in_a_held_syscall_exit_stop(targets, start, name) -> None:
    """vuln_pie: one thread, held; blocker: a second thread, blocked in read(), is
    stopped by the engine and let go."""
    t = start(name)
    patch = make_patch(targets.path(name), [FIX])
    got = _hold_at_read_exit(t)
    assert got == len("call 65\n")
    with holding(t.pid, [t.pid]) as proc:
        outcome = apply_held(patch, proc)
        assert outcome.sites == 1 and outcome.action == "applied"
        with pytest.raises(AlreadyApplied):
            apply_held(patch, proc)
    # still held by us, stopped, with the registers the transaction decided
    assert read_status(t.pid).tracer_pid != 0
    ptrace.detach(t.pid)
    assert t.readline() == "-1"  # the line read before the stop was not lost
    assert t.cmd("call 10") == "10"
    assert [s.patch_id for s in live.status(t.pid)] == ["test-fix"]
    if name == "blocker":
        assert t.cmd("feed hello") == "read hello"  # the other thread's read() unharmed

"""Fault injection for the crash-safety tests: an internal hook, not an option.

`checkpoint(point)` kills the calling process with SIGKILL, for real, when a test
armed that point: MICROPATCH_FAULT names it *and* MICROPATCH_FAULT_ARMED is
"for-tests" (`environment(point)` gives both). The second switch exists so that
a stray MICROPATCH_FAULT in an operator's environment can never kill an agent or
a patcher: nothing but a test sets both. `environment(point, action="stop")`
makes the process stop itself there (SIGSTOP, MICROPATCH_FAULT_ACTION) instead:
a patcher frozen at that point, for the stop watchdog's tests
(process/watchdog.py).

Every point is listed here, in POINTS, with what has happened when it is reached;
`tests/unit/test_faults.py` checks that each `checkpoint(...)` in the source names
one and that each one is reached by some call. A point may carry `{index}` (the
patchlet's site number): `checkpoint("jump-{index}-written", index=0)` is the
point "jump-0-written". An armed name that is no point at all is refused at the
first checkpoint (ValueError), so a typo in a test fails at once instead of
never firing.
"""

from __future__ import annotations

import os
import re
import signal
import threading

VARIABLE = "MICROPATCH_FAULT"
ARM_VARIABLE = "MICROPATCH_FAULT_ARMED"
ARMED = "for-tests"
ACTION_VARIABLE = "MICROPATCH_FAULT_ACTION"
ACTIONS = ("kill", "stop")

POINTS: dict[str, str] = {
    # live/ (docs/engine.md, "Crash consistency"; tests/integration/test_crash.py)
    "stopped": "every thread of the target stopped, recovery done, nothing written",
    "memfd-created": "the cave's memfd created in the target, not yet mapped",
    "cave-mapped": "the cave mapped in the target, its registry page not yet writable",
    "cave-ready": "the patch's cave exists (new or reused), no trampoline written",
    "trampolines-written": "the trampolines written into the cave, no jump yet",
    "intent-recorded": "the registry records the change as in progress",
    "threads-moved": "threads moved to the other copy of their displaced instruction",
    "jump-{index}-written": "the jump over site INDEX written (sites before it too)",
    "site-{index}-restored": "site INDEX has its original bytes again (removal)",
    "committed": "the registry records the change as done; nothing reclaimed or verified yet",
    "cave-unmapped": "an emptied cave unmapped from the target",
    "write-{index}": "the INDEXth write of a stop of every thread done (live/transaction.py)",
    "lone-write-{index}": "the INDEXth write of a stop of one borrowed thread done",
    # process/syscall.py: a remote system call in a borrowed thread
    "syscall-borrowed": "a thread's registers replaced to make a remote system call",
    "syscall-entered": "the borrowed thread stopped at the call's entry",
    # agent/newproc.py: new processes held at exec or at a library load
    "newproc-exec-held": "an exec held by fanotify, the process seized, not yet allowed",
    "newproc-exec-stopped": "the new image stopped at its exec event",
    "newproc-load-following": "a library open() returned; following the loader's mmap calls",
    # runtimes/cpython/ (docs/python-patches.md; tests/integration/cpython/test_crash.py)
    "py-memfd-created": "the interpreter page's memfd created in the target, not yet mapped",
    "py-page-mapped": "the interpreter page mapped, not yet filled",
    "py-page-ready": "the interpreter page written (runner and registry), nothing armed",
    "py-operation-written": "the operation and its sequence written into the page, not armed",
    "py-armed": "the page says ARMED (the operation ready to run), no thread sent to run it",
    "py-queued": "the pending call queued in the interpreter",
    "py-hijacked": "a parked thread's registers pointed at the runner",
    "py-resumed": "the stop ended with a thread sent to the runner; its result not yet read",
    # server/ (docs/server.md; tests/integration/test_server_crash.py)
    "publish-stored": "a published artifact's file stored, the database not committed",
    "repository-targets-written": "the TUF repository's targets.json written",
    "repository-snapshot-written": "the TUF repository's snapshot.json written",
    "repository-timestamp-written": "the TUF repository's timestamp.json written",
    "publish-committed": "a publish committed in the database",
    "revoke-committed": "a revocation committed in the database",
    "policy-written": "a policy change written in the transaction, not committed",
    "policy-committed": "a policy change committed",
}


def environment(point: str, action: str = "kill") -> dict[str, str]:
    """The environment variables that make a process die (or stop: `action`) at
    `point` (for tests)."""
    if not known(point):
        raise ValueError(_unknown(point))
    if action not in ACTIONS:
        raise ValueError(f"fault action {action!r}: one of {', '.join(ACTIONS)}")
    return {VARIABLE: point, ARM_VARIABLE: ARMED, ACTION_VARIABLE: action}


def known(name: str) -> bool:
    """Whether `name` is a point, its `{index}` given as a number ("jump-0-written")."""
    return any(_pattern(p).fullmatch(name) for p in POINTS)


def checkpoint(point: str, *, index: int | None = None) -> None:
    """Die here, at once and without cleanup (or stop here, SIGSTOP), if a test armed
    this point."""
    wanted = os.environ.get(VARIABLE)
    if wanted is None or os.environ.get(ARM_VARIABLE) != ARMED:
        return
    if point not in POINTS:
        raise ValueError(f"checkpoint({point!r}): not a fault point in micropatch.faults.POINTS")
    if not known(wanted):
        raise ValueError(_unknown(wanted))
    if wanted == (point if index is None else point.format(index=index)):
        if os.environ.get(ACTION_VARIABLE) == "stop":
            # To this thread: it takes the stop itself, on its way out of tgkill. A
            # signal to the process may be taken by another thread, a moment later,
            # while this one (real-time in a stop) goes on and ends the stop first.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        else:
            os.kill(os.getpid(), signal.SIGKILL)


def _pattern(point: str) -> re.Pattern[str]:
    return re.compile(re.escape(point).replace(re.escape("{index}"), r"\d+"))


def _unknown(name: str) -> str:
    return f"{VARIABLE}={name!r} names no fault point; the points are: {', '.join(POINTS)}"

"""`dev run`: start a program with a patch applied from its first instruction.

The program is spawned under ptrace and stopped at its entry point (every
library it links against is mapped by then). If the patch's module is there,
the patch is applied at once; otherwise the dynamic linker's debug hook
(r_debug.r_brk) is watched until the module is loaded by dlopen. To apply,
the program is handed over to the live engine, unchanged: every thread is
detached into a group stop, `apply` seizes and patches it like any running
process, and SIGCONT lets it go. Just before the program exits, its blocked
counters are read (the leader is seized with PTRACE_O_TRACEEXIT).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from micropatch.errors import MicropatchError
from micropatch.live.engine import Outcome, apply
from micropatch.live.mapped import module_groups
from micropatch.live.states import PatchState, status
from micropatch.process import ptrace
from micropatch.process.launch import Breakpoint, Exit, Launched, spawn
from micropatch.process.linux import (
    PTRACE_EVENT_EXIT,
    PTRACE_EVENT_STOP,
    PTRACE_LISTEN,
    PTRACE_O_TRACEEXIT,
    PTRACE_SEIZE,
    WALL,
)
from micropatch.process.maps import read_maps
from micropatch.trust.admission import Admitted

AT_ENTRY_WHEN = "at entry"


@dataclass
class Applied:
    when: str  # "at entry", or "after dlopen loaded MODULE"
    outcome: Outcome
    states: list[PatchState]


@dataclass
class DevRun:
    exit: Exit
    module: str | None = None
    applied: Applied | None = None
    error: MicropatchError | None = None  # the patch could not be applied
    killed: bool = False  # killed by us because the patch could not be applied
    blocked: dict[str, int | None] = field(default_factory=dict)  # patch id -> at exit


def run(
    argv: list[str],
    patch: Admitted | None,
    *,
    keep_going: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> DevRun:
    """Run argv to its end, with `patch` applied as early as possible.

    SIGINT and SIGTERM sent to us go to the program (^C from a terminal reaches it
    directly too): we wait for it to end and report its status; SIGKILL of us
    kills it (PR_SET_PDEATHSIG, PTRACE_O_EXITKILL)."""
    child: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        for pid in child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(argv, patch, keep_going, say, child)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(
    argv: list[str],
    patch: Admitted | None,
    keep_going: bool,
    say: Callable[[str], None],
    child: list[int],
) -> DevRun:
    program = spawn(argv)
    child.append(program.pid)
    if program.exit is not None:
        return DevRun(program.exit)
    if patch is None:
        ptrace.detach(program.pid)
        return DevRun(program.wait())
    module = patch.patch.target.module
    result = DevRun(Exit(None, None), module)
    try:
        stopped, when, at = _until_loaded(program, module, say)
        if stopped is None:  # the program ended first
            result.exit = program.wait()
            return result
        program.handover(stopped, at)
    except BaseException:
        program.kill()
        raise
    try:
        outcome = apply(patch, program.pid)
    except MicropatchError as e:
        result.error = e
        if not keep_going:
            result.killed = True
            result.exit = program.kill()
            return result
    else:
        result.applied = Applied(when, outcome, _states(program.pid, patch.id))
    watching = _watch_exit(program.pid)
    os.kill(program.pid, signal.SIGCONT)
    if watching:
        result.blocked = _until_exit(program.pid, patch.id)
    result.exit = program.wait()
    return result


def _until_loaded(
    program: Launched, module: str, say: Callable[[str], None]
) -> tuple[int | None, str, int]:
    """Run to the entry point, then on to the load of `module` if needed; follow
    exec (a wrapper script's `exec PROGRAM`) back to the new program's entry."""
    while True:
        entry = Breakpoint(program.entry())
        stopped = program.run_until(entry, lambda: True)
        if program.execed:
            continue
        if stopped is None or _mapped(program.pid, module):
            return stopped, AT_ENTRY_WHEN, entry.address
        say(f"{module} is not loaded at entry: watching the dynamic linker for it")
        hook = Breakpoint(program.debug_hook())
        stopped = program.run_until(hook, lambda: _mapped(program.pid, module))
        if not program.execed:
            return stopped, f"after dlopen loaded {module}", hook.address


def _mapped(pid: int, module: str) -> bool:
    return bool(module_groups(read_maps(pid), module))


def _states(pid: int, patch_id: str) -> list[PatchState]:
    with contextlib.suppress(MicropatchError):
        return [s for s in status(pid) if s.patch_id == patch_id]
    return []


def _watch_exit(pid: int) -> bool:
    """Seize the (group-stopped) leader so that its exit stops it once more."""
    try:
        ptrace.request(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACEEXIT)
    except OSError:
        return False
    return True


def _until_exit(pid: int, patch_id: str) -> dict[str, int | None]:
    """Pass every stop through until the leader exits; then the blocked counters."""
    blocked: dict[str, int | None] = {}
    while True:
        try:
            _, wait_status = os.waitpid(pid, WALL)
        except ChildProcessError:
            return blocked
        if not os.WIFSTOPPED(wait_status):
            return blocked
        sig, event = os.WSTOPSIG(wait_status), wait_status >> 16
        try:
            if event == PTRACE_EVENT_EXIT:
                for s in _states(pid, patch_id):
                    blocked[s.patch_id] = getattr(s, "blocked", None)
                ptrace.detach(pid)
                return blocked
            if event == PTRACE_EVENT_STOP:
                if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
                    ptrace.request(PTRACE_LISTEN, pid, 0, 0)  # a group stop: stay stopped
                else:
                    ptrace.cont(pid)
            else:
                ptrace.cont(pid, sig)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise


__all__ = ["Applied", "DevRun", "Launched", "run"]

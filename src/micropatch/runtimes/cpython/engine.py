"""apply, remove and update of CPython patches: one operation on one process.

Under the process's lock (`live.lock`, shared with the native engine), an
operation is armed in a stop (`arming`), run by a thread of the target at a
safe point while every thread runs, and awaited here by reading the page's
state word. It returns once the state is terminal: COMMITTED (the patch is in
force: every later call runs the new code) or a failure, after which nothing
was changed. If no thread claims it before the deadline (a C extension that
holds the GIL forever, threads blocked where we may not send them), the
operation is cancelled in a stop (ARMED -> CANCELLED, or PREPARING ->
CANCELLING, which the trampoline's compare-and-swap honours) and NoSafePoint
says where every thread was.
"""

from __future__ import annotations

import logging
import marshal
import os
import time
from dataclasses import dataclass
from typing import Any

from micropatch.errors import (
    AlreadyApplied,
    CodeMismatch,
    Downgrade,
    InterpreterError,
    MicropatchError,
    ModuleNotImported,
    NoSafePoint,
    NotApplied,
    PatchRefused,
    ProcessExited,
    ProcessNotFound,
)
from micropatch.faults import checkpoint
from micropatch.live.lock import queued
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.process.procfs import check_alive, started_at
from micropatch.process.world import STOP_TIMEOUT, stop_world
from micropatch.runtimes.base import Outcome
from micropatch.runtimes.cpython import arming
from micropatch.runtimes.cpython import page as P
from micropatch.runtimes.cpython.build import helper_text
from micropatch.runtimes.cpython.imports import read_modules
from micropatch.runtimes.cpython.interpreter import Interpreter, find_interpreter
from micropatch.trust.admission import AdmittedPython

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds for a thread to reach a safe point and the runner to finish
FIRST_WAIT = 0.002  # between looks at the state word, doubled up to MAX_WAIT
MAX_WAIT = 0.05
RESTOP_AFTER = 0.1  # unclaimed this long: stop again, look again, poke the eval breaker
COMMIT_GRACE = 2.0  # a claimed operation this much past the deadline is cancelled


@dataclass(frozen=True)
class _Operation:
    pid: int
    op: str  # "apply", "remove", "update"
    patch_id: str
    version: int | None
    request: dict[str, Any]
    functions: int


def apply(
    patch: AdmittedPython, pid: int, *, timeout: float = DEFAULT_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Outcome:  # fmt: skip
    """Replace the code of every function the patch changes in process `pid`, all
    at once under the GIL, after checking the module and each function's code;
    returns once the patch is in force."""
    request = {"op": "apply", "patch": _patch_request(patch)}
    count = len(patch.patch.patchlets)
    operation = _Operation(pid, "apply", patch.id, patch.version, request, count)
    return _run(operation, timeout, stop_timeout)


def update(
    patch: AdmittedPython, pid: int, *, timeout: float = DEFAULT_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Outcome:  # fmt: skip
    """Replace the applied, older version of `patch.id` by this one, in one commit."""
    request = {"op": "update", "patch": _patch_request(patch), "remove": patch.id}
    count = len(patch.patch.patchlets)
    operation = _Operation(pid, "update", patch.id, patch.version, request, count)
    return _run(operation, timeout, stop_timeout)


def remove(
    patch_id: str, pid: int, *, timeout: float = DEFAULT_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Outcome:  # fmt: skip
    """Give every function the patch changed its original code object back."""
    operation = _Operation(pid, "remove", patch_id, None, {"op": "remove", "remove": patch_id}, 0)
    return _run(operation, timeout, stop_timeout)


def _patch_request(patch: AdmittedPython) -> dict[str, Any]:
    payload = patch.artifact.payload
    return {
        "id": patch.id, "version": patch.version, "title": payload.patch.title or "",
        "module": payload.module.name, "sha256": payload.module.sha256,
        "python": payload.python.version, "magic": payload.python.magic,
        "functions": [
            {"at": f.at, "expect": f.expect, "patched": f.patched, "code": f.code_bytes,
             "blocked": f.blocked}
            for f in sorted(payload.functions, key=lambda f: f.patchlet)
        ],
    }  # fmt: skip


def runner_source(page: P.Page) -> bytes:
    call = f"\n_run(page, {P.INPUT - P.HEADER}, {P.H_INPUT_LEN}, {P.H_KIND})\n"
    return (helper_text("codeid.py", "runner.py") + call).encode("utf-8")


def _run(operation: _Operation, timeout: float, stop_timeout: float) -> Outcome:
    try:
        with queued(operation.pid):
            return _attempts(operation, timeout, stop_timeout)
    except ProcessNotFound:
        raise ProcessExited(f"process {operation.pid} exited during the operation") from None
    except MicropatchError as e:
        e.within(pid=operation.pid, patch_id=operation.patch_id)
        raise


def _attempts(operation: _Operation, timeout: float, stop_timeout: float) -> Outcome:
    pid = operation.pid
    check_alive(pid)
    mappings = read_maps(pid)
    with Memory(pid, writable=False) as memory:
        interpreter = find_interpreter(pid, mappings, memory)
        _precheck(operation, interpreter, memory)
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    paused, attempts, sequence, entered = 0.0, 0, 0, ""
    page: P.Page | None = None
    where: list[Any] = []
    while True:
        attempts += 1
        with stop_world(pid, timeout=stop_timeout) as proc:
            mappings = read_maps(pid)
            interp, states, where, regs = arming.survey(proc, mappings, interpreter)
            if page is None:
                page = arming.page_for(proc, mappings, interpreter)
                _settle(proc.memory, page, pid, regs, proc)
                sequence = page.read_u32(proc.memory, P.H_SEQUENCE) + 1
                request = {**operation.request, "offsets": page.offsets(), "now": time.time()}
                arming.write_operation(proc, page, runner_source(page), marshal.dumps(request),
                                       sequence)  # fmt: skip
            if page.state(proc.memory) == P.ARMED:
                entered = arming.send_thread(proc, interpreter, page, interp, states, where, regs)
        paused += proc.paused
        checkpoint("py-resumed")
        state = _wait(pid, page, min(deadline, time.monotonic() + RESTOP_AFTER))
        if state == P.ARMED and time.monotonic() < deadline:
            continue  # not claimed yet: look at the threads again
        if state not in P.TERMINAL and state != P.ARMED:
            state = _wait(pid, page, deadline + COMMIT_GRACE)  # claimed: let it finish
        if state not in P.TERMINAL:
            _cancel(pid, page, interpreter, where, timeout, stop_timeout)  # raises if cancelled
            state = _wait(pid, page, time.monotonic() + COMMIT_GRACE)
        if state not in P.TERMINAL:
            raise PatchRefused(
                f"process {pid}: the operation is still committing after the deadline; "
                "`micropatch status` shows whether it took effect"
            )
        break
    waited = time.perf_counter() - start
    with Memory(pid, writable=False) as memory:
        result = page.result(memory)
    if state != P.COMMITTED:
        raise _failure(operation, state, result)
    action = {"apply": "applied", "remove": "removed", "update": "updated"}[operation.op]
    log.info("process %d: %s %s in %.1f ms (%s), paused %.2f ms", pid, action,
             operation.patch_id, waited * 1e3, entered, paused * 1e3)  # fmt: skip
    return Outcome(pid, operation.patch_id, action, operation.version, int(result.get("swaps", 0)),
                   attempts, paused, 0, entered, waited)  # fmt: skip


def _precheck(operation: _Operation, interpreter: Interpreter, memory: Memory) -> None:
    """What can be refused from the interpreter's memory, before anything is mapped
    or run in it: a patch compiled for another Python version; on apply, a module not
    imported (if sys.modules cannot be read, the runner checks, as it checks all)."""
    patch = operation.request.get("patch")
    if patch is None:
        return
    pid = operation.pid
    if interpreter.minor != patch["python"]:
        raise InterpreterError(
            f"process {pid}: this is Python {interpreter.minor} ({interpreter.version}); the "
            f"patch was compiled for {patch['python']}; nothing was changed",
            pid=pid,
        )
    if operation.op != "apply":
        return
    try:
        modules = read_modules(interpreter, memory, (patch["module"],))
    except MicropatchError as e:
        log.debug("process %d: sys.modules not read (%s): the runner checks", pid, e)
        return
    if patch["module"] not in modules:
        raise ModuleNotImported(
            f"process {pid}: module {patch['module']} is not imported (read from its "
            "sys.modules); apply again once it is; nothing was changed",
            pid=pid,
            module=patch["module"],
        )


def _wait(pid: int, page: P.Page, until: float) -> int:
    """The state word once it is terminal, or as it is at `until`."""
    delay = FIRST_WAIT
    with Memory(pid, writable=False) as memory:
        while True:
            try:
                state = page.state(memory)
            except MicropatchError:
                check_alive(pid)
                raise
            if state in P.TERMINAL or time.monotonic() >= until:
                return state
            time.sleep(delay)
            delay = min(delay * 2, MAX_WAIT)


def _settle(memory: Memory, page: P.Page, pid: int, regs: dict[int, Any], proc: Any) -> None:
    """A previous operation still in flight (a killed patcher's, or one we gave up
    on): armed and unclaimed, it is cancelled; claimed by a runner that no thread
    is running any more (the process forked meanwhile), it is failed; claimed by
    a running one, we cannot go on."""
    state = page.state(memory)
    if state in P.TERMINAL:
        return
    if state == P.ARMED:
        page.write_u32(memory, P.H_STATE, P.CANCELLED)
        log.info("process %d: cancelled an operation a killed patcher left armed", pid)
        return
    running = arming.in_trampoline(proc, page, regs)
    if not running:
        page.write_u32(memory, P.H_STATE, P.FAILED)
        log.info("process %d: an operation no thread runs any more was marked failed", pid)
        return
    raise PatchRefused(
        f"process {pid}: a previous operation is still running in the interpreter (thread "
        f"{', '.join(map(str, running))}, state {P.STATE_NAMES[state]}); try again later",
        pid=pid,
    )


def _cancel(
    pid: int, page: P.Page, interpreter: Interpreter, where: list[Any], timeout: float,
    stop_timeout: float,
) -> None:  # fmt: skip
    """The deadline passed: cancel in a stop, so that nothing changes later."""
    with stop_world(pid, timeout=stop_timeout) as proc:
        state = page.state(proc.memory)
        if state == P.ARMED:
            page.write_u32(proc.memory, P.H_STATE, P.CANCELLED)
        elif state == P.PREPARING:
            page.write_u32(proc.memory, P.H_STATE, P.CANCELLING)
        else:
            return  # terminal meanwhile, or committing: the caller reads it again
    threads = "; ".join(f"thread {w.tid}{' (main)' if w.main else ''}: {w.why}" for w in where)
    raise NoSafePoint(
        f"process {pid} (CPython {interpreter.version}): no thread reached a point where Python "
        f"code may run within {timeout:g} s ({threads}); nothing was changed. A C extension "
        "may hold the GIL, or every thread waits where micropatch may not interrupt it; try "
        "again, or allow longer with --timeout",
        pid=pid,
    )


_ERRORS: dict[str, type[MicropatchError]] = {
    "not-imported": ModuleNotImported,
    "no-source": CodeMismatch,
    "source-mismatch": CodeMismatch,
    "code-mismatch": CodeMismatch,
    "not-found": CodeMismatch,
    "not-a-function": CodeMismatch,
    "already-applied": AlreadyApplied,
    "downgrade": Downgrade,
    "not-applied": NotApplied,
    "interpreter": InterpreterError,
}


def _failure(operation: _Operation, state: int, result: dict[str, Any]) -> MicropatchError:
    pid = operation.pid
    kind = str(result.get("error", ""))
    message = str(result.get("message", f"the operation ended {P.STATE_NAMES[state]}"))
    if state == P.BROKEN:
        return PatchRefused(
            f"process {pid}: the commit and its rollback were both refused inside the "
            f"interpreter ({message}): some functions may be changed; check `micropatch status`"
        )
    hints = {
        "not-imported": "; apply again once it is",
        "already-applied": "; use `micropatch update` to replace it",
        "source-mismatch": _replaced(pid, result.get("path")),
    }
    cls = _ERRORS.get(kind, PatchRefused)
    return cls(f"process {pid}: {message}{hints.get(kind, '')}; nothing was changed", pid=pid)


def _replaced(pid: int, path: object) -> str:
    """Why a module's file may not be what the process runs: it changed after the
    process started (an upgrade on disk without a restart). "" if not, or unknown."""
    if not isinstance(path, str):
        return ""
    try:
        changed = os.stat(f"/proc/{pid}/root{path}").st_mtime
        started = started_at(pid)
    except (OSError, MicropatchError):
        return ""
    if changed <= started + 1:  # the boot time is in whole seconds
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(changed))
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    return (
        f"; the file changed at {when}, after the process started ({since}): the process "
        "may run the code it imported before, but a patch is checked against the module's "
        "file as it is now (build it for that file, or restart the process)"
    )


def repair(pid: int, *, stop_timeout: float = STOP_TIMEOUT) -> list[str]:
    """Finish what a killed patcher left in an interpreter: an operation armed and never
    claimed is cancelled, one no thread runs any more marked failed, a page never
    initialized unmapped, a leftover descriptor closed. What was done."""
    done = []
    with queued(pid):
        check_alive(pid)
        mappings = read_maps(pid)
        pages = P.find_pages(mappings)
        if not pages:
            return []
        with Memory(pid, writable=False) as memory:
            interpreter = find_interpreter(pid, mappings, memory)
        with stop_world(pid, timeout=stop_timeout) as proc:
            before = len(P.find_pages(mappings))
            page = arming.page_for(proc, mappings, interpreter)
            if before > 1:
                done.append(f"unmapped {before - 1} page(s) a killed patcher never initialized")
            state = page.state(proc.memory)
            regs = {tid: proc.regs(tid) for tid in proc.threads}
            _settle(proc.memory, page, pid, regs, proc)
            after = page.state(proc.memory)
            if after != state:
                done.append(
                    f"an interrupted Python operation: {P.STATE_NAMES[state]} -> "
                    f"{P.STATE_NAMES[after]} (nothing of it took effect)"
                )
    return done

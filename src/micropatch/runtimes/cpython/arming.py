"""Inside one stop of an interpreter: arm the operation and send a thread to it.

With every thread stopped (`process.world.stop_world`), and never waiting for
anything of the target's:
1. classify each thread (`parking.classify`) from the registers it stopped with;
2. find the page, or map it (`mapping`), unmapping a page a killed patcher
   never initialized and closing its leftover descriptors;
3. settle a previous operation left in flight (`settle`);
4. write the runner, the operation, then the state word ARMED (first attempt);
5. get a thread to run it, in order of preference:
   - a parked thread (not the main one if another is parked: signal handlers
     run in the main thread) gets a frame on its stack and is sent to the
     trampoline's `hijack` entry, its system call to return EINTR after;
   - else the trampoline's `pending` entry is queued as a pending call (once:
     never a second entry of ours), and the eval breaker set; a main thread
     waiting on a lock from CPython gets EINTR, which makes it run pending calls.
Resuming the threads is the caller's; the thread takes the GIL with the world
running.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from micropatch.arch.x86_64.abi import FRAME_REGS, FRAME_SIZE, UserRegs
from micropatch.arch.x86_64.constants import RED_ZONE
from micropatch.errors import InterpreterError
from micropatch.faults import checkpoint
from micropatch.process import ptrace
from micropatch.process.maps import Mapping, read_maps
from micropatch.process.syscall import RemoteSyscalls
from micropatch.process.world import StoppedProcess
from micropatch.runtimes.cpython import page as P
from micropatch.runtimes.cpython import pending
from micropatch.runtimes.cpython.interpreter import Interpreter, ThreadState
from micropatch.runtimes.cpython.mapping import create_page, leftover_descriptors, usable_page
from micropatch.runtimes.cpython.parking import EINTR, Libc, Where, classify

log = logging.getLogger(__name__)

_MINUS_ONE = (1 << 64) - 1


@dataclass
class Armed:
    """What one stop did."""

    page: P.Page
    sequence: int
    entered: str = ""  # "pending call", "thread N (parked in ...)": how it will run
    threads: list[Where] = field(default_factory=list)


def find_libc(proc: StoppedProcess, mappings: list[Mapping], interpreter: Interpreter) -> Libc:
    errno_at = interpreter.functions["__errno_location"]
    for m in mappings:
        if m.executable and m.contains(errno_at):
            first = next(x for x in mappings if x.inode == m.inode and x.offset == 0)
            return Libc(proc.memory, mappings, first.start, m.name)
    raise InterpreterError(f"process {proc.pid}: the C library's mapping is gone")


def survey(
    proc: StoppedProcess, mappings: list[Mapping], interpreter: Interpreter
) -> tuple[int, list[ThreadState], list[Where], dict[int, UserRegs]]:
    """The main interpreter, its thread states, and where every thread is."""
    memory = proc.memory
    interp = interpreter.main_interpreter(memory)
    states = interpreter.threads(memory, interp)
    holder = interpreter.gil_holder(memory, interp)
    main_id = interpreter.main_thread_id(memory)
    libc = find_libc(proc, mappings, interpreter)
    by_native = {t.native_id: t for t in states}
    regs = {tid: proc.regs(tid).copy() for tid in sorted(proc.threads)}
    where = []
    for tid, r in regs.items():
        tstate = by_native.get(tid)
        main = tstate is not None and tstate.thread_id == main_id
        where.append(classify(interpreter, memory, mappings, libc, tid, r, tstate, main, holder))
    return interp, states, where, regs


def page_for(proc: StoppedProcess, mappings: list[Mapping], interpreter: Interpreter) -> P.Page:
    """The initialized page, mapping one if needed (and cleaning up after a killed
    patcher). Remote system calls only when there is something to do."""
    memory = proc.memory
    pages = P.find_pages(mappings)
    clean = len(pages) == 1 and P.Page(pages[0]).initialized(memory)
    if clean and not leftover_descriptors(proc.pid):
        return P.Page(pages[0])
    syscalls = RemoteSyscalls(proc, mappings)
    try:
        page = usable_page(syscalls, mappings)
        if page is None:
            page = create_page(syscalls, read_maps(proc.pid), interpreter)
        return page
    finally:
        syscalls.close()


def write_operation(
    proc: StoppedProcess, page: P.Page, payload: bytes, request: bytes, sequence: int
) -> None:
    """The runner and the operation, then ARMED: from here a thread may run it."""
    memory = proc.memory
    if len(payload) >= P.PAYLOAD_SIZE or len(request) > P.INPUT_SIZE:
        raise InterpreterError("the patch is too large for the interpreter page")
    memory.write(page.at(P.PAYLOAD), payload + b"\0")
    memory.write(page.at(P.INPUT), request)
    page.write_u32(memory, P.H_INPUT_LEN, len(request))
    page.write_u32(memory, P.H_PREPARED, 0)
    page.write_u32(memory, P.H_RESULT_LEN, 0)
    page.write_u32(memory, P.H_SEQUENCE, sequence)
    checkpoint("py-operation-written")
    page.write_u32(memory, P.H_STATE, P.ARMED)
    checkpoint("py-armed")


def send_thread(
    proc: StoppedProcess,
    interpreter: Interpreter,
    page: P.Page,
    interp: int,
    states: list[ThreadState],
    where: list[Where],
    regs: dict[int, UserRegs],
) -> str:
    """Get a thread to run the armed operation; how, for messages ("" if none can)."""
    memory = proc.memory
    parked = sorted((w for w in where if w.parked), key=lambda w: (w.main, w.tid))
    if parked:
        chosen = parked[0]
        _hijack(proc, page, chosen.tid, regs[chosen.tid])
        checkpoint("py-hijacked")
        return f"thread {chosen.tid} ({chosen.why})"
    entry = page.at(P.CODE)
    if not pending.queued(interpreter, memory, interp, entry):
        if not pending.queue(interpreter, memory, interp, entry, states):
            return ""
        checkpoint("py-queued")
    else:
        pending.poke(interpreter, memory, interp, states)
    for w in where:
        if w.lock_wait and w.main:
            _interrupt(proc, w.tid, regs[w.tid])
            return f"a pending call, run by the main thread {w.tid} woken from its lock wait"
    return "a pending call"


def _hijack(proc: StoppedProcess, page: P.Page, tid: int, regs: UserRegs) -> None:
    """Send a parked thread to `hijack`: its registers, with EINTR as its system
    call's result, go in a frame below its red zone, which the trampoline pops."""
    resume = regs.copy()
    resume.rax = -EINTR & _MINUS_ONE
    frame = regs.rsp - RED_ZONE - FRAME_SIZE
    values = [getattr(resume, name) for name in FRAME_REGS]
    proc.memory.write(frame, struct.pack(f"<{len(values)}Q", *values))
    sent = regs.copy()
    sent.rip = page.address + page.read_u32(proc.memory, P.H_HIJACK)
    sent.rsp = frame
    sent.orig_rax = _MINUS_ONE  # no kernel restart of the interrupted call
    _set(proc, tid, sent)
    log.debug("process %d: thread %d sent to the trampoline", proc.pid, tid)


def _interrupt(proc: StoppedProcess, tid: int, regs: UserRegs) -> None:
    """A main thread waiting on a lock: its futex wait returns EINTR."""
    interrupted = regs.copy()
    interrupted.rax = -EINTR & _MINUS_ONE
    interrupted.orig_rax = _MINUS_ONE
    _set(proc, tid, interrupted)


def _set(proc: StoppedProcess, tid: int, regs: UserRegs) -> None:
    """New registers that stay when the thread is let go (not the stop's)."""
    ptrace.set_regs(tid, regs)
    thread = proc.threads[tid]
    thread.saved_regs = regs
    thread.regs_dirty = True


def in_trampoline(proc: StoppedProcess, page: P.Page, regs: dict[int, UserRegs]) -> list[int]:
    """Threads executing the page's code or with a return address into it on their
    stack (a runner in progress): read from each stack up to its mapping's end."""
    low, high = page.address, page.address + P.HEADER
    mappings = read_maps(proc.pid)
    found = []
    for tid, r in regs.items():
        if low <= r.rip < high:
            found.append(tid)
            continue
        stack = next((m for m in mappings if m.contains(r.rsp)), None)
        if stack is None:
            continue
        data = proc.memory.read(r.rsp & ~7, min(stack.end - (r.rsp & ~7), 8 << 20))
        words = struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8])
        if any(low <= w < high for w in words):
            found.append(tid)
    return found

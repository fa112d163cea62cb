"""Queueing a pending call in a stopped interpreter, as `Py_AddPendingCall` would.

Written with every thread stopped, and only when no thread holds the queue's
lock (3.11/3.12: a semaphore whose count is 1 when free; 3.13: a PyMutex
whose byte is 0): then no thread is inside the queue's critical section, and
each resumes to see the entry whole. The eval breaker is set as
`SIGNAL_PENDING_CALLS` sets it: the next thread that checks it (3.11: only
the main thread) calls the function between two bytecodes, with the GIL.

A thread stopped halfway through recomputing the eval breaker may overwrite
our bit when it resumes; the pending flag stays set, and the engine, seeing
the operation not claimed after a while, stops the process and sets the bit
again (`poke`).
"""

from __future__ import annotations

import struct

from micropatch.process.memory import Memory
from micropatch.runtimes.cpython.interpreter import Interpreter, ThreadState

_SEM_FREE = 1


def _u32(memory: Memory, address: int) -> int:
    value: int = struct.unpack("<I", memory.read(address, 4))[0]
    return value


def lock_free(interpreter: Interpreter, memory: Memory, interp: int) -> bool:
    lay = interpreter.layout
    if lay.pending_mutex is not None:
        return memory.read(interp + lay.pending_mutex, 1) == b"\0"
    assert lay.pending_lock is not None
    sem = interpreter.pointer(memory, interp + lay.pending_lock)
    return bool(sem) and _u32(memory, sem) == _SEM_FREE  # glibc: the count, low 32 bits


def _entries(interpreter: Interpreter, memory: Memory, interp: int) -> tuple[int, int, int]:
    """first, last (3.13: next), and how many are queued."""
    lay = interpreter.layout
    first = _u32(memory, interp + lay.pending_first)
    last = _u32(memory, interp + lay.pending_last)
    if lay.pending_count is not None:
        return first, last, _u32(memory, interp + lay.pending_count)
    return first, last, (last - first) % lay.pending_size


def queued(interpreter: Interpreter, memory: Memory, interp: int, function: int) -> bool:
    """Whether a call of `function` waits in the queue."""
    lay = interpreter.layout
    first, _last, count = _entries(interpreter, memory, interp)
    for i in range(count):
        slot = interp + lay.pending_calls + ((first + i) % lay.pending_size) * lay.pending_call_size
        if interpreter.pointer(memory, slot) == function:
            return True
    return False


def queue(
    interpreter: Interpreter,
    memory: Memory,
    interp: int,
    function: int,
    threads: list[ThreadState],
) -> bool:
    """Queue `function(NULL)`; False if the queue is locked or full (try later)."""
    lay = interpreter.layout
    if not lock_free(interpreter, memory, interp):
        return False
    first, last, count = _entries(interpreter, memory, interp)
    if lay.pending_max is not None:
        limit = min(_u32(memory, interp + lay.pending_max), lay.pending_size)
        if count >= limit:
            return False
    elif (last + 1) % lay.pending_size == first:
        return False
    slot = interp + lay.pending_calls + last * lay.pending_call_size
    memory.write(slot, struct.pack("<QQ", function, 0) + b"\0" * (lay.pending_call_size - 16))
    memory.write(interp + lay.pending_last, struct.pack("<I", (last + 1) % lay.pending_size))
    if lay.pending_count is not None:
        memory.write(interp + lay.pending_count, struct.pack("<I", count + 1))
    if lay.pending_flag is not None:
        memory.write(interp + lay.pending_flag, struct.pack("<I", 1))
    poke(interpreter, memory, interp, threads)
    return True


def poke(interpreter: Interpreter, memory: Memory, interp: int, threads: list[ThreadState]) -> None:
    """Set the eval breaker's pending-calls bit, where the release keeps it."""
    lay = interpreter.layout
    if lay.interp_eval_breaker is not None:
        address = interp + lay.interp_eval_breaker
        memory.write(address, struct.pack("<I", _u32(memory, address) | lay.calls_bit))
    if lay.tstate_eval_breaker is not None:
        for t in threads:
            address = t.address + lay.tstate_eval_breaker
            value = interpreter.pointer(memory, address)
            memory.write(address, struct.pack("<Q", value | lay.calls_bit))

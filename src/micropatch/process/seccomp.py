"""Predict what a target's seccomp filters do to a system call before we make it.

A filter that answers SECCOMP_RET_KILL would kill the target the moment we
made a remote `mmap` in it, so we read its filters (PTRACE_SECCOMP_GET_FILTER,
root only) and run them on the exact call first, in this small classic-BPF
interpreter.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass

from micropatch.arch.x86_64.abi import AUDIT_ARCH as AUDIT_ARCH_X86_64
from micropatch.process import ptrace
from micropatch.process.linux import (
    PTRACE_SECCOMP_GET_FILTER,
    SECCOMP_RET_ACTION_FULL,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_DATA,
)

_ACTIONS = {
    0x80000000: "kill the process",
    0x00000000: "kill the thread",
    0x00030000: "trap (SIGSYS)",
    0x00050000: "fail",
    0x7FC00000: "notify a supervisor",
    0x7FF00000: "trace",
    0x7FFC0000: "log",
    SECCOMP_RET_ALLOW: "allow",
}
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Verdict:
    action: int  # SECCOMP_RET_* action bits
    data: int  # e.g. the errno for SECCOMP_RET_ERRNO

    @property
    def allowed(self) -> bool:
        return self.action in (SECCOMP_RET_ALLOW, 0x7FFC0000)  # allow, log

    def describe(self) -> str:
        text = _ACTIONS.get(self.action, f"return {self.action:#x}")
        if self.action == 0x00050000:
            text += f" with {errno.errorcode.get(self.data, str(self.data))}"
        return text


class FilterUnreadable(Exception):
    """The kernel would not hand us the filters (not root, or not supported)."""


def read_filters(tid: int) -> list[list[tuple[int, int, int, int]]]:
    """Every filter attached to a stopped thread, newest first, as (code, jt, jf, k)."""
    filters: list[list[tuple[int, int, int, int]]] = []
    index = 0
    while True:
        try:
            count = ptrace.request(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
        except OSError as e:
            if e.errno == errno.ENOENT:  # past the last filter
                return filters
            raise FilterUnreadable(e.strerror) from None
        buf = ctypes.create_string_buffer(count * 8)
        try:
            ptrace.request(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
        except OSError as e:
            raise FilterUnreadable(e.strerror) from None
        filters.append(list(struct.iter_unpack("<HBBI", buf.raw)))
        index += 1


def _run(program: list[tuple[int, int, int, int]], data: bytes) -> int:
    a = x = 0
    mem = [0] * 16
    pc = 0
    while pc < len(program):
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls in (0, 1):  # LD, LDX
            mode = code & 0xE0
            if mode == 0x00:
                value = k
            elif mode == 0x20:
                value = struct.unpack_from("<I", data, k)[0] if k + 4 <= len(data) else 0
            elif mode == 0x60:
                value = mem[k & 15]
            elif mode == 0x80:
                value = len(data)
            else:
                raise ValueError(f"unsupported load {code:#x}")
            if cls == 0:
                a = value
            else:
                x = value
        elif cls == 2:
            mem[k & 15] = a
        elif cls == 3:
            mem[k & 15] = x
        elif cls == 4:  # ALU
            op, src = code & 0xF0, (x if code & 0x08 else k)
            a = _alu(op, a, src) & _MASK32
        elif cls == 5:  # JMP
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                pc += k
                continue
            taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
            pc += jt if taken else jf
        elif cls == 6:  # RET
            rval = code & 0x18
            return k if rval == 0x00 else (x if rval == 0x08 else a)
        else:  # MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
    raise ValueError("filter ran past its end")


def _alu(op: int, a: int, src: int) -> int:
    if op == 0x80:
        return -a
    ops = {
        0x00: lambda: a + src,
        0x10: lambda: a - src,
        0x20: lambda: a * src,
        0x30: lambda: a // src if src else 0,
        0x40: lambda: a | src,
        0x50: lambda: a & src,
        0x60: lambda: a << src,
        0x70: lambda: a >> src,
        0x90: lambda: a % src if src else 0,
        0xA0: lambda: a ^ src,
    }
    return ops[op]()


def evaluate(
    filters: list[list[tuple[int, int, int, int]]], nr: int, args: tuple[int, ...], ip: int
) -> Verdict:
    """The verdict the kernel would reach: the most restrictive of all filters."""
    padded = (*args, *([0] * (6 - len(args))))
    data = struct.pack("<iIQ6Q", nr, AUDIT_ARCH_X86_64, ip, *(v & (2**64 - 1) for v in padded))
    if not filters:
        return Verdict(SECCOMP_RET_ALLOW, 0)
    # The kernel keeps the most restrictive action: the smallest as a signed 32-bit value.
    ret = min((_run(program, data) for program in filters), key=_precedence)
    return Verdict(ret & SECCOMP_RET_ACTION_FULL, ret & SECCOMP_RET_DATA)


def _precedence(ret: int) -> int:
    action = ret & SECCOMP_RET_ACTION_FULL
    return action - (1 << 32) if action & 0x80000000 else action

"""The proc connector's messages: the kernel's wire format and the events in it.

Layouts from include/uapi/linux/netlink.h, connector.h and cn_proc.h; what
each event means is in `process.connector`, which subscribes and reads them.
"""

from __future__ import annotations

import os
import signal
import struct
from dataclasses import dataclass

# include/uapi/linux/netlink.h, connector.h, cn_proc.h
NETLINK_CONNECTOR = 11
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0x00000000
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_GID = 0x00000040
PROC_EVENT_SID = 0x00000080
PROC_EVENT_PTRACE = 0x00000100
PROC_EVENT_COMM = 0x00000200
PROC_EVENT_NONZERO_EXIT = 0x20000000
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000

# struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }
NLMSGHDR = struct.Struct("=IHHII")
# struct cn_msg { struct cb_id { u32 idx, val; } id; u32 seq; u32 ack; u16 len; u16 flags;
#                 u8 data[]; }
CN_MSG = struct.Struct("=IIIIHH")
# struct proc_event { u32 what; u32 cpu; u64 timestamp_ns __aligned(8); union event_data; }
# what and cpu fill the 8 bytes before the timestamp, so the union starts at 16, with no
# padding; cn_msg is 20 bytes, so the event starts at 16 + 20 = 36 in a netlink message
# (the kernel builds it unaligned on purpose: buffer_to_cn_msg in cn_proc.c).
PROC_EVENT_HEAD = struct.Struct("=IIQ")
# union members (pid_t is 32 bits)
ACK_DATA = struct.Struct("=I")  # err
FORK_DATA = struct.Struct("=iiii")  # parent_pid, parent_tgid, child_pid, child_tgid
EXEC_DATA = struct.Struct("=ii")  # process_pid, process_tgid
# process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid
EXIT_DATA = struct.Struct("=iiIiii")
# struct proc_input { enum proc_cn_mcast_op mcast_op; enum proc_cn_event event_type; } (6.6+)
PROC_INPUT = struct.Struct("=II")
OP = struct.Struct("=I")

NLMSG_ALIGNTO = 4

# The signals of a process that crashed rather than being stopped by someone:
# the hardware faults, abort() and a trap nobody handled.
CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP}
)

KINDS = {"exit": PROC_EVENT_EXIT, "exec": PROC_EVENT_EXEC, "fork": PROC_EVENT_FORK}


def _nlmsg_align(n: int) -> int:
    return (n + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)


@dataclass(frozen=True)
class ExitEvent:
    """A thread exited. ``pid`` is the thread, ``tgid`` its process.

    ``exit_code`` is the kernel's ``task->exit_code`` (what ``wait`` would
    report as a status); ``exit_signal`` is the signal the parent is sent
    (SIGCHLD usually, -1 for a thread that is not a group leader).
    """

    pid: int
    tgid: int
    exit_code: int
    exit_signal: int
    parent_pid: int = 0
    parent_tgid: int = 0
    timestamp_ns: int = 0

    @property
    def process_exit(self) -> bool:
        """The thread-group leader exited: the process, unless its leader
        left early with pthread_exit (then its code is the leader's own)."""
        return self.pid == self.tgid

    @property
    def signal(self) -> int | None:
        """The signal that killed it, or None if it exited by itself."""
        sig = self.exit_code & 0x7F
        return sig if sig else None

    @property
    def core_dumped(self) -> bool:
        return bool(self.exit_code & 0x80) and self.signal is not None

    @property
    def status(self) -> int | None:
        """The exit status given to exit(), or None if killed by a signal."""
        return None if self.signal is not None else (self.exit_code >> 8) & 0xFF

    @property
    def crashed(self) -> bool:
        """A process (leader) killed by SIGSEGV, SIGBUS, SIGILL, SIGABRT or SIGTRAP.

        A signal sent with kill() looks the same as a fault: the kernel does
        not say which it was."""
        return self.process_exit and self.signal in CRASH_SIGNALS

    def describe(self) -> str:
        if self.signal is not None:
            name = _signal_name(self.signal)
            core = " (core dumped)" if self.core_dumped else ""
            return f"pid {self.pid} (tgid {self.tgid}) killed by {name}{core}"
        return f"pid {self.pid} (tgid {self.tgid}) exited with status {self.status}"


@dataclass(frozen=True)
class ExecEvent:
    """A thread of process ``tgid`` completed an execve (``pid`` is the thread)."""

    pid: int
    tgid: int
    timestamp_ns: int = 0


@dataclass(frozen=True)
class ForkEvent:
    """``parent_pid`` created a thread or process ``child_pid`` (new process:
    ``child_pid == child_tgid``)."""

    parent_pid: int
    parent_tgid: int
    child_pid: int
    child_tgid: int
    timestamp_ns: int = 0


@dataclass(frozen=True)
class Overrun:
    """The kernel dropped events (ENOBUFS): rescan /proc to catch up."""


ProcEvent = ExitEvent | ExecEvent | ForkEvent | Overrun


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@dataclass(frozen=True)
class Ack:
    seq: int
    ack: int
    err: int


def parse(data: bytes) -> list[ExitEvent | ExecEvent | ForkEvent | Ack]:
    """Decode the netlink messages of one datagram; unknown kinds are skipped."""
    found: list[ExitEvent | ExecEvent | ForkEvent | Ack] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        body = offset + NLMSGHDR.size
        offset += _nlmsg_align(length)
        if kind != NLMSG_DONE or length < NLMSGHDR.size + CN_MSG.size:
            continue  # NOOP, ERROR (our own requests), OVERRUN: nothing to decode
        idx, val, cn_seq, cn_ack, cn_len, _ = CN_MSG.unpack_from(data, body)
        event = body + CN_MSG.size
        if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC) or cn_len < PROC_EVENT_HEAD.size:
            continue
        what, _cpu, stamp = PROC_EVENT_HEAD.unpack_from(data, event)
        union = event + PROC_EVENT_HEAD.size
        if what == PROC_EVENT_EXIT:
            pid, tgid, code, sig, ppid, ptgid = EXIT_DATA.unpack_from(data, union)
            found.append(ExitEvent(pid, tgid, code, sig, ppid, ptgid, stamp))
        elif what == PROC_EVENT_EXEC:
            pid, tgid = EXEC_DATA.unpack_from(data, union)
            found.append(ExecEvent(pid, tgid, stamp))
        elif what == PROC_EVENT_FORK:
            ppid, ptgid, cpid, ctgid = FORK_DATA.unpack_from(data, union)
            found.append(ForkEvent(ppid, ptgid, cpid, ctgid, stamp))
        elif what == PROC_EVENT_NONE:
            (err,) = ACK_DATA.unpack_from(data, union)
            found.append(Ack(cn_seq, cn_ack, err))
    return found


def request(payload: bytes, seq: int, ack: int) -> bytes:
    cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, ack, len(payload), 0) + payload
    header = NLMSGHDR.pack(NLMSGHDR.size + len(cn), NLMSG_DONE, 0, seq, os.getpid())
    return header + cn

"""Reading /proc/PID: status, threads, names, with errors that say what happened."""

from __future__ import annotations

import os
from dataclasses import dataclass

from micropatch.errors import (
    MicropatchError,
    ProcessExited,
    ProcessNotFound,
    TracePermissionDenied,
)

YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


def read_proc_text(pid: int, entry: str) -> str:
    try:
        with open(f"/proc/{pid}/{entry}", encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise _gone(pid) from None
    except PermissionError:
        raise permission_denied(pid, f"cannot read /proc/{pid}/{entry}") from None


def _gone(pid: int) -> ProcessNotFound:
    return ProcessNotFound(f"no process with pid {pid}: it does not exist or has exited")


@dataclass(frozen=True)
class ProcessStatus:
    pid: int
    name: str
    state: str  # one letter: R S D T t Z X ...
    tracer_pid: int
    uid: int
    seccomp_mode: int  # 0 none, 1 strict, 2 filter
    tgid: int = 0  # the process of this thread (/proc/TID/status of a thread)

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def read_status(pid: int) -> ProcessStatus:
    fields = {}
    for line in read_proc_text(pid, "status").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ProcessStatus(
        pid=pid,
        name=fields.get("Name", "?"),
        state=fields.get("State", "?")[:1],
        tracer_pid=int(fields.get("TracerPid", "0")),
        uid=int(fields.get("Uid", "0").split()[0]),
        seccomp_mode=int(fields.get("Seccomp", "0")),
        tgid=int(fields.get("Tgid", str(pid))),
    )


def check_alive(pid: int) -> ProcessStatus:
    """The status of a live process, or ProcessNotFound / ProcessExited."""
    if pid <= 0:
        raise ProcessNotFound(f"invalid pid {pid}")
    status = read_status(pid)
    if status.zombie:
        raise ProcessExited(
            f"process {pid} ({status.name}) is a zombie: it has exited and waits for its "
            "parent to reap it; there is nothing left to patch"
        )
    return status


def start_time(pid: int) -> int:
    """When the process started, in clock ticks after boot (/proc/PID/stat field 22).

    With the pid, it names a process for good: a pid is reused, the pair is not."""
    return parse_start_time(read_proc_text(pid, "stat"))


def started_at(pid: int) -> float:
    """When the process started, in seconds since the epoch (the boot time in
    /proc/stat plus its start time in clock ticks)."""
    ticks = start_time(pid)
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def start_or_none(pid: int) -> int | None:
    """`start_time`, or None if the process is gone (or cannot be read)."""
    try:
        return start_time(pid)
    except MicropatchError:
        return None


def parse_start_time(stat: str) -> int:
    # Field 2 (comm) is in parentheses and may hold spaces and ')': split after the last ')'.
    # What follows starts at field 3, so field 22 is index 19.
    return int(stat[stat.rindex(")") + 1 :].split()[19])


def list_threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessExited(f"process {pid} exited during the operation") from None


def process_name(pid: int) -> str:
    try:
        return read_proc_text(pid, "comm").strip()
    except (ProcessNotFound, TracePermissionDenied):
        return "?"


def yama_scope() -> int | None:
    try:
        with open(YAMA_SCOPE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def permission_denied(pid: int, what: str) -> TracePermissionDenied:
    """Explain why the kernel refused, and what the operator can do."""
    reasons = []
    try:
        target_uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        target_uid = None
    me = os.geteuid()
    if me != 0 and target_uid is not None and target_uid != me:
        reasons.append(
            f"process {pid} belongs to uid {target_uid} and you are uid {me}: "
            "run micropatch as that user or as root"
        )
    scope = yama_scope()
    if scope is not None and scope >= 1 and me != 0:
        reasons.append(
            f"Yama ptrace_scope is {scope} ({YAMA_SCOPE}): only "
            + ("root" if scope >= 2 else "a parent process or root")
            + " may trace it; run as root, or grant CAP_SYS_PTRACE"
        )
    if scope == 3:
        reasons.append("Yama ptrace_scope is 3: ptrace is disabled until reboot")
    if not reasons and me == 0:
        reasons.append(
            "refused to root: this process lacks CAP_SYS_PTRACE (a container?), or the target "
            "is protected by a security module or lives in another PID or user namespace"
        )
    elif not reasons:
        reasons.append(
            "the process may be non-dumpable (setuid, prctl PR_SET_DUMPABLE 0) or protected "
            "by a security module; run as root with CAP_SYS_PTRACE"
        )
    return TracePermissionDenied(f"{what}: permission denied; " + "; ".join(reasons))

"""Which processes `--all` concerns: what /proc says of each one,
and the filters `--exe`, `--user`, `--unit` and `--cgroup`.

Reads /proc only (exe link, status, cgroup): no process is stopped or traced.
Light on purpose: no engine, ELF or assembler imports.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

from micropatch.errors import ProcessNotFound, SelectionError
from micropatch.process.procfs import read_proc_text, read_status

# Unit types a process can run in (a slice holds units; it does not run processes).
UNIT_SUFFIXES = (".service", ".scope")
DELETED = " (deleted)"


@dataclass(frozen=True)
class ProcessInfo:
    """What the filters look at, read from /proc/PID."""

    pid: int
    exe: str  # "" when the link cannot be read (a kernel thread)
    uid: int
    cgroup: str  # the cgroup v2 path, or the systemd v1 hierarchy's
    unit: str | None  # the systemd unit of that cgroup, if any

    @property
    def user(self) -> str:
        return user_name(self.uid)


def read_info(pid: int) -> ProcessInfo:
    """The /proc facts of one process; ProcessNotFound if it is gone."""
    status = read_status(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessNotFound(f"no process with pid {pid}: it has exited") from None
        exe = ""  # kernel thread
    except OSError:
        exe = ""
    exe = exe.removesuffix(DELETED)  # the program file was replaced: still that path
    cgroup = cgroup_path(read_proc_text(pid, "cgroup"))
    return ProcessInfo(pid, exe, status.uid, cgroup, unit_of(cgroup))


def cgroup_path(text: str) -> str:
    """The process's cgroup path from /proc/PID/cgroup.

    cgroup v2 has one line `0::/PATH`; on a v1 or hybrid host the systemd
    hierarchy's `N:name=systemd:/PATH` says the same. "" if neither is there."""
    systemd = ""
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            return path
        if controllers == "name=systemd":
            systemd = path
    return systemd


def unit_of(cgroup: str) -> str | None:
    """The innermost systemd unit in a cgroup path:
    `/system.slice/nginx.service` → `nginx.service`,
    `/user.slice/user-1000.slice/user@1000.service/app.slice/x.service` → `x.service`."""
    for part in reversed(cgroup.split("/")):
        if part.endswith(UNIT_SUFFIXES):
            return part
    return None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def parse_user(user: str) -> int:
    """A user name or a numeric uid → uid."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise SelectionError(
            f"--user {user}: no such user on this host; give a user name or a numeric uid"
        ) from None


def unit_pattern(unit: str) -> str:
    """`nginx` means `nginx.service`, as for systemctl; a glob or a typed unit stays."""
    if unit.endswith(UNIT_SUFFIXES) or any(c in unit for c in "*?["):
        return unit
    return unit + ".service"


@dataclass(frozen=True)
class Filters:
    """Which processes `--all` may touch. Within one kind, any pattern may match
    (repeat the option); across kinds, every kind given must match."""

    exe: tuple[str, ...] = ()  # globs on the executable's path
    uids: tuple[int, ...] = ()
    units: tuple[str, ...] = ()  # globs on the unit name
    cgroups: tuple[str, ...] = ()  # globs on the cgroup path

    @classmethod
    def of(
        cls,
        exe: Iterable[str] = (),
        users: Iterable[str] = (),
        units: Iterable[str] = (),
        cgroups: Iterable[str] = (),
    ) -> Filters:
        """From the command-line options: users by name or uid, units as systemctl takes them."""
        return cls(
            tuple(exe),
            tuple(parse_user(u) for u in users),
            tuple(unit_pattern(u) for u in units),
            tuple(cgroups),
        )

    def __bool__(self) -> bool:
        return bool(self.exe or self.uids or self.units or self.cgroups)

    def matches(self, info: ProcessInfo) -> bool:
        return (
            (not self.exe or _any_glob(info.exe, self.exe))
            and (not self.uids or info.uid in self.uids)
            and (not self.units or (info.unit is not None and _any_glob(info.unit, self.units)))
            and (not self.cgroups or _any_glob(info.cgroup, self.cgroups))
        )


def _any_glob(value: str, patterns: tuple[str, ...]) -> bool:
    # fnmatchcase: paths and unit names are case-sensitive; `*` also matches `/`.
    return bool(value) and any(fnmatch.fnmatchcase(value, p) for p in patterns)


def all_pids() -> list[int]:
    """Every process but this one."""
    me = os.getpid()
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != me)

"""Which filesystems the agent watches for execs and indexes for module files.

By default every *local* filesystem of the agent's mount namespace, read from
/proc/self/mountinfo, once per filesystem (a device mounted in several places,
bind mounts included, is walked and marked once, from the mount that shows its
root). Skipped, and said so in `agent status`:

- pseudo filesystems (proc, sysfs, cgroup, devtmpfs...): no program is run from
  them, and marking them may fail;
- network and user-space filesystems (NFS, SMB, Ceph, 9p, FUSE...): walking them
  costs the network, other hosts change them without an event here, and most
  refuse the filesystem marks the index keeps current with.

`AgentConfig.filesystems` narrows this to the filesystems holding the given
paths (the tests' private tmpfs), whatever their type.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

PSEUDO = frozenset(
    (
        "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs",
        "securityfs", "pstore", "bpf", "configfs", "fusectl", "binfmt_misc", "nsfs",
        "efivarfs", "autofs", "rpc_pipefs", "hugetlbfs", "devtmpfs", "selinuxfs",
        "nfsd",
    )
)  # fmt: skip
NETWORK = frozenset(
    (
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre",
        "gpfs", "ncpfs", "coda", "davfs", "ocfs2", "gfs2", "beegfs", "virtiofs",
    )
)  # fmt: skip


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo."""

    dev: int
    root: str  # the directory of the filesystem shown at `point`
    point: str
    fstype: str
    source: str


@dataclass(frozen=True)
class Skipped:
    """A filesystem left out, and why (shown in `agent status`)."""

    point: str
    fstype: str
    reason: str


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    """Every mount of the caller's mount namespace."""
    found = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
                major, minor = (int(x) for x in fields[2].split(":"))
            except ValueError:
                continue
            found.append(
                Mount(
                    os.makedev(major, minor), unescape(fields[3]), unescape(fields[4]),
                    fields[sep + 1], unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                )
            )  # fmt: skip
    return found


def unescape(path: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo."""
    if "\\" not in path:
        return path
    return path.encode().decode("unicode_escape").encode("latin-1").decode()


def why_not(fstype: str) -> str | None:
    """Why a filesystem of this type is not indexed by default (None: it is)."""
    if fstype in PSEUDO:
        return "pseudo filesystem"
    if fstype in NETWORK:
        return "network filesystem"
    if fstype.startswith("fuse.") or fstype == "fuse":
        return "user-space (FUSE) filesystem"
    return None


def choose(mounts: Sequence[Mount], only: Sequence[str] = ()) -> tuple[list[Mount], list[Skipped]]:
    """One mount per filesystem to watch and walk, and the filesystems skipped.

    `only` (paths): just the filesystems holding them, whatever their type;
    empty: every local filesystem."""
    wanted: set[int] | None = None
    skipped: list[Skipped] = []
    if only:
        wanted = set()
        for path in only:
            try:
                wanted.add(os.stat(path).st_dev)
            except OSError as e:
                skipped.append(Skipped(path, "?", f"cannot be read: {e.strerror}"))
    best: dict[int, Mount] = {}
    for m in mounts:
        if wanted is not None and m.dev not in wanted:
            continue
        reason = None if wanted is not None else why_not(m.fstype)
        if reason is not None:
            if not any(s.point == m.point for s in skipped):
                skipped.append(Skipped(m.point, m.fstype, reason))
            continue
        current = best.get(m.dev)
        if current is None or _better(m, current):
            best[m.dev] = m
    return sorted(best.values(), key=lambda m: m.point), skipped


def _better(m: Mount, than: Mount) -> bool:
    """The mount to walk a filesystem from: the one showing its root, then the shortest path."""
    return (m.root != "/", len(m.point), m.point) < (than.root != "/", len(than.point), than.point)


def mount_points(mounts: Sequence[Mount]) -> frozenset[str]:
    """Every mount point: a walk does not cross into another mount."""
    return frozenset(m.point for m in mounts)

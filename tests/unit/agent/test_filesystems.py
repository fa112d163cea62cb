"""Which filesystems the agent watches and indexes (agent/filesystems.py)."""

from __future__ import annotations

import os
from pathlib import Path

from micropatch.agent.filesystems import Mount, choose, read_mounts, unescape, why_not


def m(dev: int, point: str, fstype: str = "ext4", root: str = "/") -> Mount:
    return Mount(dev, root, point, fstype, "src")


def test_mounts_are_read() -> None:
    mounts = read_mounts()
    assert any(x.point == "/" for x in mounts)
    assert unescape(r"/mnt/with\040space") == "/mnt/with space"


def test_every_local_filesystem_once_the_others_skipped_with_a_reason() -> None:
    mounts = [
        m(1, "/"), m(2, "/proc", "proc"), m(3, "/sys", "sysfs"), m(4, "/home", "xfs"),
        m(1, "/srv/bind", root="/srv"),  # a bind mount of / : the same filesystem
        m(5, "/var/lib/docker/overlay2/x/merged", "overlay"), m(6, "/mnt/nfs", "nfs4"),
        m(7, "/mnt/sshfs", "fuse.sshfs"), m(8, "/tmp", "tmpfs"), m(9, "/dev", "devtmpfs"),
        m(10, "/snap/core/1", "squashfs"),
    ]  # fmt: skip
    chosen, skipped = choose(mounts)
    assert [x.point for x in chosen] == [
        "/", "/home", "/snap/core/1", "/tmp", "/var/lib/docker/overlay2/x/merged"
    ]  # fmt: skip
    reasons = {s.point: s.reason for s in skipped}
    assert reasons["/mnt/nfs"] == "network filesystem"
    assert reasons["/mnt/sshfs"] == "user-space (FUSE) filesystem"
    assert reasons["/proc"] == reasons["/dev"] == "pseudo filesystem"
    assert why_not("ext4") is None and why_not("cifs") == "network filesystem"


def test_the_mount_showing_the_filesystem_root_is_walked_not_a_bind_of_a_subtree() -> None:
    mounts = [m(1, "/a", root="/sub"), m(1, "/zz", root="/"), m(1, "/b", root="/")]
    chosen, _ = choose(mounts)
    assert [x.point for x in chosen] == ["/b"]


def test_only_the_filesystems_holding_the_given_paths(tmp_path: Path) -> None:
    dev = os.stat(tmp_path).st_dev
    mounts = [m(dev, "/here", "nfs4"), m(dev + 1, "/other")]
    chosen, skipped = choose(mounts, [str(tmp_path), str(tmp_path / "missing")])
    assert [x.point for x in chosen] == ["/here"]  # listed: whatever its type
    assert [s.reason for s in skipped] == ["cannot be read: No such file or directory"]

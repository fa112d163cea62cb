"""Module file identity: what a file is, computed once per file version."""

from __future__ import annotations

import os
from pathlib import Path

from micropatch.agent.files import FileCache, ModuleFile
from micropatch.elf.identity import ModuleIdentity
from micropatch.patch.model import Target

ID = ModuleIdentity(build_id="ab" * 20, sha256="cd" * 32)


def test_a_target_matches_every_identity_it_pins_whatever_the_file_name() -> None:
    f = ModuleFile("/usr/lib/libfoo.so.1", 1, 2, ID)
    assert f.matches(Target(module="libfoo.so.1", build_id="AB" * 20))
    assert f.matches(Target(module="libfoo.so.1", build_id="ab" * 20, sha256="cd" * 32))
    assert not f.matches(Target(module="libfoo.so.1", build_id="ab" * 20, sha256="00" * 32))
    assert not f.matches(Target(module="libfoo.so.1", build_id="00" * 20))
    # a wheel's renamed copy (libfoo-1a2b3c4d.so.1), a hard link: the same build
    assert f.matches(Target(module="libbar.so.1", build_id="ab" * 20))
    unpinned = Target.model_construct(module="libfoo.so.1", build_id=None, sha256=None)
    assert not f.matches(unpinned)  # pins nothing (the model refuses it anyway): never
    assert not ModuleFile("/x/libfoo.so.1", 1, 2, None).matches(
        Target(module="libfoo.so.1", build_id="ab" * 20)
    )


def test_identity_is_computed_once_per_file_version(tmp_path: Path) -> None:
    path = tmp_path / "notelf"
    path.write_bytes(b"not an ELF file")
    cache = FileCache()
    first = cache.of_path(str(path))
    assert first is not None and first.identity is None
    fd = os.open(path, os.O_RDONLY)
    try:
        again = cache.of_fd(fd, str(path))
    finally:
        os.close(fd)
    assert (again.dev, again.ino) == (first.dev, first.ino)
    assert cache.of_path(str(tmp_path / "missing")) is None


def test_file_id_records_are_parsed() -> None:
    """A FAN_REPORT_DFID_NAME event: the metadata, then fsid, handle and name."""
    import struct

    from micropatch.process import fanotify

    handle = struct.pack("<Ii", 8, 1) + b"\x01" * 8
    body = struct.pack("<ii", 7, -3) + handle + b"lib.so\0"
    body += b"\0" * (-(4 + len(body)) % 8)
    record = fanotify.INFO_HEADER.pack(fanotify.FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 4 + len(body))
    mask = fanotify.FAN_MOVED_TO
    size = fanotify.METADATA.size + len(record) + len(body)
    data = fanotify.METADATA.pack(size, 3, 0, fanotify.METADATA.size, mask, -1, 42) + record + body
    [event] = fanotify.parse_events(data)
    assert (event.mask, event.fd, event.pid) == (mask, -1, 42)
    assert event.fid == fanotify.FileId((7, -3), handle, "lib.so")
    plain = fanotify.METADATA.pack(fanotify.METADATA.size, 3, 0, 24, fanotify.FAN_OPEN_PERM, 5, 1)
    assert fanotify.parse_events(plain)[0].fid is None

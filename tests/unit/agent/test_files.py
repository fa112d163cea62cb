"""Module file identity and the pieces of NewProcesses that read the system's lists."""

from __future__ import annotations

import os
from pathlib import Path

from micropatch.agent.files import FileCache, ModuleFile
from micropatch.agent.newproc import _ld_so_conf_dirs, _mounts, _unescape
from micropatch.elf.identity import ModuleIdentity
from micropatch.patch.model import Target

ID = ModuleIdentity(build_id="ab" * 20, sha256="cd" * 32)


def test_a_target_matches_by_name_and_every_identity_it_pins() -> None:
    f = ModuleFile("/usr/lib/libfoo.so.1", 1, 2, ID)
    assert f.matches(Target(module="libfoo.so.1", build_id="AB" * 20))
    assert f.matches(Target(module="libfoo.so.1", build_id="ab" * 20, sha256="cd" * 32))
    assert not f.matches(Target(module="libfoo.so.1", build_id="ab" * 20, sha256="00" * 32))
    assert not f.matches(Target(module="libbar.so.1", build_id="ab" * 20))
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


def test_ld_so_conf_with_includes(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("/opt/a/lib  # comment\n\n/opt/b/lib\n")
    (tmp_path / "ld.so.conf").write_text("include conf.d/*.conf\n/usr/local/lib\nrelative\n")
    assert _ld_so_conf_dirs(str(tmp_path / "ld.so.conf")) == [
        "/opt/a/lib",
        "/opt/b/lib",
        "/usr/local/lib",
    ]


def test_mounts_are_read() -> None:
    mounts = _mounts()
    assert any(point == "/" for _, point, _ in mounts)
    assert _unescape(r"/mnt/with\040space") == "/mnt/with space"

"""micropatch.files: the one atomic writer and the one bounded reader, on the real
filesystem (failures made by the kernel: RLIMIT_FSIZE, SIGKILL, /dev/zero)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from micropatch import files
from micropatch.files import describe_size, read_bounded, write_atomic


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
def test_the_file_has_its_mode_whatever_the_umask(tmp_path: Path, mode: int, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = write_atomic(tmp_path / "f", "text", mode=mode)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"text"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert leftovers(tmp_path) == []


def test_a_private_file_is_never_readable_by_others(tmp_path: Path, monkeypatch) -> None:
    """Every byte goes into a file that has the final mode already (no 0644 window),
    also when it replaces a world-readable file."""
    (tmp_path / "secret").write_text("old")
    (tmp_path / "secret").chmod(0o644)
    modes = []
    real_write = os.write

    def spy(fd: int, data) -> int:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    write_atomic(tmp_path / "secret", b"credential", mode=0o600)
    monkeypatch.undo()
    assert modes and set(modes) == {0o600}
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert (tmp_path / "secret").read_bytes() == b"credential"


def test_file_and_directory_are_flushed(tmp_path: Path, monkeypatch) -> None:
    """fsync of the data before the rename, then of the directory after it."""
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(a, b) -> None:
        synced.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "f", b"x", mode=0o644)
    assert synced == ["file", "rename", "directory"]


def test_replace_false_never_replaces(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"the only copy")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "key", b"new", mode=0o600, replace=False)
    assert (tmp_path / "key").read_bytes() == b"the only copy"
    assert leftovers(tmp_path) == []
    write_atomic(tmp_path / "new", b"new", mode=0o600, replace=False)
    assert (tmp_path / "new").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG) halfway through."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    script = (
        "import resource, signal, sys\n"
        "from micropatch.files import write_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    write_atomic(sys.argv[1], b'n' * 100000, mode=0o644)\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == str(errno.EFBIG), done.stderr
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "absent" / "f", b"x", mode=0o644)


def test_concurrent_writers_never_show_half_a_file(tmp_path: Path) -> None:
    """Threads write the same path while another reads it: every read is one whole
    version (unique temporary names: no writer truncates another's)."""
    target = tmp_path / "f"
    versions = {bytes([65 + i]) * (64 << 10) for i in range(6)}
    write_atomic(target, next(iter(versions)), mode=0o644)
    stop = threading.Event()
    seen: set[bytes] = set()
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(40):
                write_atomic(target, data, mode=0o644)
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        while not stop.is_set():
            seen.add(target.read_bytes())

    threads = [threading.Thread(target=writer, args=(v,)) for v in versions]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert seen and seen <= versions
    assert leftovers(tmp_path) == []


def test_a_writer_killed_at_any_instant_leaves_a_whole_file(tmp_path: Path) -> None:
    """SIGKILL while a process rewrites the file in a loop: the file is one whole
    version; at most the killed writer's temporary file is left."""
    target = tmp_path / "f"
    script = (
        "import sys\nfrom micropatch.files import write_atomic\n"
        "print('ready', flush=True)\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    write_atomic(sys.argv[1], str(i % 10).encode() * 200000, mode=0o600)\n"
    )
    for delay in (0.05, 0.13, 0.21):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(delay)  # an arbitrary instant of the loop, not a synchronisation
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        proc.stdout.close()
        data = target.read_bytes()
        assert len(data) == 200000 and len(set(data)) == 1, "half a file"
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert len(leftovers(tmp_path)) <= 1
        for name in leftovers(tmp_path):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
            (tmp_path / name).unlink()


def test_read_bounded(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 1024)
    assert read_bounded(tmp_path / "f", 1024) == b"x" * 1024
    with pytest.raises(OSError) as caught:
        read_bounded(tmp_path / "f", 1023)
    assert caught.value.errno == errno.EFBIG
    assert caught.value.strerror == "larger than 1023 bytes"
    assert caught.value.filename == str(tmp_path / "f")
    with pytest.raises(FileNotFoundError):
        read_bounded(tmp_path / "absent", 10)


def test_read_bounded_of_an_endless_file_stops_at_the_bound() -> None:
    started = time.monotonic()
    with pytest.raises(OSError, match="larger than 1 MiB") as caught:
        read_bounded("/dev/zero", 1 << 20)
    assert caught.value.errno == errno.EFBIG
    assert time.monotonic() - started < 5


def test_describe_size() -> None:
    assert [describe_size(n) for n in (64 << 20, 1 << 10, 4 << 30, 1000, 1536)] == [
        "64 MiB", "1 KiB", "4 GiB", "1000 bytes", "1536 bytes",
    ]  # fmt: skip


def test_the_module_imports_nothing_of_micropatch() -> None:
    """Rank 0: every layer, the light CLI paths included, may import it."""
    source = Path(files.__file__).read_text()
    assert "from micropatch" not in source and "import micropatch" not in source

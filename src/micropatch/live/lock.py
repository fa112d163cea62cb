"""One operation per process at a time: a lock file per target, taken with flock.

Invariant: an operation on process P (apply, remove, update) runs only while
it holds the lock of P, so a second operation waits its turn instead of
meeting a stopped process and failing with `AlreadyTraced`.

- The lock is named by the pid *and* the start time of the target
  (/proc/PID/stat field 22): a recycled pid is another process, another lock.
- `flock` is released by the kernel when its holder exits, however it exits:
  a patcher killed mid-operation leaves no stale lock behind.
- The holder writes who it is (pid, command line, since when) into the file,
  so that a waiter can say what it waits for.
- A lock file is unlinked by its holder on release, under the lock; a waiter
  that then wins the lock of an unlinked file opens the path again.

Light on purpose (no engine, no ELF or assembler imports): the CLI may import it
to pass `--lock-timeout` without paying for the engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from micropatch.errors import Busy, LockError
from micropatch.process.procfs import start_time

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/micropatch")
DEFAULT_TIMEOUT = 30.0  # seconds an operation waits for another one on the same process
POLL = 0.05  # seconds between two tries of a taken lock
RECORD_SIZE = 4096  # the holder's record is at most this long
COMMAND_LIMIT = 300  # characters of the holder's command line kept in its record


@dataclass(frozen=True)
class Waiting:
    """How an operation waits for another one on the same process.

    `on_wait` receives a line naming the holder when waiting starts (and again
    if another holder takes over); `None` logs it. `directory`: where the lock
    files are (default: `lock_dir()`)."""

    timeout: float = DEFAULT_TIMEOUT
    on_wait: Callable[[str], None] | None = None
    directory: Path | None = None


# Set only for the extent of a `with waiting(...)` block and reset on exit, in the
# caller's own context (a thread or task has its own): nothing carries over from
# one request of a long-lived agent to the next. It lets callers choose the
# timeout without a new parameter through every engine function.
_waiting: ContextVar[Waiting | None] = ContextVar("micropatch_lock_waiting", default=None)


@contextlib.contextmanager
def waiting(
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    directory: Path | None = None,
) -> Iterator[None]:
    """Within the block, operations on a busy process wait this way (see `Waiting`;
    timeout None: the default, 30 s)."""
    token = _waiting.set(
        Waiting(DEFAULT_TIMEOUT if timeout is None else timeout, on_wait, directory)
    )
    try:
        yield
    finally:
        _waiting.reset(token)


@contextlib.contextmanager
def queued(pid: int) -> Iterator[None]:
    """Hold the lock of process `pid` for the block, waiting as the current
    `waiting` block says (by default up to 30 s, logging who holds it)."""
    w = _waiting.get() or Waiting()
    with hold(pid, timeout=w.timeout, on_wait=w.on_wait, directory=w.directory):
        yield


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its holder wrote it."""

    pid: int
    command: str
    since: float  # time.time() when it took the lock

    def describe(self, target: int) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        return (
            f"process {target} is being patched by micropatch "
            f"(pid {self.pid}, `{self.command}`, since {since})"
        )


def lock_dir() -> Path:
    """/run/micropatch for root; otherwise a directory of this user's own."""
    if os.geteuid() == 0 and RUN_DIR.parent.is_dir():
        return RUN_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "micropatch"
    import tempfile

    return Path(tempfile.gettempdir()) / f"micropatch-{os.geteuid()}"


def lock_path(pid: int, directory: Path | None = None) -> Path:
    """The lock file of process `pid` (which must exist: its start time names it)."""
    return (directory or lock_dir()) / f"{pid}-{start_time(pid)}.lock"


@contextlib.contextmanager
def hold(
    pid: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    on_wait: Callable[[str], None] | None = None,
    directory: Path | None = None,
) -> Iterator[None]:
    """Hold the lock of process `pid` for the block; wait at most `timeout`
    seconds for another holder, then raise `Busy` naming it.

    Raises ProcessNotFound if `pid` does not exist."""
    path = lock_path(pid, directory)
    _ensure_dir(path.parent)
    fd = _acquire(pid, path, timeout, on_wait)
    try:
        record = {"pid": os.getpid(), "command": _command(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        # Under the lock, so no one else unlinks or writes it meanwhile. Emptied first:
        # on a disk filesystem (ext4) the last close of an unlinked file that still has
        # data frees it there and then, 0.1-0.5 ms of every operation; an empty one, 25 us.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def holder(path: Path) -> Holder | None:
    """Who holds the lock at `path` now, if anyone said so."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _acquire(pid: int, path: Path, timeout: float, on_wait: Callable[[str], None] | None) -> int:
    deadline = time.monotonic() + timeout
    announced: Holder | None = None
    fd = _open(path)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                if _same_file(fd, path):
                    return fd
                # The previous holder unlinked this file on release: take the path's.
                os.close(fd)
                fd = -1
                fd = _open(path)
                continue
            current = _read_holder(fd)
            left = deadline - time.monotonic()
            if left <= 0:
                who = (
                    current.describe(pid)
                    if current
                    else f"process {pid} is being patched by another micropatch operation"
                )
                raise Busy(
                    f"{who}, still after waiting {timeout:g} s; nothing was changed: try "
                    "again once it is done, or wait longer with --lock-timeout",
                    pid=pid,
                    holder=current.pid if current else None,
                )
            if current is not None and current != announced:
                announced = current
                message = f"{current.describe(pid)}; waiting up to {timeout:g} s"
                log.info("%s", message)
                if on_wait is not None:
                    on_wait(message)
            time.sleep(min(POLL, left))
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise LockError(
            f"cannot open the lock file {path}: {e.strerror}; is {path.parent} writable "
            "by this user?"
        ) from e


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> Holder | None:
    try:
        record = json.loads(os.pread(fd, RECORD_SIZE, 0))
        return Holder(int(record["pid"]), str(record["command"]), float(record["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not yet written, or written by something else


def _ensure_dir(directory: Path) -> None:
    """Create the lock directory 0700, or check that an existing one is ours alone:
    a directory others can write to would let them plant or remove our locks."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    try:
        st = os.lstat(directory)
    except OSError as e:
        raise LockError(f"cannot create the lock directory {directory}: {e.strerror}") from e
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != me or st.st_mode & 0o022:
        raise LockError(
            f"lock directory {directory} is not a directory owned by uid {me} and writable "
            f"by it alone (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}); "
            "remove it, and micropatch will create it again"
        )


def _command() -> str:
    argv = list(sys.argv) if sys.argv and sys.argv[0] else _own_cmdline()
    if not argv:
        return "?"
    command = shlex.join([os.path.basename(argv[0]), *argv[1:]])
    return command if len(command) <= COMMAND_LIMIT else command[: COMMAND_LIMIT - 1] + "…"


def _own_cmdline() -> list[str]:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []

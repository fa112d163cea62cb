"""The stop watchdog: a supervisor process that SIGKILLs a patcher frozen inside a stop.

While a patcher holds a target's threads in a ptrace stop, the target runs only when
the patcher lets it go. A patcher that cannot (SIGSTOPped, swapped out and stuck in
I/O, a bug that loops) would hold a production process indefinitely. Nothing inside
the patcher can help: a SIGSTOP stops all of its threads, and only the tracing thread
may detach its tracees. So a separate process watches: `Watchdog.start` spawns a
small supervisor (`python -I -S`, standard library only, in its own session so
that a terminal's ^C or ^Z does not reach it, real-time above the stops where
permitted), and every stop (`process.world`) arms it when it begins and disarms
it once the threads run again (`watched`). A stop armed for longer than its stop
timeout (the time its threads may take to stop) plus `limit`
makes the supervisor SIGKILL the patcher: the kernel detaches a dead tracer's
tracees and they run again at once; the engine is crash-safe at every instant
(docs/engine.md), so the next command on the process completes or rolls back what
the patcher left. A SIGSTOPped patcher cannot disarm; SIGKILL reaches a stopped
process.

The supervisor holds a pidfd of the patcher: it can never kill a process that
reused the patcher's pid, and it exits when the patcher exits (the pidfd becomes
readable) or closes the pipe (EOF), whichever comes first.

The patcher finds its supervisor through the environment, as systemd's LISTEN_PID
does: VARIABLE is "<pid>:<fd>" and counts only in the process whose pid it names (a
child that inherits the variable has not the pipe). The pipe's write end is
non-blocking: a patcher never waits on its watchdog, whatever state that is in.
Messages are single lines, each written in one write(2) below PIPE_BUF (so the
threads of an agent never interleave them): "A <token> <monotonic> <seconds>
<pid> <what>" arms, "D <token>" disarms, "L <token> <operation>" names the
operation the thread's next stops belong to (`operation`); the token is the
stopping thread's id, the time CLOCK_MONOTONIC (the same for both processes), so
a supervisor still starting counts from the arming, not from when it reads it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from micropatch.process.priority import STOP_PRIORITY

log = logging.getLogger(__name__)

VARIABLE = "MICROPATCH_WATCHDOG"
# Seconds a stop may last beyond its stop timeout (the time its threads may take to
# stop) before the patcher is killed. The work inside a stop takes milliseconds
# (docs/engine.md: median pause about 1 ms, 1,000 threads tens of ms); 3 s is three
# orders of magnitude above it, so a loaded machine does not get a healthy patcher
# killed, and with the default stop timeout (2 s) no target is held more than 5 s.
DEFAULT_LIMIT = 3.0

SUPERVISOR = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
fd, patcher, limit, record = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
try:
    pidfd = os.pidfd_open(patcher)
except OSError:
    os._exit(0)
if os.getppid() != patcher:
    os._exit(0)
armed, labels, rest = {}, {}, b""
while True:
    due = min((a[1] + a[2] + limit for a in armed.values()), default=None)
    wait = None if due is None else max(0.0, due - time.monotonic())
    ready, _, _ = select.select([fd, pidfd], [], [], wait)
    if pidfd in ready:
        os._exit(0)
    if fd in ready:  # every line written is read before a kill is decided
        data = os.read(fd, 65536)
        if not data:
            os._exit(0)
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            word = line.decode(errors="replace").split(" ", 5)
            if word[0] == "A" and len(word) == 6:
                old = armed.get(word[1])
                armed[word[1]] = ((old[0] + 1, *old[1:]) if old else
                                  (1, float(word[2]), float(word[3]), int(word[4]), word[5]))
            elif word[0] == "L" and len(word) >= 2:
                labels[word[1]] = " ".join(word[2:])
            elif word[0] == "D" and len(word) == 2 and word[1] in armed:
                depth, *kept = armed[word[1]]
                if depth > 1:
                    armed[word[1]] = (depth - 1, *kept)
                else:
                    del armed[word[1]]
        continue
    now = time.monotonic()
    if due is None or now < due:
        continue
    token, (depth, since, timeout, target, what) = min(
        armed.items(), key=lambda i: i[1][1] + i[1][2])
    held = now - since
    if labels.get(token):
        what += f" ({labels[token]})"
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    said = (f"micropatch: watchdog: {what} held its threads {held:.1f} s "
            f"(limit {timeout + limit:g} s): killed the patcher (pid {patcher}) so that "
            "they run again; the next micropatch command on that process completes or "
            "rolls back what it left (or run `micropatch repair`)")
    if record:
        try:
            import json
            tmp = f"{record}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"patcher": patcher, "pid": target, "what": what, "held": held,
                           "limit": timeout + limit, "time": time.time()}, f)
            os.replace(tmp, record)
        except OSError as e:
            said += f" (record {record} not written: {e})"
    print(said, file=sys.stderr, flush=True)
    os._exit(0)
"""


class Watchdog:
    """This process's supervisor (see the module doc); `close` ends it."""

    def __init__(self, child: int, fd: int) -> None:
        self.child = child  # the supervisor's pid
        self.fd = fd  # the pipe's write end

    @classmethod
    def start(cls, limit: float = DEFAULT_LIMIT, *, record: Path | None = None) -> Watchdog:
        """Spawn the supervisor and make it this process's (`watched` arms it).

        `limit`: seconds a stop may last beyond its stop timeout. `record`: a file the
        supervisor writes (JSON: what was held, how long) before it kills the patcher,
        for a restarted agent to report (`previous`)."""
        if limit <= 0:
            raise ValueError(f"watchdog limit must be positive, not {limit}")
        read_end, write_end = os.pipe()
        try:
            os.set_inheritable(read_end, True)
            argv = [sys.executable, "-I", "-S", "-c", SUPERVISOR, str(read_end),
                    str(os.getpid()), repr(limit), str(record or "")]  # fmt: skip
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                child = os.posix_spawn(
                    sys.executable, argv, os.environ,
                    file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1)],
                    setsid=True,
                )  # fmt: skip
            finally:
                os.close(null)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        _above_stops(child)
        os.set_blocking(write_end, False)
        os.environ[VARIABLE] = f"{os.getpid()}:{write_end}"
        log.debug("stop watchdog started (pid %d, limit %g s)", child, limit)
        return cls(child, write_end)

    def close(self) -> None:
        """End the supervisor: no stop of this process is watched any more. It exits at
        the pipe's EOF; not waited for (it may still be starting), reaped if it has."""
        if os.environ.get(VARIABLE) == f"{os.getpid()}:{self.fd}":
            del os.environ[VARIABLE]
        os.close(self.fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.child, os.WNOHANG)

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def watching(limit: float = DEFAULT_LIMIT, *, record: Path | None = None) -> Iterator[bool]:
    """This process's stops watched for the block (`Watchdog.start`, then `close`);
    yields whether they are. A supervisor that cannot be spawned (no process left
    under RLIMIT_NPROC, the interpreter gone from disk) is said, and the stops run
    unwatched, as they would without a watchdog, rather than not at all."""
    try:
        dog = Watchdog.start(limit, record=record)
    except OSError as e:
        log.warning("the stop watchdog could not start (%s): stops are not watched", e)
        yield False
        return
    try:
        yield True
    finally:
        dog.close()


@contextmanager
def watched(pid: int, what: str, timeout: float) -> Iterator[None]:
    """Arm this process's watchdog, if it has one, for the block: a stop of process
    `pid`, described by `what`, whose threads may take `timeout` seconds to stop."""
    fd = _pipe()
    if fd is None:
        yield
        return
    token = threading.get_native_id()
    words = " ".join(what.split())[:300]
    line = f"A {token} {time.monotonic():.6f} {timeout:g} {pid} {words}\n"
    _send(fd, line)
    try:
        yield
    finally:
        _send(fd, f"D {token}\n")


@contextmanager
def operation(label: str) -> Iterator[None]:
    """Name the operation the calling thread's stops in the block belong to ("apply
    fix-1 v2"), for the supervisor's message should it kill the patcher."""
    fd = _pipe()
    if fd is None:
        yield
        return
    token = threading.get_native_id()
    _send(fd, f"L {token} {' '.join(label.split())[:200]}\n")
    try:
        yield
    finally:
        _send(fd, f"L {token}\n")


def previous(record: Path) -> dict[str, object] | None:
    """What a supervisor recorded before it killed the previous patcher (and forget it):
    {"patcher", "pid", "what", "held", "limit", "time"}, or None."""
    try:
        text = record.read_text()
    except FileNotFoundError:
        return None
    record.unlink(missing_ok=True)
    try:
        value = json.loads(text)
    except ValueError:
        return {"what": "a stop (unreadable record)", "held": 0.0}
    return value if isinstance(value, dict) else None


def _above_stops(child: int) -> None:
    """The supervisor at a real-time priority above the stops' (process/priority.py),
    where permitted: a patcher spinning at its real-time priority (a bug) must not
    keep it from the CPU. It only ever sleeps in select(), which makes this safe."""
    try:
        os.sched_setscheduler(
            child, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(STOP_PRIORITY + 1)
        )
    except (OSError, ValueError) as e:
        log.debug("stop watchdog at normal priority (%s)", e)


def _pipe() -> int | None:
    value = os.environ.get(VARIABLE)
    if not value:
        return None
    pid, _, fd = value.partition(":")
    if pid != str(os.getpid()) or not fd.isdigit():
        return None  # inherited from a parent: its pipe is not ours
    return int(fd)


def _send(fd: int, line: str) -> None:
    try:
        os.write(fd, line.encode())
    except OSError as e:
        # A full pipe (the supervisor is stopped) or a closed one (it died): the stop
        # goes on unwatched rather than wait; say so once per stop.
        with contextlib.suppress(Exception):
            log.warning(
                "stop watchdog unreachable (%s): this stop is not watched",
                errno.errorcode.get(e.errno or 0, e),
            )

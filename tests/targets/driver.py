"""Drive a target program over its line protocol (see harness.py for the protocol).

``Target(path, *args)`` starts it and waits for its ``ready <pid>`` line;
``cmd(line)`` sends a command and returns its one answer line.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO


class TargetError(AssertionError):
    """A target did not answer as the protocol says (dead, hung, or garbled)."""


class Target:
    """A running target program, driven line by line.

    ``Target(path, *args)`` starts the program and waits for its ``ready``
    line.  Output is read through the file descriptor with ``select`` and a
    private line buffer (a buffered text stream could hold a line that
    ``select`` no longer sees).  stderr goes to a temporary file, so it can
    never fill a pipe, and is quoted in every error.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *args: str,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.args = args
        self.timeout = timeout
        self._buf = b""
        # Lives as long as the Target; closed by close() or kill().
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._stderr_text = ""
        self.proc = subprocess.Popen(
            self._argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
            env=env,
        )
        try:
            self.ready_line = self.readline()
            self._ready(self.ready_line)
        except BaseException:
            self.kill()
            raise

    def _argv(self) -> list[str]:
        return [str(self.path), *self.args]

    def _ready(self, line: str) -> None:
        if line != f"ready {self.proc.pid}":
            raise self._error(f"expected 'ready {self.proc.pid}', got {line!r}")

    def __repr__(self) -> str:
        return f"Target({self.path.name!r}, pid={self.proc.pid}, returncode={self.returncode})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        """True while the process has not exited (stopped or traced counts as alive)."""
        return self.proc.poll() is None

    def send(self, line: str) -> None:
        """Send one command line without reading the answer."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
        except (BrokenPipeError, ValueError) as e:
            raise self._error(f"cannot send {line!r}: {e}") from None

    def readline(self, timeout: float | None = None) -> str:
        """The next line of output, without its newline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._error(f"no answer within {limit} s")
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=1)
                raise self._error("output closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def cmd(self, line: str, timeout: float | None = None) -> str:
        """Send a command and return its one answer line."""
        self.send(line)
        return self.readline(timeout)

    def close(self, timeout: float = 10.0) -> int:
        """Ask the target to quit; kill it if it does not exit in time.  Returns its exit code."""
        if self.alive():
            try:
                self.send("quit")
                self.proc.wait(timeout=timeout)
            except (TargetError, subprocess.TimeoutExpired):
                self.kill()
        self._cleanup()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (works on stopped and ptrace-stopped processes too) and reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._cleanup()

    def stderr_text(self) -> str:
        """Everything the target wrote to stderr so far."""
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_text = self._stderr.read().decode(errors="replace")
        return self._stderr_text

    def _cleanup(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.stderr_text()
        self._stderr.close()

    def _error(self, what: str) -> TargetError:
        code = self.proc.poll()
        if code is None:
            state = "still running"
        elif code < 0:
            state = f"killed by {signal.Signals(-code).name}"
        else:
            state = f"exited {code}"
        stderr = self.stderr_text().strip()
        return TargetError(
            f"{self.path.name} (pid {self.proc.pid}, {state}): {what}"
            + (f"\nstderr:\n{stderr}" if stderr else "")
        )

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


StartTarget = Callable[..., Target]
"""The ``start`` fixture: ``start(name_or_path, *args, timeout=..., env=...) -> Target``."""

"""Build benchmarks/targets/bench_target.c and drive running copies of it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

SOURCE = Path(__file__).parent / "targets" / "bench_target.c"
MODULE = "bench_target"  # the executable's basename, as /proc/PID/maps shows it
# -rdynamic: Frida finds compute() among the exports; a build-id identifies the module.
CFLAGS = ["-O2", "-pthread", "-rdynamic", "-Wl,--build-id"]


class TargetError(Exception):
    """The target did not answer as expected, or died."""


def build(directory: Path) -> Path:
    """Compile bench_target with the machine's cc into directory."""
    exe = directory / MODULE
    subprocess.run(["cc", *CFLAGS, "-o", str(exe), str(SOURCE)], check=True)
    return exe


def build_command() -> str:
    return " ".join(["cc", *CFLAGS, "-o", MODULE, "benchmarks/targets/bench_target.c"])


def symbol_offsets(exe: Path, names: list[str]) -> dict[str, int]:
    """Module offsets of function symbols (from the ELF symbol table, via nm)."""
    out = subprocess.run(
        ["nm", "--defined-only", str(exe)], capture_output=True, text=True, check=True
    )
    found: dict[str, int] = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in names:
            found[parts[2]] = int(parts[0], 16)
    missing = set(names) - set(found)
    if missing:
        raise TargetError(f"{exe}: no symbol {', '.join(sorted(missing))}")
    return found


def module_base(pid: int, exe: Path) -> int:
    """Load address of exe in pid: start of its mapping at file offset 0."""
    real = os.path.realpath(exe)
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise TargetError(f"process {pid} does not map {real}")


def rss(pid: int) -> dict[str, int]:
    """Memory of pid in KiB, from /proc/PID/smaps_rollup (Rss, Pss, Anonymous, ...)."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1])
    return values


def memory_by_mapping(pid: int) -> dict[str, dict[str, int]]:
    """Rss and Anonymous KiB of pid per mapping name (anonymous mappings as [anon]), summed."""
    out: dict[str, dict[str, int]] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                name = " ".join(parts[5:]) or "[anon]"
                out.setdefault(name, {"Rss": 0, "Anonymous": 0})
            elif len(parts) == 3 and parts[0] in ("Rss:", "Anonymous:"):
                out[name][parts[0].rstrip(":")] += int(parts[1])
    return out


def memfd_kib(pid: int) -> dict[str, int]:
    """KiB allocated to each memfd mapped by pid (memory that no process's Rss shows)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/memfd:"):
                key = f"{fields[5]} inode {fields[4]}"
                if key not in out:
                    try:
                        blocks = os.stat(f"/proc/{pid}/map_files/{fields[0]}").st_blocks
                    except OSError:
                        continue
                    out[key] = blocks * 512 // 1024
    return out


def memory_added(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> list[str]:
    """Mappings whose Rss or Anonymous changed, as readable lines."""
    lines = []
    for name in sorted(set(before) | set(after)):
        b = before.get(name, {"Rss": 0, "Anonymous": 0})
        a = after.get(name, {"Rss": 0, "Anonymous": 0})
        if a != b:
            lines.append(
                f"{name}: Rss {a['Rss'] - b['Rss']:+d} KiB, "
                f"Anonymous {a['Anonymous'] - b['Anonymous']:+d} KiB"
            )
    return lines


def diagnose(pid: int) -> list[str]:
    """What a stuck process's threads are doing: state, system call, then gdb's backtraces."""
    lines = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                syscall = f.read().strip()
            lines.append(f"thread {tid}: state {state}, syscall {syscall}")
        with open(f"/proc/{pid}/status") as f:
            lines += [line.strip() for line in f if line.startswith(("State", "TracerPid"))]
    except OSError as e:
        lines.append(f"/proc/{pid}: {e}")
    gdb = ["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off", "-p", str(pid)]
    try:
        out = subprocess.run(
            [*gdb, "-ex", "thread apply all bt 6", "-ex", "x/4i $pc"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        skip = ("[New LWP", "warning:")
        text = out.stdout + out.stderr
        lines += [line for line in text.splitlines() if line.strip() and not line.startswith(skip)]
    except (OSError, subprocess.SubprocessError) as e:
        lines.append(f"gdb: {e}")
    return lines


def _only_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise TargetError(f"process {pid} has children {children}, not one")
    return int(children[0])


class Target:
    """One running bench_target; see the C file for its arguments and commands."""

    def __init__(
        self,
        exe: Path,
        *,
        spin: int,
        blocked: int = 0,
        burn: int = 0,
        mainspin: bool = True,
        enter: Sequence[str] = (),
    ):
        """`enter`: a command prefix that runs it elsewhere (`nsenter` into a sandbox's
        PID namespace, which forks it): `pid` is then its id on this host, `ns_pid` there."""
        self.exe = exe
        self.argv = [str(exe), str(spin), str(blocked), str(burn), "1" if mainspin else "0"]
        self.proc = subprocess.Popen(
            [*enter, *self.argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._buffer = b""
        line = self.read_line(timeout=30)
        if not line.startswith("ready "):
            raise TargetError(f"{self.argv}: expected 'ready PID', got {line!r}")
        self.ns_pid = int(line.split()[1])
        self.pid = _only_child(self.proc.pid) if enter else self.ns_pid

    def read_line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TargetError(f"target {self.proc.pid}: no answer within {timeout} s")
            # poll, not select: a benchmark may hold more than 1,024 descriptors
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(left * 1000):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise TargetError(
                    f"target {self.proc.pid} closed its output: {self.describe_exit()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def ask(self, command: str, timeout: float = 60) -> str:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise TargetError(f"target {self.proc.pid} is gone: {self.describe_exit()}") from None
        return self.read_line(timeout)

    def call(self, x: int, timeout: float = 60) -> int:
        answer = self.ask(f"call {x}", timeout=timeout)
        if not answer.startswith("result "):
            raise TargetError(f"call {x}: {answer!r}")
        return int(answer.split()[1])

    def ns_per_call(self, calls: int) -> float:
        answer = self.ask(f"ns {calls}", timeout=600)
        if not answer.startswith("ns "):
            raise TargetError(f"ns {calls}: {answer!r}")
        return float(answer.split()[1])

    def stats(self) -> dict[str, int]:
        """calls, old, new, bad counts of the spinning threads (and last_bad x, result)."""
        words = self.ask("stats").split()
        if words[:1] != ["calls"]:
            raise TargetError(f"stats: {' '.join(words)!r}")
        out = {words[i]: int(words[i + 1]) for i in range(0, 8, 2)}
        out["last_bad_x"], out["last_bad_result"] = int(words[9]), int(words[10])
        return out

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def rss(self) -> dict[str, int]:
        return rss(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe_exit(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(TargetError, OSError):
                self.ask("quit", timeout=5)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def kill(self) -> None:
        """SIGKILL the program itself (not only the prefix that started it)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

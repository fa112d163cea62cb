"""A real fleet server for the benchmarks (server.py, fleet_publish.py): the key
ceremony, `micropatch server run` on a free port (SQLite, or a throwaway PostgreSQL
cluster with --workers), its memory, its stop."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks import peer_tools

READY_TIMEOUT = 120.0
ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The server could not be set up or measured."""


def micropatch(*args: object, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*peer_tools.micropatch_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise BenchError(f"micropatch {' '.join(map(str, args[:3]))}: {done.stderr.strip()[-600:]}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def key_ceremony(workdir: Path) -> Path:
    """A data directory whose repository signs targets online (as the tests set it up)."""
    from micropatch.trust.keys import generate_key, write_key_pair

    keys = workdir / "keys"
    keys.mkdir()
    private, _ = write_key_pair(generate_key("patches"), keys / "patches")
    data = workdir / "data"
    micropatch(
        "repo", "init", data / "repository", "--offline-dir", workdir / "offline",
        "--root-keys", 1, "--root-threshold", 1, "--targets-key", private, "--online-targets",
    )  # fmt: skip
    return data


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (.ci/postgres); its URL."""
    directory = workdir / "pg"
    done = subprocess.run(
        [str(ROOT / ".ci/postgres"), str(directory), str(free_port())],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise BenchError(f".ci/postgres: {done.stderr.strip()[-600:]}")
    try:
        yield done.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(
            [str(ROOT / ".ci/postgres"), "stop", str(directory / "data")],
            capture_output=True,
            timeout=120,
        )


@dataclass
class Server:
    data: Path
    database: str | None
    workers: int = 1
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    log: Path = Path()
    checkin_interval: int = 60  # seconds, what the server tells its agents

    def start(self) -> float:
        port = free_port()
        self.log = self.data.parent / f"server-{port}.log"
        database = ["--database", self.database] if self.database else []
        if self.workers > 1:
            database += ["--workers", str(self.workers)]
        start = time.perf_counter()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*peer_tools.micropatch_command(), "server", "run", "--data-dir", str(self.data),
                 "--listen", f"127.0.0.1:{port}",
                 "--checkin-interval", str(self.checkin_interval), *database],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        while time.perf_counter() - start < READY_TIMEOUT:
            with contextlib.suppress(httpx.HTTPError):  # every worker may not be up yet
                if httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200:
                    self.url = url
                    return time.perf_counter() - start
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"the server did not start: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def rss_kib(self, field: str = "VmHWM") -> int | None:
        """The server's memory (`field`: VmHWM its peak, VmRSS now), its --workers
        processes' included."""
        if self.proc is None:
            return None
        pids = [self.proc.pid, *children(self.proc.pid)]
        sizes = [rss_kib(pid, field) for pid in pids]
        return sum(x for x in sizes if x is not None) or None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server's processes have used."""
        if self.proc is None:
            return 0.0
        return sum(cpu_seconds(pid) for pid in (self.proc.pid, *children(self.proc.pid)))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss_kib(pid: int, field: str = "VmRSS") -> int | None:
    """`field` of /proc/PID/status (VmRSS now, VmHWM its peak), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a server's --workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(x) for x in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/PID/stat), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

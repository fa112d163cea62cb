"""A private "host" for tests that run an agent: its own PID and mount namespaces
and a tmpfs only they see, so that no test marks the real host's filesystems
with fanotify or patches a process it did not start.

    with Sandbox(tmp_path / "host") as box:
        box.host_path(box.root / "prog")      # the tmpfs, from outside (to write into it)
        NsTarget(box, box.root / "prog")      # a target started inside, driven as usual
        subprocess.run([*box.enter(), "micropatch", "agent", "run", ...])

`Sandbox` runs `unshare --pid --mount --fork --mount-proc` (mounts private, a
`sleep` as the namespace's init) and mounts a tmpfs on `root` inside; an agent
started there with `filesystems = [root]` marks that tmpfs only (its exec and
file marks are per superblock) and sees only the namespace's processes. From
outside, the tmpfs is reached through /proc/INIT/root. Closing it kills the
init, and with it every process of the namespace. Needs root, `unshare` and
`nsenter`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from targets.driver import Target


def available() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("nsenter"))


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


class Sandbox:
    """A PID + mount namespace with a private tmpfs at `root` (see the module doc)."""

    def __init__(
        self, root: Path, *, size: str = "512m", uts: str | None = None, pid: bool = True
    ) -> None:
        """`pid=False`: the host's PID namespace (an agent whose crash tracking needs
        the proc connector, which the kernel serves only there)."""
        self.root = Path(root)
        self.own_pids = pid
        self.root.mkdir(parents=True, exist_ok=True)
        script = f"mount -t tmpfs -o size={size},mode=0755 micropatch-test {self.root} && "
        if uts:
            script += f"hostname {uts} && "
        script += "echo ready && exec sleep infinity"
        flags = ["--mount", "--fork", "--propagation", "private"]
        flags += ["--pid", "--mount-proc"] if pid else []
        self.init = subprocess.Popen(
            ["unshare", *flags, *(["--uts"] if uts else []), "--kill-child", "sh", "-c", script],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.init_pid = 0
        try:
            assert self.init.stdout is not None
            line = self.init.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"the sandbox did not start: {line!r}")
            deadline = time.monotonic() + 10
            while not self.init_pid:
                found = children(self.init.pid)
                if found:
                    self.init_pid = found[0]
                elif time.monotonic() > deadline:
                    raise RuntimeError("the sandbox's init did not show")
                else:
                    time.sleep(0.01)
        except BaseException:
            self.close()
            raise

    def enter(self) -> list[str]:
        """The command prefix that runs a program inside."""
        return ["nsenter", "--target", str(self.init_pid), "--pid", "--mount", "--uts", "--"]

    def ns_pid(self, host_pid: int) -> int:
        """A process's id inside (the last of its NSpid line)."""
        for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise ValueError(f"no NSpid for process {host_pid}")

    def host_path(self, path: Path | str) -> Path:
        """`path` (inside) as the host reaches it (through the init's root)."""
        return Path(f"/proc/{self.init_pid}/root") / Path(path).relative_to("/")

    def install(self, files: dict[str, Path], directory: Path | str) -> dict[str, Path]:
        """Copy files (modes kept) into `directory` inside; their paths there by name.
        Build and sign on the host, then install: code that resolves paths must not
        see /proc/INIT/root (a link to the host's /)."""
        inside = Path(directory)
        self.host_path(inside).mkdir(parents=True, exist_ok=True)
        placed = {}
        for name, source in files.items():
            shutil.copy2(source, self.host_path(inside / source.name))
            placed[name] = inside / source.name
        return placed

    def run(self, *argv: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a command inside to its end (capture_output, text)."""
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [*self.enter(), *map(str, argv)], capture_output=True, text=True, **kw
        )

    def close(self) -> None:
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)  # the namespace's init: all of it goes
            # Without a PID namespace of its own nothing else goes with the init: the
            # caller stops what it started there.
        self.init.kill()
        self.init.wait()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()


class NsTarget(Target):
    """A target program started inside a sandbox: `pid` is its id on the host (for
    live.status from the test), `ns_pid` its id inside (what the agent reports)."""

    def __init__(
        self, box: Sandbox, path: str | os.PathLike[str], *args: str, **kw: object
    ) -> None:
        self.box = box
        self.ns_pid = 0
        self.host_pid = 0
        super().__init__(path, *args, **kw)  # type: ignore[arg-type]

    def _argv(self) -> list[str]:
        return [*self.box.enter(), str(self.path), *self.args]

    def _ready(self, line: str) -> None:
        if not line.startswith("ready "):
            raise self._error(f"expected 'ready PID', got {line!r}")
        self.ns_pid = int(line.split()[1])
        found = children(self.proc.pid)  # nsenter forked the program
        if not found:
            raise self._error("nsenter has no child")
        self.host_pid = found[0]

    @property
    def pid(self) -> int:
        return self.host_pid

    def kill(self) -> None:
        if self.host_pid and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.host_pid, signal.SIGKILL)
        super().kill()

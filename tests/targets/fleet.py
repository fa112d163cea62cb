"""Hosts of a real fleet on one machine, for tests/integration/test_fleet_e2e.py and
benchmarks/fleet_publish.py.

Each "host" is a sandbox (targets/isolation.py: PID, mount and UTS namespaces, a
`sleep` as its init, its own host name, a private tmpfs): its agent (`micropatch
agent run`) and its targets are started in it with `nsenter`, so each agent sees
(and patches) its own processes only, as on separate machines, and watches only
its tmpfs (`filesystems` in its config), never the real host's filesystems. The
state directories, sockets and trust directories are separate; the rest of the
file system is shared. Needs root, `unshare` and `nsenter`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from targets.harness import ARTIFACTS, CFLAGS, BuildError
from targets.isolation import Sandbox

from micropatch.agent.client import AgentClient
from micropatch.build.artifact import build as build_artifact
from micropatch.elf.identity import identify
from micropatch.errors import ControlError
from micropatch.trust.keys import load_private_key

# copy_packet(.., len): `call 65` answers -2 unpatched ("would have overflowed"),
# -1 with this guard, and the guarded call is a "blocked" event.
GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}


def available() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("nsenter"))


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll until `check` holds (returns its value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)


def build_vuln_pie(out: Path, cc: str | None = None) -> Path:
    """Only vuln_pie of tests/targets (the fleet's target), built as the harness does."""
    [artifact] = [a for a in ARTIFACTS if a.name == "vuln_pie"]
    compiler = cc or os.environ.get("CC") or "cc"
    out.mkdir(parents=True, exist_ok=True)
    target = out / artifact.output
    sources = [str(Path(__file__).resolve().parent / s) for s in artifact.sources]
    cmd = [compiler, *CFLAGS, *artifact.flags, "-o", str(target), *sources]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"building vuln_pie failed:\n$ {' '.join(cmd)}\n{done.stderr}")
    return target


def signed_guard(out: Path, module: Path, key: Path, *, id: str, version: int) -> Path:
    """The GUARD patch of `module`, version `version`, signed with `key`: its .mpatch."""
    name = f"{id}-v{version}"
    out.mkdir(parents=True, exist_ok=True)
    with open(module, "rb") as f:
        build_id = identify(f).build_id
    source = out / f"{name}.toml"
    lines = [
        "[patch]", f'id = "{id}"', f"version = {version}", f'title = "{id} v{version}"', "",
        "[target]", f'module = "{module.name}"', f'build_id = "{build_id}"', "",
        "[[patchlet]]", *(f"{k} = {json.dumps(v)}" for k, v in GUARD.items()), "",
    ]  # fmt: skip
    source.write_text("\n".join(lines))
    directory = out / name
    directory.mkdir(exist_ok=True)
    return build_artifact(source, module).signed(load_private_key(key)).write(directory)


class Host:
    """A sandbox standing for one machine: an init, then an agent and targets."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root / name
        self.root.mkdir()
        self.targets: list[NsTarget] = []
        self.box = Sandbox(self.root / "fs", uts=name)
        self.init_pid = self.box.init_pid

    def enter(self) -> list[str]:
        return self.box.enter()

    def start(self, program: Path) -> NsTarget:
        t = NsTarget([*self.enter(), str(program)])
        self.targets.append(t)
        return t

    def close(self) -> None:
        for t in self.targets:
            t.close()
        self.box.close()


class NsTarget:
    """A target program in a namespace, driven line by line (its pid is the namespace's)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            bufsize=0,
        )  # fmt: skip
        self._buf = b""
        try:
            ready = self.readline()
        except BaseException:
            self.close()
            raise
        if not ready.startswith("ready "):
            self.close()
            raise AssertionError(f"the target said {ready!r}")
        self.pid = int(ready.split()[1])  # in the namespace

    def readline(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError("the target did not answer")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError("the target exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        return self.readline()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()


def agent_config(checkin: float, *, blocked_interval: float | None = None) -> str:
    """agent.toml: check in (and rescan the inventory) every `checkin` seconds."""
    text = f"checkin_interval = {checkin}\ninventory_interval = {checkin}\n"
    if blocked_interval is not None:
        text = f"blocked_interval = {blocked_interval}\n" + text
    return text


class FleetAgent:
    """`micropatch agent run` inside a host's namespace."""

    def __init__(
        self,
        host: Host,
        trusted: Path,
        root_json: Path,
        config: str,
        command: Sequence[str] = ("micropatch",),
    ) -> None:
        self.host = host
        d = host.root
        self.state, self.socket, self.trust = d / "state", d / "agent.sock", d / "trusted"
        self.trust.mkdir()
        shutil.copy(trusted, self.trust / trusted.name)
        shutil.copy(root_json, self.trust / "repository-root.json")
        self.config = d / "agent.toml"
        self.config.write_text(f"{config}filesystems = [{json.dumps(str(host.box.root))}]\n")
        self.command = list(command)
        self.client = AgentClient(self.socket, timeout=60)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> FleetAgent:
        self.runs += 1
        with open(self.host.root / f"agent-{self.runs}.out", "wb") as out, \
                open(self.host.root / f"agent-{self.runs}.err", "wb") as err:  # fmt: skip
            self.proc = subprocess.Popen(
                [*self.host.enter(), *self.command, "agent", "run", "--state-dir", str(self.state), "--socket", str(self.socket), "--trust-dir", str(self.trust), "--config", str(self.config)],
                stdout=out, stderr=err,
            )  # fmt: skip
        wait_for(self._ready, 60, f"agent {self.host.name} ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = (self.host.root / f"agent-{self.runs}.err").read_text()
            raise AssertionError(f"agent {self.host.name} exited: {err}")
        try:
            return bool(self.client.call("ping")["ready"])
        except ControlError:
            return False

    def status(self) -> dict[str, Any]:
        return dict(self.client.call("status"))

    def events(self, **filters: Any) -> list[dict[str, Any]]:
        return list(self.client.call("events", limit=10_000, **filters))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # nsenter forked the agent: signal the agent itself, nsenter exits with it.
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                for pid in children.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

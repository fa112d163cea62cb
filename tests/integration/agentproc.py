"""The host agent as a real process (`micropatch agent run`) for the integration tests,
inside a sandbox (tests/targets/isolation.py): its own PID and mount namespaces and
a private tmpfs, the only filesystem it watches (`filesystems` in its config). It
sees and patches only the processes started in the sandbox (`nstart`), and marks
nothing of the host's.

    def test_x(targets, nstart, agent, tmp_path, keys):
        t = nstart("vuln_pie")                 # t.pid on the host, t.ns_pid inside
        agent.start()
        agent.cli("add", signed(tmp_path, targets.vuln_pie, [FIX], keys))
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from targets.fleet import wait_for
from targets.isolation import NsTarget, Sandbox, available, children

from micropatch import live
from micropatch.agent.client import AgentClient
from micropatch.build.artifact import build as build_artifact
from micropatch.errors import ControlError
from micropatch.trust.keys import generate_key, load_private_key, write_key_pair

from .patching import patch_source

# copy_packet: `call 65` answers -2 ("would have overflowed"); v1 makes it -1, v2 64.
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
FIX_V2 = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, 64\nok:"}
GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}
NEEDS = pytest.mark.skipif(not available(), reason="needs root, unshare and nsenter")


def micropatch(*args: object, env: dict[str, str] | None = None, **kw: Any):
    done = subprocess.run(
        ["micropatch", *map(str, args)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "250", **(env or {})}, **kw,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


class AgentProcess:
    """`micropatch agent run` in the background inside `box`, its events (stdout) in a file."""

    def __init__(self, box: Sandbox, root: Path, socket: Path, config: str = "") -> None:
        self.box = box
        self.root = root
        self.state = root / "state"
        self.socket = socket
        self.trust = root / "trusted"
        self.config = root / "agent.toml"
        text = config or "blocked_interval = 0.2\n"
        self.config.write_text(f"{text}filesystems = [{json.dumps(str(box.root))}]\n")
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = AgentClient(socket, timeout=60)

    def start(self) -> AgentProcess:
        self.runs += 1
        self.stdout = self.root / f"agent-{self.runs}.out"
        with open(self.stdout, "wb") as out, open(self.root / f"agent-{self.runs}.err", "wb") as e:
            self.proc = subprocess.Popen(
                [*self.box.enter(), shutil.which("micropatch") or "micropatch", "agent", "run",
                 "--state-dir", self.state, "--socket", self.socket, "--trust-dir", self.trust,
                 "--config", self.config],
                stdout=out, stderr=e,
            )  # fmt: skip
        wait_for(self._ready, 60, "the agent to be ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited: {self.stderr()}")
        try:
            return bool(self.client.call("ping")["ready"])
        except ControlError:
            return False

    def stderr(self) -> str:
        return (self.root / f"agent-{self.runs}.err").read_text()

    def events(self) -> list[dict[str, Any]]:
        """The JSON lines this run wrote on stdout."""
        return [json.loads(line) for line in self.stdout.read_text().splitlines() if line]

    def status(self) -> dict[str, Any]:
        return dict(self.client.call("status"))

    def cli(self, *args: object) -> subprocess.CompletedProcess[str]:
        return micropatch("agent", *args, "--socket", self.socket)

    def send(self, sig: int) -> None:
        """Signal the agent itself (nsenter forked it; it exits as the agent does)."""
        assert self.proc is not None
        for pid in children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.send(sig)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.send(signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    """This test's private host (PID + mount namespaces, a tmpfs)."""
    with Sandbox(tmp_path / "host") as b:
        yield b


@pytest.fixture
def nstart(targets: Any, box: Sandbox) -> Iterator[Any]:
    """Start a target by name inside the sandbox; all are closed at the end."""
    started: list[NsTarget] = []

    def _start(name: str, *args: str, **kw: Any) -> NsTarget:
        t = NsTarget(box, targets.path(name), *args, **kw)
        started.append(t)
        return t

    yield _start
    for t in reversed(started):
        t.close()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """tmp_path/keys/dev.key (and .pub); the agent trusts dev.pub."""
    (tmp_path / "keys").mkdir()
    write_key_pair(generate_key("dev", expires_days=30), tmp_path / "keys" / "dev")
    (tmp_path / "trusted").mkdir()
    shutil.copy(tmp_path / "keys" / "dev.pub", tmp_path / "trusted" / "dev.pub")
    return tmp_path / "keys" / "dev.key"


@pytest.fixture
def agent(box: Sandbox, tmp_path: Path, keys: Path) -> Iterator[AgentProcess]:
    """An agent (not started) on tmp_path, in the sandbox; killed at the end whatever
    happened."""
    a = AgentProcess(box, tmp_path, tmp_path / "agent.sock")
    yield a
    a.kill()


def signed(tmp_path: Path, module: Path, patchlets, key: Path, *, id="agent-fix", version=1,
           name: str | None = None) -> Path:  # fmt: skip
    """A signed artifact for `module`, written to tmp_path/NAME/."""
    name = name or f"{id}-v{version}"
    source = tmp_path / f"{name}.toml"
    source.write_text(patch_source(module, patchlets, id=id, version=version))
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    return build_artifact(source, module).signed(load_private_key(key)).write(out)


def applied(pid: int) -> list[tuple[str, int]]:
    """What the registry of process `pid` (host pid) says it carries."""
    return [(s.patch_id, s.version) for s in live.status(pid)]


def kinds(events: list[dict[str, Any]], kind: str, pid: int | None = None) -> list[dict]:
    return [e for e in events if e["kind"] == kind and (pid is None or e["pid"] == pid)]

"""The agent benchmark's fixtures: bench_target built with a build-id of its own
(no other process on the host carries that build, so the agent under test touches
none of another run's), the signed artifacts, the agent as a real process in a
sandbox (tests/targets/isolation.py: its own PID and mount namespaces and a private
tmpfs, the only filesystem it watches: it marks nothing of the host's and sees only
the processes started there), the fleet of idle targets started in it, and how
"patched" is seen from outside (/proc/PID/mem, by host pid)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import patches, peer_tools
from benchmarks.target import CFLAGS, SOURCE, Target, module_base, symbol_offsets

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from targets.isolation import Sandbox, children  # noqa: E402

TIMEOUT = 120.0
READY_TIMEOUT = 120.0
PERIOD = 0.002  # seconds between two sweeps over the processes not yet seen changed
AGENT_ID = "bench-agent"  # in the agent's store: enable / disable
DIRECT_ID = "bench-agent-direct"  # the same patch for `apply --all` without the agent
CLI_ID = "bench-agent-cli"  # part 3, through the agent and directly
JUMP = 0xE9


class BenchError(Exception):
    """micropatch or the agent could not be measured."""


@dataclass
class Setup:
    workdir: Path
    exe: Path
    offset: int  # compute() in the module
    original: bytes  # its first 5 bytes in the file
    artifacts: dict[str, Path] = field(default_factory=dict)
    trust: Path = Path()
    socket: Path = Path()
    box: Sandbox | None = None  # where the agent and the targets run


def micropatch(
    *args: object, env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*peer_tools.micropatch_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return done


def checked(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if done.returncode != 0:
        raise BenchError(
            f"{shlex_join(done.args)} exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-600:]}"
        )
    return done


def shlex_join(argv: Any) -> str:
    import shlex

    return shlex.join(map(str, argv)) if isinstance(argv, list) else str(argv)


def build_unique(directory: Path) -> Path:
    """bench_target as benchmarks/target.py builds it, with a random build-id: the
    patch names this build only, so the agent under test leaves alone every other
    bench_target on the host (another helper's benchmark, say)."""
    exe = directory / "bench_target"
    build_id = f"-Wl,--build-id=0x{os.urandom(16).hex()}"
    subprocess.run(["cc", *CFLAGS, build_id, "-o", str(exe), str(SOURCE)], check=True)
    return exe


def prepare(workdir: Path, box: Sandbox) -> Setup:
    """bench_target, a key pair the agent trusts, and the three signed artifacts."""
    from micropatch.build.artifact import build as build_artifact
    from micropatch.trust.keys import generate_key, load_private_key, write_key_pair

    exe = build_unique(workdir)
    offset = symbol_offsets(exe, ["compute"])["compute"]
    with open(exe, "rb") as f:
        f.seek(offset)  # -O2 PIE: .text's file offset equals its address offset
        original = f.read(5)
    setup = Setup(workdir=workdir, exe=exe, offset=offset, original=original, box=box)
    keys = workdir / "keys"
    keys.mkdir()
    write_key_pair(generate_key("bench", expires_days=1), keys / "bench")
    setup.trust = workdir / "trusted"
    setup.trust.mkdir()
    shutil.copy(keys / "bench.pub", setup.trust / "bench.pub")
    bid = patches.build_id(exe)
    key = load_private_key(keys / "bench.key")
    for patch_id in (AGENT_ID, DIRECT_ID, CLI_ID):
        source = workdir / f"{patch_id}.toml"
        source.write_text(patches.source(patch_id, bid, "compute", patches.PLUS_ONE))
        out = workdir / patch_id
        out.mkdir()
        setup.artifacts[patch_id] = build_artifact(source, exe).signed(key).write(out)
    setup.socket = workdir / "agent.sock"
    return setup


def bytecode(compile_: bool) -> dict[str, Any]:
    """Compile micropatch's modules to bytecode, as an installed package has them.

    An editable install under PYTHONDONTWRITEBYTECODE=1 (this environment) has no
    .pyc: every command would compile micropatch's sources anew, which a real
    install does not. compileall writes only what is missing or stale."""
    import compileall

    import micropatch

    package = Path(micropatch.__file__).parent
    before = len(list(package.rglob("*.pyc")))
    if compile_:
        compileall.compile_dir(package, quiet=1)
    return {
        "package": str(package),
        "pyc_before": before,
        "pyc_after": len(list(package.rglob("*.pyc"))),
        "compiled_by_benchmark": compile_,
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
    }


# --- the agent process ------------------------------------------------------------


class Agent:
    """`micropatch agent run` in the background in the sandbox; killed at the end
    whatever happens. `proc` is nsenter, `pid` the agent itself (on the host)."""

    def __init__(self, setup: Setup, config: str = "") -> None:
        assert setup.box is not None
        self.setup = setup
        self.box = setup.box
        self.root = setup.workdir
        self.config = self.root / "agent.toml"
        # Every other key at its default; it watches the sandbox's filesystem only.
        self.config.write_text(f"{config}filesystems = [{json.dumps(str(self.box.root))}]\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self._pid = 0

    def start(self) -> float:
        """Start it; seconds until it answers ready (store loaded, first pass done)."""
        from micropatch.agent.client import AgentClient
        from micropatch.errors import ControlError

        self.client = AgentClient(self.setup.socket, timeout=60)
        start = time.perf_counter()
        with open(self.root / "agent.out", "wb") as out, open(self.root / "agent.err", "wb") as e:
            self.proc = subprocess.Popen(
                [*self.box.enter(), *peer_tools.micropatch_command(), "agent", "run",
                 "--state-dir", str(self.root / "state"), "--socket", str(self.setup.socket),
                 "--trust-dir", str(self.setup.trust), "--config", str(self.config)],
                stdout=out, stderr=e, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the agent exited {self.proc.returncode}: {self.stderr()}")
            with contextlib.suppress(ControlError, OSError):
                if self.client.call("ping")["ready"]:
                    ready = time.perf_counter() - start
                    [self._pid] = children(self.proc.pid)  # nsenter forked the agent
                    return ready
            if time.monotonic() > deadline:
                raise BenchError(f"the agent was not ready within {READY_TIMEOUT} s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self._pid, "the agent was not started"
        return self._pid

    def stderr(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "agent.err").read_text()[-2000:]
        return ""

    def status(self) -> dict[str, Any]:
        return dict(self.client.call("status"))

    def cli(self, *args: object) -> subprocess.CompletedProcess[str]:
        return micropatch("agent", *args, "--socket", self.setup.socket)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def crash(self) -> None:
        """SIGKILL: as the OOM killer would (the processes stay patched)."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self._pid:
            self._signal(signal.SIGTERM)
        else:
            self.proc.send_signal(signal.SIGTERM)  # nsenter passes it on
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if self._pid:
                self._signal(signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of pid, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def vm_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


# --- the fleet of idle targets ---------------------------------------------------


class Fleet:
    """N idle bench_target processes in the sandbox; each killed at the end whatever
    happens. Keyed by host pid (what /proc and the direct CLI see)."""

    def __init__(self, setup: Setup, count: int) -> None:
        assert setup.box is not None
        exe, offset, original = setup.exe, setup.offset, setup.original
        self.targets: list[Target] = []
        self.sites: dict[int, int] = {}  # pid -> address of compute()
        try:
            for _ in range(count):
                t = Target(exe, spin=0, mainspin=False, enter=setup.box.enter())
                self.targets.append(t)
                self.sites[t.pid] = module_base(t.pid, exe) + offset
                if len(self.sites) == 1 and entry(t.pid, self.sites[t.pid]) != original:
                    raise BenchError("compute()'s bytes in the process differ from the file's")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return list(self.sites)

    def close(self) -> None:
        for t in self.targets:
            if t.proc.poll() is None:
                t.kill()
        for t in self.targets:
            with contextlib.suppress(subprocess.TimeoutExpired):
                t.proc.wait(timeout=10)
            for stream in (t.proc.stdin, t.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self.targets.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Bystanders:
    """`sleep` processes until the sandbox (the agent's host) holds at least `total`
    processes (other programs, which the agent looks at and leaves alone), started by
    one shell there; killed at the end whatever happens."""

    def __init__(self, box: Sandbox, total: int) -> None:
        self.box = box
        more = max(0, total - box_processes(box) - 1)  # the shell is one
        script = f"i=0; while [ $i -lt {more} ]; do sleep 3600 & i=$((i+1)); done; echo up; wait"
        self.shell = subprocess.Popen(
            [*box.enter(), "sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        assert self.shell.stdout is not None
        if self.shell.stdout.readline().strip() != b"up":
            self.close()
            raise BenchError("the bystanders did not start")

    def close(self) -> None:
        """The sleeps killed, the shell reaps them (no zombie left to the sandbox's
        init, which reaps nothing) and exits."""
        shells = children(self.shell.pid)
        for sh in shells:
            for pid in children(sh):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            self.shell.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for sh in shells:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sh, signal.SIGKILL)
            self.shell.wait()
        if self.shell.stdout is not None:
            self.shell.stdout.close()

    def __enter__(self) -> Bystanders:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def box_processes(box: Sandbox) -> int:
    """Processes in the sandbox's PID namespace (its init included)."""
    ns = os.readlink(f"/proc/{box.init_pid}/ns/pid")
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{name}/ns/pid") == ns
    return count


def entry(pid: int, address: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, 5, address)
    finally:
        os.close(fd)


def is_patched(first: bytes, original: bytes) -> bool:
    return first[:1] == bytes([JUMP]) and first != original


def timed(argv: list[str], env: dict[str, str], sites: dict[int, int], original: bytes,
          patched: bool) -> dict[str, Any]:  # fmt: skip
    """Run the command; sweep the processes until each is seen (un)patched.

    seconds: start of the command to the last process seen changed;
    exit: start of the command to its exit."""
    pending = dict(sites)
    seen: dict[int, float] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    exited: float | None = None
    deadline = time.monotonic() + TIMEOUT
    while pending and time.monotonic() < deadline:
        for pid, address in list(pending.items()):
            try:
                first = entry(pid, address)
            except OSError:
                continue
            if is_patched(first, original) == patched:
                seen[pid] = time.perf_counter() - start
                del pending[pid]
        if exited is None and proc.poll() is not None:
            exited = time.perf_counter() - start
            if proc.returncode != 0:
                break
        if pending:
            time.sleep(PERIOD)
    out, err = proc.communicate(timeout=TIMEOUT)
    if exited is None:
        exited = time.perf_counter() - start
    result: dict[str, Any] = {
        "seconds": max(seen.values()) if not pending and seen else None,
        "exit": exited,
        "first": min(seen.values()) if seen else None,
        "changed": len(seen),
        "missing": len(pending),
        "returncode": proc.returncode,
    }
    if proc.returncode != 0 or pending:
        result["error"] = (
            f"{shlex_join(argv)} exited {proc.returncode}, {len(pending)} processes not "
            f"{'patched' if patched else 'unpatched'}: {(err or out).strip()[-600:]}"
        )
    return result


def wait_all(sites: dict[int, int], original: bytes, *, patched: bool) -> None:
    """Until every process is (un)patched, or TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    pending = dict(sites)
    while pending:
        for pid, address in list(pending.items()):
            with contextlib.suppress(OSError):
                if is_patched(entry(pid, address), original) == patched:
                    del pending[pid]
        if time.monotonic() > deadline:
            raise BenchError(f"{len(pending)} processes not {'' if patched else 'un'}patched")
        time.sleep(0.05)


def registries(pids: list[int], patch_id: str, present: bool) -> int:
    """Processes whose registry disagrees: patch_id listed as applied iff present."""
    from micropatch import live

    wrong = 0
    for pid in pids:
        try:
            applied = {s.patch_id for s in live.status(pid) if s.state == "applied"}
        except Exception:
            wrong += 1
            continue
        if (patch_id in applied) != present:
            wrong += 1
    return wrong

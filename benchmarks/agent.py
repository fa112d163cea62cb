"""agent: enabling a patch for many running processes, idle cost, and the CLI through it.

A real agent (`micropatch agent run`, temporary state directory, socket, trust
directory and an empty configuration: every key at its default) and N idle
copies of bench_target (one thread each, blocked in read() on its stdin; each
a real process), in one run:

1. Fleet: the patch (compute() returns 2x+2) is in the agent's store disabled
   (`agent add --disabled`); then `agent enable ID` → every process patched,
   and `agent disable ID` → every process unpatched; against the CLI run
   directly (`MICROPATCH_NO_AGENT=1 micropatch apply ARTIFACT --all`, then
   `remove ID --all`) on the same processes, rounds interleaved. The direct
   artifact is the same patch under another id, so that the agent, which leaves
   alone what is not in its store, does not touch it. Timed from just before
   the command is started to the last process seen patched (or unpatched):
   "patched" is the first 5 bytes of compute() in the process, read from
   /proc/PID/mem in sweeps over the processes not yet seen (every PERIOD s)
   while the command runs, being the patch's jump (`e9`) instead of the
   module's bytes — the instant calls go through the patchlet. After each
   step every process's registry is checked (`live.status`, untimed): the
   patch listed as applied, or absent.
2. Idle: with every process patched by the agent, its CPU (utime + stime of
   /proc/AGENT/stat, all threads) over IDLE seconds and its VmRSS (and VmHWM)
   from /proc/AGENT/status. Aims (issue 8): < 1% of one core, < 60 MB.
3. CLI: `micropatch apply ARTIFACT --pid PID` with the agent answering on its
   socket (the command routes through it), against the same command run
   directly (`MICROPATCH_NO_AGENT=1`) and against `gdb -batch -p PID -ex 'set
   {unsigned char[5]}compute = {0xe9, ...}'` (peers.gdb_cli: the same 5-byte
   jump to compute_alt). One idle target (its one thread waiting on stdin: on
   2 shared CPUs a spinning target would take a core from every command
   measured; peers.py measures under spinning threads), tools in rotating
   order, one unrecorded warm-up; command start to exit, the result checked (`call 5` = 12). Each
   is undone after: `micropatch remove ID --pid PID` the same way (timed too),
   gdb's bytes written back through /proc/PID/mem. Aim: ≥ 10x faster than gdb.
   Two references apart, to see where the time through the agent goes: the
   same request sent on the agent's socket from this process (what the agent
   itself takes), and a fresh interpreter importing the client's modules.

new_processes is true in the configuration, but this build's agent plugs no
new-process interception in (service._plug_new_processes is empty): execs
are not held. The proc connector (crash auto-disable) is on: every exit on
the host is an event the agent reads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import patches, peers, report
from benchmarks.stats import ratio, summary
from benchmarks.target import (
    Target,
    TargetError,
    build,
    build_command,
    module_base,
    symbol_offsets,
)

NAME = "agent"
PROCESSES = 500
QUICK_PROCESSES = 20
ROUNDS = 5
QUICK_ROUNDS = 1
IDLE = 30.0
QUICK_IDLE = 3.0
CLI_RUNS = 20
QUICK_CLI_RUNS = 3
PERIOD = 0.002  # seconds between two sweeps over the processes not yet seen changed
TIMEOUT = 120.0
READY_TIMEOUT = 120.0
AGENT_ID = "bench-agent"  # in the agent's store: enable / disable
DIRECT_ID = "bench-agent-direct"  # the same patch for `apply --all` without the agent
CLI_ID = "bench-agent-cli"  # part 3, through the agent and directly
ENABLE_AIM = 2.0
CPU_AIM = 0.01
RSS_AIM_KIB = 60 * 1024
GDB_AIM = 10.0
JUMP = 0xE9

CLI_TOOLS = {
    "through_agent": "`micropatch apply --pid` through the agent (CLI process)",
    "direct": "`micropatch apply --pid`, MICROPATCH_NO_AGENT=1 (CLI process)",
    "gdb": "gdb -batch -p (CLI process)",
    "socket": "the agent's socket from the benchmark's process (no CLI process)",
}
CLIENT_IMPORTS = "import micropatch.cli.quick, micropatch.agent.client, micropatch.cli.answers"


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


def micropatch(
    *args: object, env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*peers._micropatch(), *map(str, args)],
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


def prepare(workdir: Path) -> Setup:
    """bench_target, a key pair the agent trusts, and the three signed artifacts."""
    from micropatch.build.artifact import build as build_artifact
    from micropatch.trust.keys import generate_key, load_private_key, write_key_pair

    exe = build(workdir)
    offset = symbol_offsets(exe, ["compute"])["compute"]
    with open(exe, "rb") as f:
        f.seek(offset)  # -O2 PIE: .text's file offset equals its address offset
        original = f.read(5)
    setup = Setup(workdir=workdir, exe=exe, offset=offset, original=original)
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
    """`micropatch agent run` in the background; killed at the end whatever happens."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.root = setup.workdir
        self.config = self.root / "agent.toml"
        self.config.write_text("")  # every key at its default
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; seconds until it answers ready (store loaded, first pass done)."""
        from micropatch.agent.client import AgentClient
        from micropatch.errors import ControlError

        self.client = AgentClient(self.setup.socket, timeout=60)
        start = time.perf_counter()
        with open(self.root / "agent.out", "wb") as out, open(self.root / "agent.err", "wb") as e:
            self.proc = subprocess.Popen(
                [*peers._micropatch(), "agent", "run",
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
                    return time.perf_counter() - start
            if time.monotonic() > deadline:
                raise BenchError(f"the agent was not ready within {READY_TIMEOUT} s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

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

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
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
    """N idle bench_target processes; each killed at the end whatever happens."""

    def __init__(self, exe: Path, count: int, offset: int, original: bytes) -> None:
        self.targets: list[Target] = []
        self.sites: dict[int, int] = {}  # pid -> address of compute()
        try:
            for _ in range(count):
                t = Target(exe, spin=0, mainspin=False)
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
                t.proc.kill()
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


def fleet_rounds(setup: Setup, agent: Agent, fleet: Fleet, rounds: int) -> dict[str, Any]:
    """Interleaved rounds: agent enable, agent disable, direct apply --all, remove --all."""
    direct_env = {"MICROPATCH_NO_AGENT": "1", "MICROPATCH_TRUST_DIR": str(setup.trust)}
    mp = peers._micropatch()
    sock = ["--socket", str(setup.socket)]
    steps = {
        "agent_enable": ([*mp, "agent", "enable", AGENT_ID, *sock], {}, True, AGENT_ID),
        "agent_disable": ([*mp, "agent", "disable", AGENT_ID, *sock], {}, False, AGENT_ID),
        "direct_apply": (
            [*mp, "apply", str(setup.artifacts[DIRECT_ID]), "--all"], direct_env, True, DIRECT_ID
        ),
        "direct_remove": ([*mp, "remove", DIRECT_ID, "--all"], direct_env, False, DIRECT_ID),
    }  # fmt: skip
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in steps}
    for r in range(rounds):
        order = ["agent_enable", "agent_disable", "direct_apply", "direct_remove"]
        if r % 2:  # the direct CLI first in every other round
            order = order[2:] + order[:2]
        for step in order:
            argv, env, patched, patch_id = steps[step]
            print(f"agent: round {r + 1}/{rounds} {step}", file=sys.stderr)
            time.sleep(0.5)  # let the previous step's echoes settle
            outcome = timed(argv, env, fleet.sites, setup.original, patched)
            outcome["registry_wrong"] = registries(fleet.pids, patch_id, patched)
            outcome["agent_alive"] = agent.alive()
            samples[step].append(outcome)
            if not agent.alive():
                raise BenchError(f"the agent died: {agent.stderr()}")
    return {
        "samples": samples,
        "summaries": {
            step: {
                "seconds": summary([s["seconds"] for s in v if s["seconds"] is not None]),
                "exit": summary([s["exit"] for s in v]),
                "errors": [s["error"] for s in v if "error" in s],
                "registry_wrong": sum(s["registry_wrong"] for s in v),
            }
            for step, v in samples.items()
        },
    }


def idle(setup: Setup, agent: Agent, fleet: Fleet, seconds: float, spy: bool) -> dict[str, Any]:
    """Enable the patch, wait until all are patched, then the agent's CPU and memory.

    With spy, py-spy records that enable (not one of the timed rounds) apart."""
    with Spy(agent, "enable") if spy else contextlib.nullcontext() as enable_spy:
        out = timed(
            [*peers._micropatch(), "agent", "enable", AGENT_ID, "--socket", str(setup.socket)],
            {}, fleet.sites, setup.original, True,
        )  # fmt: skip
    if "error" in out:
        raise BenchError(f"enable before the idle measurement: {out['error']}")
    time.sleep(2.0)  # the pass's tail (events, blocked counters) done
    before = agent.status()
    tick = os.sysconf("SC_CLK_TCK")
    t0, c0 = time.perf_counter(), cpu_ticks(agent.pid)
    memory_start = vm_kib(agent.pid)
    time.sleep(seconds)
    t1, c1 = time.perf_counter(), cpu_ticks(agent.pid)
    memory = vm_kib(agent.pid)
    after = agent.status()
    wall = t1 - t0
    cpu = (c1 - c0) / tick
    [patch] = [p for p in after["patches"] if p["id"] == AGENT_ID]
    return {
        "enable_profile": enable_spy.result if enable_spy else None,
        "enable_seconds_profiled": out["seconds"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "cpu_share": cpu / wall,
        "clock_ticks_per_second": tick,
        "memory_kib": memory,
        "memory_kib_at_start": memory_start,
        "processes_covered": patch["processes"],
        "passes_during": after["passes"] - before["passes"],
        "threads": len(os.listdir(f"/proc/{agent.pid}/task")),
    }


class Spy:
    """`py-spy record` on the agent for the length of a with-block (if py-spy is installed):
    where its time goes, summed by activity (the two outermost micropatch frames) and by
    the innermost micropatch function. py-spy's default: idle threads are not sampled."""

    RATE = 200

    def __init__(self, agent: Agent, name: str) -> None:
        self.raw = agent.root / f"{name}.folded"
        self.pid = agent.pid
        self.proc: subprocess.Popen[str] | None = None
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Spy:
        spy = shutil.which("py-spy")
        if spy is None:
            self.result = {"error": "py-spy not installed (pip install py-spy)"}
            return self
        self.proc = subprocess.Popen(
            [spy, "record", "--pid", str(self.pid), "--rate", str(self.RATE), "--nonblocking",
             "--format", "raw", "--output", str(self.raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.start = time.perf_counter()
        time.sleep(1.0)  # attached
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is None:
            return
        seconds = time.perf_counter() - self.start
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.raw.exists():
            self.result = {"error": f"py-spy exited {self.proc.returncode}: {err[-400:]}"}
            return
        self.result = {"rate": self.RATE, "seconds": seconds, **folded(self.raw.read_text())}


def _function(frame: str) -> str:
    """'name (micropatch/x/y.py:12)' -> 'name (micropatch/x/y.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def folded(text: str) -> dict[str, Any]:
    """Folded stacks 'a;b;c COUNT' summed by activity and by innermost micropatch function."""
    by_activity: dict[str, int] = {}
    by_function: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        ours = [_function(f) for f in frames if "micropatch/" in f]
        activity = " > ".join(f.split(" (")[0] for f in ours[:2]) or frames[0]
        inner = ours[-1] if ours else _function(frames[-1])
        by_activity[activity] = by_activity.get(activity, 0) + n
        by_function[inner] = by_function.get(inner, 0) + n
    return {
        "samples": total,
        "by_activity": sorted(by_activity.items(), key=lambda kv: -kv[1])[:8],
        "by_function": sorted(by_function.items(), key=lambda kv: -kv[1])[:12],
    }


IMPORTS = (
    "sqlite3",
    "pydantic",
    "elftools",
    "iced_x86",
    "keystone",
    "cryptography",
    "micropatch.trust.admission",
    "micropatch.live",
    "micropatch.cli.main",
    "micropatch.agent.service",
)
FOOTPRINT = """\
import sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))
print("python", rss())
for name in sys.argv[1:]:
    __import__(name)
    print(name, rss())
"""


def import_footprint() -> dict[str, Any]:
    """VmRSS (KiB) of a fresh interpreter after each of the agent's main imports, in turn:
    how much of the agent's RSS is code and libraries loaded, not its own data."""
    done = subprocess.run(
        [sys.executable, "-c", FOOTPRINT, *IMPORTS], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-400:]}
    steps = [(line.split()[0], int(line.split()[1])) for line in done.stdout.splitlines()]
    added = [(name, kib - steps[i][1]) for i, (name, kib) in enumerate(steps[1:])]
    return {"python_kib": steps[0][1], "total_kib": steps[-1][1], "added_kib": added}


# --- part 3: one process, the CLI through the agent, directly, and gdb ------------


def write_back(pid: int, address: int, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        os.pwrite(fd, data, address)
    finally:
        os.close(fd)


def cli_runs(setup: Setup, agent: Agent, runs: int, warmup: int) -> dict[str, Any]:
    via_agent = {"MICROPATCH_AGENT_SOCKET": str(setup.socket)}
    direct = {"MICROPATCH_NO_AGENT": "1", "MICROPATCH_TRUST_DIR": str(setup.trust)}
    artifact = str(setup.artifacts[CLI_ID])
    offsets = symbol_offsets(setup.exe, ["compute", "compute_alt"])
    rel = offsets["compute_alt"] - (offsets["compute"] + 5)
    ctx = peers.Context(exe=setup.exe, workdir=setup.workdir)
    ctx.jump = b"\xe9" + rel.to_bytes(4, "little", signed=True)
    apply_s: dict[str, list[float]] = {t: [] for t in CLI_TOOLS}
    remove_s: dict[str, list[float]] = {t: [] for t in CLI_TOOLS}
    errors: dict[str, list[str]] = {t: [] for t in CLI_TOOLS}
    routed: list[str] = []
    client_start: list[float] = []
    bare_python: list[float] = []
    from micropatch.agent.client import AgentClient, artifact_arguments

    client = AgentClient(setup.socket, timeout=60)
    # What `micropatch apply|remove --pid` sends (cli/quick.py), pids aside.
    request = {"filters": None, "retries": None, "stop_timeout": None, "lock_timeout": None}
    tools = list(CLI_TOOLS)
    if shutil.which("gdb") is None:
        tools.remove("gdb")
        errors["gdb"].append("no gdb on PATH")
    with Target(setup.exe, spin=0, mainspin=False) as target:
        pid = target.pid
        address = module_base(pid, setup.exe) + setup.offset
        for run in range(warmup + runs):
            shift = run % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                print(f"agent: cli {run - warmup + 1}/{runs} {tool}", file=sys.stderr)
                try:
                    if target.call(5) != 11:
                        raise BenchError("compute(5) != 11 before the tool")
                    if tool == "gdb":
                        on = peers.gdb_cli(ctx, pid)
                    elif tool == "socket":
                        start = time.perf_counter()
                        client.call("apply", **artifact_arguments(artifact), **request, pids=[pid])
                        on = time.perf_counter() - start
                    else:
                        env = via_agent if tool == "through_agent" else direct
                        start = time.perf_counter()
                        done = checked(micropatch("apply", artifact, "--pid", pid, env=env))
                        on = time.perf_counter() - start
                        if tool == "through_agent" and "through the agent" not in done.stdout:
                            raise BenchError(f"not routed through the agent: {done.stdout!r}")
                        if run == warmup:
                            text = " / ".join(done.stdout.strip().splitlines())
                            routed.append(f"{tool}: {text.replace(str(setup.workdir), '$TMP')}")
                    if target.call(5) != 12:
                        raise BenchError(f"compute(5) = {target.call(5)} after the tool")
                    if tool == "gdb":
                        start = time.perf_counter()
                        write_back(pid, address, setup.original)
                        off = time.perf_counter() - start
                    elif tool == "socket":
                        start = time.perf_counter()
                        client.call("remove", patch_id=CLI_ID, **request, pids=[pid])
                        off = time.perf_counter() - start
                    else:
                        start = time.perf_counter()
                        checked(micropatch("remove", CLI_ID, "--pid", pid, env=env))
                        off = time.perf_counter() - start
                    if target.call(5) != 11:
                        raise BenchError("compute(5) != 11 after the undo")
                except (BenchError, peers.ToolFailed, TargetError, OSError,
                        subprocess.SubprocessError) as e:  # fmt: skip
                    errors[tool].append(f"{type(e).__name__}: {e}")
                    if not target.alive():
                        raise BenchError(f"the target died: {target.describe_exit()}") from e
                    with contextlib.suppress(Exception):
                        micropatch("remove", CLI_ID, "--pid", pid, env=direct)
                    with contextlib.suppress(OSError):
                        write_back(pid, address, setup.original)
                    continue
                if run >= warmup:
                    apply_s[tool].append(on)
                    remove_s[tool].append(off)
            for code, into in ((CLIENT_IMPORTS, client_start), ("pass", bare_python)):
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", code], capture_output=True)
                if run >= warmup and done.returncode == 0:
                    into.append(time.perf_counter() - start)
    return {
        "target": "bench_target 0 0 0 0: one thread, waiting on stdin",
        "jump": ctx.jump.hex(" "),
        "routed_output": routed,
        "client_start": summary(client_start),
        "client_start_samples": client_start,
        "python_start": summary(bare_python),
        "summaries": {
            t: {
                "label": CLI_TOOLS[t],
                "apply": summary(apply_s[t]),
                "undo": summary(remove_s[t]),
                "errors": errors[t],
            }
            for t in CLI_TOOLS
        },
        "samples": {t: {"apply": apply_s[t], "undo": remove_s[t]} for t in CLI_TOOLS},
    }


# --- report -------------------------------------------------------------------


def _cell(s: dict[str, float]) -> str:
    if not s["n"]:
        return "—"
    return f"{report.ms(s['median'])} / {report.ms(s['p90'])} / {report.ms(s['max'])}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _bytecode_note(b: dict[str, Any]) -> str:
    if b["compiled_by_benchmark"]:
        return (
            f"Bytecode: micropatch's modules compiled first, as an installed package has them "
            f"({b['pyc_before']} .pyc before, {b['pyc_after']} after: this environment's "
            f"editable install with PYTHONDONTWRITEBYTECODE={b['PYTHONDONTWRITEBYTECODE']} "
            "writes none, so every command would compile micropatch's sources anew)."
        )
    return f"Bytecode: not compiled by the benchmark (--no-compile; {b['pyc_before']} .pyc)."


def _profile_markdown(prof: dict[str, Any] | None, what: str) -> list[str]:
    if not prof:
        return []
    if "error" in prof:
        return ["", f"py-spy on {what}: {prof['error']}"]
    lines = [
        "",
        f"Where the time goes, py-spy on {what}: {prof['rate']} Hz, {prof['seconds']:.1f} s, "
        f"{prof['samples']} samples of busy threads, by activity (outermost micropatch frames) "
        "and by innermost micropatch function:",
        "",
        "| samples | activity |",
        "|---:|---|",
    ]
    lines += [f"| {count} | `{name}` |" for name, count in prof["by_activity"]]
    lines += ["", "| samples | function |", "|---:|---|"]
    lines += [f"| {count} | `{name}` |" for name, count in prof["by_function"]]
    return lines


def markdown(data: dict[str, Any]) -> str:
    n = data["processes"]
    cfg = data["agent_config"]
    lines = [
        f"A real agent (`micropatch agent run`; configuration: every key at its default, "
        f"rescan_interval = {cfg['rescan_interval']:g} s, blocked_interval = "
        f"{cfg['blocked_interval']:g} s, new_processes = {str(cfg['new_processes']).lower()}) "
        f"and {n} idle bench_target processes (one thread in read()). The agent was ready "
        f"{data['agent_ready_seconds']:.2f} s after its start with the {n} processes running. "
        "Its new-process interception (fanotify) holds every exec on the host while it "
        "decides, and its proc connector reads every exit on the host.",
        "",
        _bytecode_note(data["bytecode"]),
        "",
    ]
    fleet = data.get("fleet")
    if fleet:
        s = fleet["summaries"]
        rounds = s["agent_enable"]["exit"]["n"]
        lines += [
            f"## 1. A patch for {n} running processes",
            "",
            f"In ms, **median / p90 / max** of {rounds} interleaved rounds: from just before the "
            "command starts to the last process seen patched (its compute() entry is the patch's "
            "jump, read from /proc/PID/mem in sweeps while the command runs), and to the "
            "command's exit. Every process's registry checked after each step (`live.status`).",
            "",
            "| step | command | all changed (ms) | command exit (ms) | registries wrong | errors |",
            "|---|---|---:|---:|---:|---:|",
        ]
        labels = {
            "agent_enable": ("enable → all patched", f"`micropatch agent enable {AGENT_ID}`"),
            "direct_apply": (
                "apply → all patched",
                f"`MICROPATCH_NO_AGENT=1 micropatch apply {DIRECT_ID}.mpatch --all`",
            ),
            "agent_disable": ("disable → all removed", f"`micropatch agent disable {AGENT_ID}`"),
            "direct_remove": (
                "remove → all removed",
                f"`MICROPATCH_NO_AGENT=1 micropatch remove {DIRECT_ID} --all`",
            ),
        }
        for step, (what, cmd) in labels.items():
            c = s[step]
            lines.append(
                f"| {what} | {cmd} | {_cell(c['seconds'])} | {_cell(c['exit'])} "
                f"| {c['registry_wrong']} | {len(c['errors'])} |"
            )
        en, ap = s["agent_enable"]["seconds"]["median"], s["direct_apply"]["seconds"]["median"]
        dis, rm = s["agent_disable"]["seconds"]["median"], s["direct_remove"]["seconds"]["median"]
        lines += [
            "",
            f"- agent enable vs direct `apply --all`: {ratio(ap, en):.2f}x faster (medians); "
            f"agent disable vs direct `remove --all`: {ratio(rm, dis):.2f}x.",
            f"- Aim (issue 8): all {n} patched ≤ {ENABLE_AIM:g} s after enable: median "
            f"{en:.3f} s, max {s['agent_enable']['seconds']['max']:.3f} s — "
            f"{_verdict(s['agent_enable']['seconds']['max'] <= ENABLE_AIM)}.",
        ]
        for step, c in s.items():
            if c["errors"]:
                lines.append(f"- first error of {step}: `{c['errors'][0]}`")
        lines.append("")
    cost = data.get("idle")
    if cost:
        mem = cost["memory_kib"]
        lines += [
            f"## 2. The agent idle with {n} processes patched",
            "",
            f"After `agent enable` and every process patched: {cost['cpu_seconds']:.2f} s of CPU "
            f"(utime + stime, {cost['threads']} threads) in {cost['wall_seconds']:.1f} s = "
            f"**{cost['cpu_share'] * 100:.2f}% of one core**; VmRSS **{mem['VmRSS'] / 1024:.1f} "
            f"MiB** (RssAnon {mem.get('RssAnon', 0) / 1024:.1f}, RssFile "
            f"{mem.get('RssFile', 0) / 1024:.1f}; peak VmHWM {mem['VmHWM'] / 1024:.1f} MiB). "
            f"Processes covered (agent status): {cost['processes_covered']}; full passes in the "
            f"window: {cost['passes_during']} (rescan_interval {cfg['rescan_interval']:g} s); "
            f"blocked counters and store read every {cfg['blocked_interval']:g} s.",
            "",
            f"- Aim: CPU < {CPU_AIM * 100:g}% of one core — "
            f"{_verdict(cost['cpu_share'] < CPU_AIM)}",
            f"- Aim: RSS < {RSS_AIM_KIB // 1024} MB — {_verdict(mem['VmRSS'] < RSS_AIM_KIB)}",
        ]
        foot = data.get("import_footprint") or {}
        if "added_kib" in foot:
            parts = ", ".join(f"{name} +{kib / 1024:.1f}" for name, kib in foot["added_kib"])
            lines += [
                "",
                f"For reference, a fresh interpreter importing what the agent runs on: "
                f"{foot['total_kib'] / 1024:.1f} MiB VmRSS (python alone "
                f"{foot['python_kib'] / 1024:.1f}; then, in turn, MiB: {parts}). The rest of the "
                "agent's RSS is its own data (module cache, processes, SQLite, threads).",
            ]
        lines += _profile_markdown(
            data.get("profile"), "the idle agent (after the measurement, as long)"
        )
        lines += _profile_markdown(
            cost.get("enable_profile"),
            f"one more `agent enable` over the {n} processes (after the timed rounds; "
            f"all patched in {cost['enable_seconds_profiled']:.2f} s under py-spy)",
        )
        lines.append("")
    cli = data.get("cli")
    if cli:
        s = cli["summaries"]
        base = s["through_agent"]["apply"]["median"]
        runs = max(v["apply"]["n"] for v in s.values())
        lines += [
            "## 3. One process: the CLI through the agent, directly, and gdb",
            "",
            f"Command start to exit (the target patched: `call 5` answers 12), in ms, **median / "
            f"p90 / max** of {runs} runs after a warm-up, tools in rotating order, on one target "
            f"({cli['target']}). Undo: `micropatch remove {CLI_ID} --pid` the same way; gdb's "
            "bytes written back through /proc/PID/mem.",
            "",
            "| tool | apply (ms) | ÷ through the agent | undo (ms) | errors |",
            "|---|---:|---:|---:|---:|",
        ]
        for v in s.values():
            q = ratio(v["apply"]["median"], base)
            lines.append(
                f"| {v['label']} | {_cell(v['apply'])} | {'—' if q != q else f'{q:.2f}x'} "
                f"| {_cell(v['undo'])} | {len(v['errors'])} |"
            )
        gdb = s["gdb"]["apply"]["median"]
        q = ratio(gdb, base)
        if q == q:
            lines += [
                "",
                f"- Aim: through the agent ≥ {GDB_AIM:g}x faster than gdb batch: "
                f"{q:.1f}x — {_verdict(q >= GDB_AIM)}",
            ]
        c = cli["client_start"]
        if c["n"]:
            lines.append(
                f"- Where the time through the agent goes: a fresh interpreter importing the "
                f"client (`python -c '{CLIENT_IMPORTS}'`, timed after each run) takes "
                f"{report.ms(c['median'])} ms median (`python -c pass`: "
                f"{report.ms(cli['python_start']['median'])} ms); the agent answering the same "
                f"request on its socket (row 4: admission of the artifact, the apply) "
                f"{report.ms(s['socket']['apply']['median'])} ms; the rest is the command's "
                "own work (reading the artifact, printing the answer)."
            )
        for t, v in s.items():
            if v["errors"]:
                lines.append(f"- first error of {t}: `{v['errors'][0]}`")
        if cli["routed_output"]:
            lines += ["", "What each command printed (first recorded run):", ""]
            lines += [f"- `{line}`" for line in cli["routed_output"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument(
        "--processes", type=int, default=None, help=f"idle targets (default {PROCESSES})"
    )
    parser.add_argument("--rounds", type=int, default=None, help=f"default {ROUNDS}")
    parser.add_argument("--idle", type=float, default=None, help=f"seconds (default {IDLE:g})")
    parser.add_argument("--runs", type=int, default=None, help=f"CLI runs (default {CLI_RUNS})")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the idle agent after the measurement"
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="measure without compiling micropatch's modules to bytecode first",
    )
    args = report.parse(parser, argv)
    n = args.processes or (QUICK_PROCESSES if args.quick else PROCESSES)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    idle_seconds = args.idle or (QUICK_IDLE if args.quick else IDLE)
    runs = args.runs or (QUICK_CLI_RUNS if args.quick else CLI_RUNS)
    error = patches.engine_error()
    if error is not None:
        print(f"agent: engine unavailable: {error}", file=sys.stderr)
        return 1
    from micropatch.agent.config import AgentConfig

    data: dict[str, Any] = {
        "processes": n,
        "agent_config": AgentConfig().model_dump(),
        "target": {"source": "benchmarks/targets/bench_target.c", "build": build_command()},
        "period": PERIOD,
        "bytecode": bytecode(not args.no_compile),
    }
    failure: str | None = None
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp:
        setup = prepare(Path(tmp))
        agent = Agent(setup)
        try:
            print(f"agent: starting {n} targets", file=sys.stderr)
            start = time.perf_counter()
            with Fleet(setup.exe, n, setup.offset, setup.original) as fleet:
                data["fleet_start_seconds"] = time.perf_counter() - start
                data["agent_ready_seconds"] = agent.start()
                checked(agent.cli("add", "--disabled", setup.artifacts[AGENT_ID]))
                data["fleet"] = fleet_rounds(setup, agent, fleet, rounds)
                slow = data["fleet"]["summaries"]["agent_enable"]["seconds"]["max"] > ENABLE_AIM
                data["idle"] = idle(setup, agent, fleet, idle_seconds, args.profile or slow)
                data["import_footprint"] = import_footprint()
                if args.profile or data["idle"]["cpu_share"] >= CPU_AIM:
                    with Spy(agent, "idle") as spy:
                        time.sleep(idle_seconds)
                    data["profile"] = spy.result
                checked(agent.cli("disable", AGENT_ID))
                wait_all(fleet.sites, setup.original, patched=False)
            # The fleet is gone: part 3 on a quieter machine, the agent still running.
            data["cli"] = cli_runs(setup, agent, runs, warmup=0 if args.quick else 1)
            data["agent_alive_at_end"] = agent.alive()
        except Exception as e:
            traceback.print_exc()
            failure = f"{type(e).__name__}: {e}"
            data["error"] = failure
        finally:
            agent.kill()
            data["agent_exit"] = agent.proc.returncode if agent.proc else None
            data["agent_stderr_tail"] = agent.stderr()
    md = markdown(data) if "agent_ready_seconds" in data else ""
    if failure:
        md += f"\n\n**Run failed**: `{failure}`\n"
    _, md_path = report.write(
        NAME, args, argv, "agent: a patch for many processes, idle cost, CLI through it", data, md
    )
    print(md_path.read_text())
    fleet_errors = any(v["errors"] for v in data.get("fleet", {}).get("summaries", {}).values())
    cli = data.get("cli", {}).get("summaries", {})
    ours = any(cli[t]["errors"] for t in ("through_agent", "direct", "socket") if t in cli)
    return 1 if failure or fleet_errors or ours else 0


if __name__ == "__main__":
    sys.exit(main())

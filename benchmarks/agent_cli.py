"""Part 3 of the agent benchmark: `micropatch apply --pid` on one process through the
agent, directly, and gdb batch writing the same bytes (command start to exit)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from benchmarks import peer_tools
from benchmarks.agent_setup import CLI_ID, Agent, BenchError, Setup, checked, micropatch
from benchmarks.stats import summary
from benchmarks.target import Target, TargetError, module_base, symbol_offsets

CLI_TOOLS = {
    "through_agent": "`micropatch apply --pid` through the agent (CLI process)",
    "direct": "`micropatch apply --pid`, MICROPATCH_NO_AGENT=1 (CLI process)",
    "gdb": "gdb -batch -p (CLI process)",
    "socket": "the agent's socket from the benchmark's process (no CLI process)",
}
CLIENT_IMPORTS = (
    "import micropatch.cli.entry, micropatch.cli.spec, micropatch.cli.change, "
    "micropatch.cli.transport, micropatch.cli.report, micropatch.agent.client"
)


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
    ctx = peer_tools.Context(exe=setup.exe, workdir=setup.workdir)
    ctx.jump = b"\xe9" + rel.to_bytes(4, "little", signed=True)
    apply_s: dict[str, list[float]] = {t: [] for t in CLI_TOOLS}
    remove_s: dict[str, list[float]] = {t: [] for t in CLI_TOOLS}
    errors: dict[str, list[str]] = {t: [] for t in CLI_TOOLS}
    routed: list[str] = []
    client_start: list[float] = []
    bare_python: list[float] = []
    from micropatch.agent.client import AgentClient, artifact_arguments

    client = AgentClient(setup.socket, timeout=60)
    # What `micropatch apply|remove --pid` sends (cli/transport.py), pids aside.
    request = {"filters": None, "retries": None, "stop_timeout": None, "lock_timeout": None}
    tools = list(CLI_TOOLS)
    if shutil.which("gdb") is None:
        tools.remove("gdb")
        errors["gdb"].append("no gdb on PATH")
    assert setup.box is not None
    with Target(setup.exe, spin=0, mainspin=False, enter=setup.box.enter()) as target:
        pid = target.pid  # on the host: gdb, the direct CLI, /proc
        ns_pid = target.ns_pid  # in the sandbox: the agent's pid for it
        address = module_base(pid, setup.exe) + setup.offset
        for run in range(warmup + runs):
            shift = run % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                print(f"agent: cli {run - warmup + 1}/{runs} {tool}", file=sys.stderr)
                try:
                    if target.call(5) != 11:
                        raise BenchError("compute(5) != 11 before the tool")
                    if tool == "gdb":
                        on = peer_tools.gdb_cli(ctx, pid)
                    elif tool == "socket":
                        start = time.perf_counter()
                        client.call(
                            "apply", **artifact_arguments(artifact), **request, pids=[ns_pid]
                        )
                        on = time.perf_counter() - start
                    else:
                        env, which = (
                            (via_agent, ns_pid) if tool == "through_agent" else (direct, pid)
                        )
                        start = time.perf_counter()
                        done = checked(micropatch("apply", artifact, "--pid", which, env=env))
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
                        client.call("remove", patch_id=CLI_ID, **request, pids=[ns_pid])
                        off = time.perf_counter() - start
                    else:
                        start = time.perf_counter()
                        checked(micropatch("remove", CLI_ID, "--pid", which, env=env))
                        off = time.perf_counter() - start
                    if target.call(5) != 11:
                        raise BenchError("compute(5) != 11 after the undo")
                except (BenchError, peer_tools.ToolFailed, TargetError, OSError,
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

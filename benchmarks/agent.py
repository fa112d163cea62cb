"""agent: enabling a patch for many running processes, idle cost, and the CLI through it.

A real agent (`micropatch agent run`, temporary state directory, socket, trust
directory, and a configuration with every key at its default but `filesystems`)
and N idle copies of bench_target (one thread each, blocked in read() on its
stdin; each a real process), in one run. The agent and the targets run in a
sandbox (tests/targets/isolation.py: own PID and mount namespaces, a private
tmpfs, the only filesystem the agent watches): the agent marks nothing of the
host's filesystems and sees only the sandbox's processes, its "host". The
direct CLI and the sweeps that see a process patched run on the host (host pids):

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
3. Restart: with every process patched and bystanders (`sleep`) filling the
   sandbox to HOST_PROCESSES processes, the agent SIGKILLed (as the OOM killer
   would) and started again: seconds from its start to ready (its first pass
   over every process on the host done), RESTARTS times; after each, every
   process's registry checked (the patch once, not twice). Aim (issue 18): ≤ 3 s.
4. CLI: `micropatch apply ARTIFACT --pid PID` with the agent answering on its
   socket (the command routes through it, with the target's pid in the sandbox,
   as the agent sees it), against the same command run
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

new_processes is true (the default): the agent indexes and marks the sandbox's
tmpfs and holds the execs there (none during the timed steps). The proc
connector (crash auto-disable) serves no listener outside the host's PID
namespace: the agent says so and runs on without it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import patches, peer_tools, report
from benchmarks.agent_cli import cli_runs
from benchmarks.agent_profile import Spy, import_footprint
from benchmarks.agent_report import CPU_AIM, ENABLE_AIM, markdown
from benchmarks.agent_setup import (
    AGENT_ID,
    DIRECT_ID,
    PERIOD,
    Agent,
    BenchError,
    Bystanders,
    Fleet,
    Sandbox,
    Setup,
    box_processes,
    bytecode,
    checked,
    cpu_ticks,
    prepare,
    registries,
    timed,
    vm_kib,
    wait_all,
)
from benchmarks.stats import summary
from benchmarks.target import build_command

NAME = "agent"
PROCESSES = 500
QUICK_PROCESSES = 20
ROUNDS = 5
QUICK_ROUNDS = 1
IDLE = 30.0
QUICK_IDLE = 3.0
CLI_RUNS = 20
QUICK_CLI_RUNS = 3
HOST_PROCESSES = 1300
RESTARTS = 3


def fleet_rounds(setup: Setup, agent: Agent, fleet: Fleet, rounds: int) -> dict[str, Any]:
    """Interleaved rounds: agent enable, agent disable, direct apply --all, remove --all."""
    direct_env = {"MICROPATCH_NO_AGENT": "1", "MICROPATCH_TRUST_DIR": str(setup.trust)}
    mp = peer_tools.micropatch_command()
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
            [*peer_tools.micropatch_command(), "agent", "enable", AGENT_ID,
             "--socket", str(setup.socket)],
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


def restarts(agent: Agent, fleet: Fleet, total: int, times: int) -> dict[str, Any]:
    """The agent killed and started again with every process patched, `total` in its
    sandbox."""
    seconds: list[float] = []
    wrong = 0
    with Bystanders(agent.box, total):
        host = box_processes(agent.box)
        for r in range(times):
            print(f"agent: restart {r + 1}/{times} ({host} processes)", file=sys.stderr)
            agent.crash()
            seconds.append(agent.start())
            wrong += registries(fleet.pids, AGENT_ID, True)
    return {"host_processes": host, "seconds": seconds, "summary": summary(seconds),
            "registry_wrong": wrong}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument(
        "--processes", type=int, default=None, help=f"idle targets (default {PROCESSES})"
    )
    parser.add_argument(
        "--host-processes",
        type=int,
        default=HOST_PROCESSES,
        help=f"processes in the sandbox at restart, bystanders added (default {HOST_PROCESSES})",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="the agent's `workers` (default: its default)"
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
        "agent_config": AgentConfig(workers=args.workers).model_dump(),
        "worker_count": AgentConfig(workers=args.workers).worker_count(),
        "target": {"source": "benchmarks/targets/bench_target.c", "build": build_command()},
        "period": PERIOD,
        "bytecode": bytecode(not args.no_compile),
    }
    failure: str | None = None
    with (
        tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp,
        Sandbox(Path(tmp) / "host", size="64m") as box,
    ):
        setup = prepare(Path(tmp), box)
        agent = Agent(setup, "" if args.workers is None else f"workers = {args.workers}\n")
        try:
            print(f"agent: starting {n} targets", file=sys.stderr)
            start = time.perf_counter()
            with Fleet(setup, n) as fleet:
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
                data["restart"] = restarts(
                    agent, fleet, args.host_processes, 1 if args.quick else RESTARTS
                )
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

"""agent_pass: one reconcile pass of the agent over N running processes, in-process.

What `agent enable` → all patched is made of, without the CLI, the socket and the
sandbox around it (benchmarks/agent.py measures those): the agent's `Reconciler`
(the agent built in this process, not started) runs one pass over N idle
bench_target processes started here (one thread each, blocked in read()), first
with the patch enabled (every process patched), then disabled (every process
unpatched), `--rounds` times, for each `--workers` value in turn (interleaved, so
that a load that comes and goes weighs on each alike). Only the pids of the
targets are passed: no other process of the host is read or touched.

Per pass: its wall time, and the CPU time (user + system) of this process over it,
all threads, per process patched: the agent's own cost, less sensitive than wall
time to a loaded machine. Per operation: the pause (`paused_ms` of each event: every
thread of the target stopped), which shows what workers contending for the
interpreter do to the stop window. A baseline is another tree's code on the same
machine: `PYTHONPATH=OTHER/src python -m benchmarks.agent_pass --out DIR`.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.agent_setup import AGENT_ID, prepare
from benchmarks.stats import percentile, summary
from benchmarks.target import Target

NAME = "agent_pass"
PROCESSES, QUICK_PROCESSES = 500, 50
ROUNDS, QUICK_ROUNDS = 3, 1


def one_pass(agent: Any, pids: list[int], enabled: bool) -> dict[str, Any]:
    """Enable (or disable) the patch and run one pass over `pids`."""
    agent.set_enabled(AGENT_ID, enabled)
    seen = len(agent.events.query())
    c0, t0 = time.process_time(), time.perf_counter()
    result = agent.reconciler.run_pass(pids)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    kind = "applied" if enabled else "removed"
    events = [e for e in agent.events.query()[seen:] if e.kind == kind]
    done = result.applied if enabled else result.removed
    return {
        "wall": wall, "cpu": cpu, "done": done, "failed": result.failed,
        "cpu_ms_per_process": cpu / max(done, 1) * 1e3,
        "paused_ms": [e.data["paused_ms"] for e in events],
    }  # fmt: skip


def run(n: int, workers: list[int], rounds: int) -> dict[str, Any]:
    from micropatch.agent.config import AgentConfig
    from micropatch.agent.paths import AgentPaths
    from micropatch.agent.service import Agent

    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(w): {"enable": [], "disable": []} for w in workers
    }
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp:
        setup = prepare(Path(tmp), None)  # no sandbox: the pids are given
        data = setup.artifacts[AGENT_ID].read_bytes()
        targets: list[Target] = []
        try:
            for _ in range(n):
                targets.append(Target(setup.exe, spin=0, mainspin=False))
            pids = [t.pid for t in targets]
            for r in range(rounds):
                for w in workers:
                    root = Path(tmp) / f"agent-{w}-{r}"
                    paths = AgentPaths(root / "state", root / "agent.sock", setup.trust)
                    agent = Agent(AgentConfig(workers=w), paths, stream=io.StringIO())
                    try:
                        agent.add(data, "bench.mpatch", "disabled")
                        for step, enabled in (("enable", True), ("disable", False)):
                            print(f"agent_pass: round {r + 1}/{rounds} workers {w} {step}",
                                  file=sys.stderr)  # fmt: skip
                            samples[str(w)][step].append(one_pass(agent, pids, enabled))
                    finally:
                        agent.close()
        finally:
            for t in targets:
                t.kill()
    return samples


def summarise(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w, steps in samples.items():
        for step, passes in steps.items():
            paused = sorted(p for s in passes for p in s["paused_ms"])
            out[f"{w}/{step}"] = {
                "wall": summary([s["wall"] for s in passes]),
                "cpu": summary([s["cpu"] for s in passes]),
                "cpu_ms_per_process": summary([s["cpu_ms_per_process"] for s in passes]),
                "paused_ms": {**summary(paused), "p99": percentile(paused, 99)},
                "failed": sum(s["failed"] for s in passes),
                "done": [s["done"] for s in passes],
            }
    return out


def markdown(n: int, rounds: int, summaries: dict[str, Any]) -> str:
    lines = [
        f"One reconcile pass over {n} idle bench_target processes, in-process "
        f"(`Reconciler.run_pass` of an agent built here, not started); {rounds} rounds, "
        "the workers values interleaved. Medians of the passes; the pause over every "
        "operation of them (all threads of a target stopped).",
        "",
        "| workers | pass | wall (s) | CPU (s) | CPU per process (ms) | pause median / p90 / p99 (ms) | done | failed |",  # noqa: E501
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for key, s in summaries.items():
        w, step = key.split("/")
        p = s["paused_ms"]
        lines.append(
            f"| {w} | {step} | {s['wall']['median']:.3f} | {s['cpu']['median']:.3f} | "
            f"{s['cpu_ms_per_process']['median']:.2f} | "
            f"{p['median']:.3f} / {p['p90']:.3f} / {p['p99']:.3f} | "
            f"{', '.join(map(str, s['done']))} | {s['failed']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument("--processes", type=int, default=None, help=f"default {PROCESSES}")
    parser.add_argument("--rounds", type=int, default=None, help=f"default {ROUNDS}")
    parser.add_argument(
        "--workers", default="1,2", help="the agent's `workers` values, comma-separated"
    )
    args = report.parse(parser, argv)
    n = args.processes or (QUICK_PROCESSES if args.quick else PROCESSES)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    workers = [int(w) for w in args.workers.split(",")]
    samples = run(n, workers, rounds)
    summaries = summarise(samples)
    data = {"processes": n, "rounds": rounds, "workers": workers, "samples": samples,
            "summaries": summaries}  # fmt: skip
    _, md_path = report.write(
        NAME, args, argv, "agent_pass: one reconcile pass over N processes",
        data, markdown(n, rounds, summaries),
    )  # fmt: skip
    print(md_path.read_text())
    failed = any(s["failed"] or min(s["done"]) < n for s in summaries.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

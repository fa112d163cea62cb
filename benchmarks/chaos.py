"""chaos: SIGKILL the `micropatch` CLI inside its stop window, 1,200 times, on a 24-thread target.

Each round runs one command (`apply`, `update` to v2, `remove`, in turn, on
whatever the target has), polls /proc/PID/task/*/stat until a thread of the
target shows `t` (stopped by the tracer), waits a random 0-4 ms, and kills
the CLI with SIGKILL. Then it checks the target: alive; no thread left
stopped; no call of compute() answered wrongly (the target classifies every
result as unpatched, patched v1/v2, or bad); a registry that agrees with the
bytes (an `applied` patch has its jumps, an interrupted one is reported);
and that the next command succeeds (`micropatch repair`, then the next
round's command). The kill lands wherever it lands: before the stop, inside
it, or after the command finished (counted separately); 1,200 rounds give more
than 1,000 kills. 16 threads call the patched function; 8 more sit in read()
on a pipe, so the stop also interrupts (and must restart) blocking syscalls.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import patches, report
from benchmarks.target import Target, build, build_command

NAME = "chaos"
ROUNDS = 1200
QUICK_ROUNDS = 30
THREADS = 16  # calling the patched function
BLOCKED = 8  # in read() on a pipe nobody writes
MAX_DELAY = 0.004
POLL = 0.0002
# v1 answers 2x+2 and v2 answers 2x+2 too (a different body): the target classifies
# both as patched; any other answer is a wrong result.
V2 = "lea eax, [rdi+rdi+1]\nadd eax, 1\nret"


def _stopped(pid: int) -> bool:
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("t", "T"):
                    return True
    except OSError:
        return False
    return False


def _wait_running(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _stopped(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _consistent(pid: int) -> str | None:
    """None if the registry agrees with the bytes, else what is wrong."""
    from micropatch.live.cave import read_caves
    from micropatch.process.maps import read_maps
    from micropatch.process.memory import Memory

    with Memory(pid, writable=False) as memory:
        caves = read_caves(memory, read_maps(pid))
        jumps = {(s.address, s.jump) for c in caves for p in c.registry.patches for s in p.sites}
        for cave in caves:
            for patch in cave.registry.patches:
                for site in patch.sites:
                    found = memory.read(site.address, len(site.jump))
                    if patch.state == "applied" and found != site.jump:
                        return f"{patch.id} applied but {site.address:#x} holds {found.hex()}"
                    if found != site.original and (site.address, found) not in jumps:
                        return f"{patch.id} ({patch.state}): {site.address:#x} holds {found.hex()}"
    return None


def _state(pid: int) -> int | None:
    from micropatch import live

    versions = [s.version for s in live.status(pid) if s.patch_id == "chaos"]
    return versions[0] if versions else None


def run(exe: Path, tmp: Path, rounds: int, seed: int, budget: float) -> dict[str, Any]:
    from micropatch import live
    from micropatch.elf.identity import identify
    from micropatch.errors import MicropatchError

    with open(exe, "rb") as f:
        bid = identify(f).build_id or ""
    sources = {}
    for version, code in ((1, patches.PLUS_ONE), (2, V2)):
        path = tmp / f"chaos-v{version}.toml"
        path.write_text(patches.source("chaos", bid, "compute", code, version=version))
        sources[version] = str(path)
    rng = random.Random(seed)
    counts = {
        "rounds": 0,
        "killed_in_stop": 0,
        "killed_before_stop": 0,
        "finished_before_kill": 0,
        "deaths": 0,
        "threads_left_stopped": 0,
        "wrong_results": 0,
        "inconsistent": 0,
        "failed_next_commands": 0,
        "repairs": 0,
    }
    problems: list[str] = []
    cli = [os.path.join(os.path.dirname(sys.executable), "micropatch")]
    deadline = time.monotonic() + budget
    with Target(exe, spin=THREADS - 1, blocked=BLOCKED, burn=200) as target:
        pid = target.pid
        for index in range(rounds):
            if time.monotonic() > deadline:
                break
            counts["rounds"] += 1
            version = _state(pid)
            if version is None:
                argv = ["apply", sources[1], "--pid", str(pid), "--allow-unsigned"]
            elif version == 1:
                argv = ["update", sources[2], "--pid", str(pid), "--allow-unsigned"]
            else:
                argv = ["remove", "chaos", "--pid", str(pid)]
            proc = subprocess.Popen(
                [*cli, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            in_stop = False
            while proc.poll() is None:
                if _stopped(pid):
                    in_stop = True
                    break
                time.sleep(POLL)
            if in_stop:
                time.sleep(rng.uniform(0, MAX_DELAY))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                counts["killed_in_stop" if in_stop else "killed_before_stop"] += 1
            else:
                counts["finished_before_kill"] += 1
            proc.wait()
            if not target.alive():
                counts["deaths"] += 1
                problems.append(f"round {index}: target died: {target.describe_exit()}")
                break
            if not _wait_running(pid):
                counts["threads_left_stopped"] += 1
                problems.append(f"round {index}: threads left stopped")
            wrong = _consistent(pid)
            if wrong:
                counts["inconsistent"] += 1
                problems.append(f"round {index}: {wrong}")
            stats = target.stats()
            if stats["bad"]:
                counts["wrong_results"] = stats["bad"]
            # The next command: every apply/remove/update repairs first; repair alone
            # (in this process, to keep rounds short) checks that it succeeds.
            try:
                if live.repair(pid):
                    counts["repairs"] += 1
            except MicropatchError as e:
                counts["failed_next_commands"] += 1
                problems.append(f"round {index}: repair failed: {e}")
            if index % 50 == 49:
                print(f"chaos: {index + 1}/{rounds}: {counts}", file=sys.stderr)
        if target.alive() and _state(pid) is not None:
            final = subprocess.run([*cli, "remove", "chaos", "--pid", str(pid)])
            if final.returncode != 0 or _state(pid) is not None:
                counts["failed_next_commands"] += 1
        counts["wrong_results"] = target.stats()["bad"] if target.alive() else -1
    return {"counts": counts, "problems": problems[:50]}


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--budget", type=float, default=3600.0, help="stop after this many seconds (default 3600)"
    )
    args = report.parse(parser, argv)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    with tempfile.TemporaryDirectory(prefix="micropatch-chaos-") as tmp:
        exe = build(Path(tmp))
        result = run(exe, Path(tmp), rounds, args.seed, args.budget)
    c = result["counts"]
    rows = "\n".join(f"| {key.replace('_', ' ')} | {value} |" for key, value in c.items())
    done = c["rounds"]
    budget_note = "" if done == rounds else f" (of {rounds} planned: the time budget ran out)"
    markdown = (
        f"{done} rounds{budget_note} on a {THREADS + BLOCKED}-thread target ({THREADS} "
        f"threads calling the patched function, {BLOCKED} blocked in read()): each round "
        "starts `micropatch apply`, "
        "`update` or `remove` (in turn), waits until a target thread is in a tracing "
        "stop, waits 0-4 ms more, and kills the CLI with SIGKILL; then checks the "
        "target and runs `live.repair` (the first step of every next command) in the "
        "benchmark's process. Aims: 0 deaths, 0 inconsistent states, 0 failed next "
        "commands.\n\n| | count |\n|---|---:|\n" + rows + "\n"
    )
    if result["problems"]:
        markdown += "\nFirst problems:\n\n" + "\n".join(f"- {p}" for p in result["problems"])
    data = {
        "target": {"source": "benchmarks/targets/bench_target.c", "build": build_command()},
        "threads": THREADS,
        "blocked": BLOCKED,
        "rounds": rounds,
        "seed": args.seed,
        **result,
    }
    _, md_path = report.write(NAME, args, argv, "chaos: the CLI killed in its stop", data, markdown)
    print(md_path.read_text())
    ok = c["deaths"] == 0 and c["inconsistent"] == 0 and c["failed_next_commands"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

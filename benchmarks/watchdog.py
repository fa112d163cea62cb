"""watchdog: what the stop watchdog costs, and how long a frozen patcher holds a target.

Issue 20 item 2 (src/micropatch/process/watchdog.py). Three parts, one run:

1. Cost in the common case. On one bench_target (16 threads blocked in read(), the
   main one waiting for a command), alternating rounds of `live.apply` then
   `live.remove` of a one-site patch, in this process, without a watchdog and
   with one (started before the apply and closed after the remove, as the CLI
   does for each command): the target's pause (`Outcome.paused`) and this
   process's CPU (user + system, `time.process_time`) per operation. Apart: what
   the watchdog costs once per command, the patcher's side (`Watchdog.start` +
   `close`: wall and CPU) and the supervisor's own CPU over its whole life (wait4
   of the supervisor, started and fed one arm and disarm).
2. The alternative for the agent: a child process per stop-window operation. Its
   floor, a fresh interpreter importing the engine (`python -c "import
   micropatch.live"`), CPU (wait4) and wall; for reference the supervisor's
   interpreter alone (`python -I -S -c pass`).
3. A frozen patcher. A child stops the target (`stop_world`, stop timeout T) with
   a watchdog of limit L and stops itself (SIGSTOP) inside the stop; this process
   polls the target's threads: seconds from the arming (the child prints its
   CLOCK_MONOTONIC just before) until every thread runs again, and how far past
   T + L that is (the supervisor's wake-up, the kill, the kernel's detach, and
   our polling, every 0.2 ms).
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import patches, report
from benchmarks.stats import median, percentile, ratio
from benchmarks.target import Target, build

NAME = "watchdog"
ROUNDS = 60
QUICK_ROUNDS = 4
FROZEN = 15
QUICK_FROZEN = 2
BLOCKED = 16
PATCH_ID = "bench-watchdog"
TIMEOUT, LIMIT = 0.2, 0.3  # part 3: the stop timeout and the watchdog's limit

FREEZER = """
import os, signal, sys, time
from micropatch.process.watchdog import Watchdog
from micropatch.process.world import stop_world
pid, timeout, limit = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
Watchdog.start(limit)
time.sleep(0.2)  # the supervisor up: what is measured is the kill, not its start
print(time.monotonic(), flush=True)
with stop_world(pid, timeout=timeout):
    signal.pthread_kill(__import__("threading").get_ident(), signal.SIGSTOP)
"""


def _stats(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "median": median(samples), "p90": percentile(samples, 90),
            "min": min(samples), "max": max(samples)}  # fmt: skip


def common_case(exe: Path, rounds: int) -> dict[str, Any]:
    from micropatch import live
    from micropatch.process.watchdog import VARIABLE, Watchdog, watched
    from micropatch.trust.admission import admit

    text = patches.source(PATCH_ID, patches.build_id(exe), "compute", patches.PLUS_ONE)
    patch = admit(text.encode(), name="bench.toml", keys=None, allow_unsigned=True)
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    with Target(exe, spin=0, blocked=BLOCKED, mainspin=False) as target:
        for r in range(1 + rounds):
            for on in (False, True) if r % 2 else (True, False):
                mode = "with" if on else "without"
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                dog = Watchdog.start() if on else None
                spawn_cpu, spawn_wall = time.process_time(), time.perf_counter()
                c0 = time.process_time()
                applied = live.apply(patch, target.pid)
                c1 = time.process_time()
                removed = live.remove(PATCH_ID, target.pid)
                c2 = time.process_time()
                if dog is not None:
                    e0, w0 = time.process_time(), time.perf_counter()
                    dog.close()
                    close_cpu, close_wall = time.process_time() - e0, time.perf_counter() - w0
                    with contextlib.suppress(ChildProcessError):  # unless close reaped it
                        os.waitpid(dog.child, 0)
                if target.call(5) != 11:
                    raise RuntimeError("compute(5) is not 11 after the remove")
                if r == 0:
                    continue  # warm-up
                add(f"apply pause {mode}", applied.paused)
                add(f"remove pause {mode}", removed.paused)
                add(f"apply cpu {mode}", c1 - c0)
                add(f"remove cpu {mode}", c2 - c1)
                if dog is not None:
                    add("start cpu", spawn_cpu - start_cpu)
                    add("start wall", spawn_wall - start_wall)
                    add("close cpu", close_cpu)
                    add("close wall", close_wall)
    for _ in range(rounds):
        dog = Watchdog.start()
        with watched(0, "a stop", 1.0):
            pass
        os.environ.pop(VARIABLE)
        os.close(dog.fd)  # what close does, but the reaping is ours: wait4 has its CPU
        _, _, usage = os.wait4(dog.child, 0)
        add("supervisor cpu", usage.ru_utime + usage.ru_stime)
    return {k: {**_stats(v), "samples": v} for k, v in samples.items()}


def child_floor(rounds: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {}
    commands = {
        "python -c 'import micropatch.live'": [sys.executable, "-c", "import micropatch.live"],
        "python -I -S -c pass": [sys.executable, "-I", "-S", "-c", "pass"],
    }
    for _ in range(rounds):
        for name, argv in commands.items():
            start = time.perf_counter()
            child = subprocess.Popen(argv)
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode:
                raise RuntimeError(f"{argv} exited {child.returncode}")
            out.setdefault(f"{name} cpu", []).append(usage.ru_utime + usage.ru_stime)
            out.setdefault(f"{name} wall", []).append(time.perf_counter() - start)
    return {k: {**_stats(v), "samples": v} for k, v in out.items()}


def _stopped(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "t":
                    return True
        except OSError:
            continue
    return False


def frozen(exe: Path, rounds: int) -> dict[str, Any]:
    held: list[float] = []
    past: list[float] = []
    with Target(exe, spin=0, blocked=BLOCKED, mainspin=False) as target:
        for _ in range(rounds):
            child = subprocess.Popen(
                [sys.executable, "-c", FREEZER, str(target.pid), str(TIMEOUT), str(LIMIT)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert child.stdout is not None
            armed = float(child.stdout.readline())
            _, status = os.waitpid(child.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                raise RuntimeError(f"the freezer did not freeze: status {status:#x}")
            while _stopped(target.pid):
                if time.monotonic() > armed + TIMEOUT + LIMIT + 30:
                    child.kill()
                    raise RuntimeError("the target was not let go: no watchdog")
                time.sleep(0.0002)
            end = time.monotonic()
            child.wait(timeout=30)
            child.stdout.close()
            if child.returncode != -9 or target.call(5) != 11:
                raise RuntimeError(f"freezer exited {child.returncode}, or the target is wrong")
            held.append(end - armed)
            past.append(end - armed - TIMEOUT - LIMIT)
    return {"held": {**_stats(held), "samples": held}, "past": {**_stats(past), "samples": past}}


def markdown(result: dict[str, Any]) -> str:
    c, f, z = result["common"], result["child"], result["frozen"]
    ms = report.ms
    lines = [
        f"One bench_target of {BLOCKED + 1} threads ({BLOCKED} blocked in read()). "
        f"{result['rounds']} rounds of `live.apply` + `live.remove` in this process, without "
        "and with a watchdog in alternating order, one unrecorded warm-up. In ms: "
        "**median** / p90 / max.",
        "",
        "| per operation | without | with | ratio of medians |",
        "|---|---:|---:|---:|",
    ]
    for op in ("apply", "remove"):
        for kind, label in (("pause", "target paused"), ("cpu", "patcher CPU")):
            a, b = c[f"{op} {kind} without"], c[f"{op} {kind} with"]
            cells = [f"**{ms(x['median'])}** / {ms(x['p90'])} / {ms(x['max'])}" for x in (a, b)]
            lines.append(f"| {op}: {label} | {cells[0]} | {cells[1]} | "
                         f"{ratio(b['median'], a['median']):.2f}x |")  # fmt: skip
    lines += ["", "Once per command (the CLI starts one watchdog per command):", "",
              "| | median | p90 | max |", "|---|---:|---:|---:|"]  # fmt: skip
    once = (("start wall", "`Watchdog.start` wall (posix_spawn)"),
            ("start cpu", "`Watchdog.start` CPU, the patcher's"),
            ("close wall", "`close` wall"), ("close cpu", "`close` CPU"),
            ("supervisor cpu", "the supervisor's CPU, its whole life (wait4)"))  # fmt: skip
    for key, label in once:
        x = c[key]
        lines.append(f"| {label} | {ms(x['median'])} | {ms(x['p90'])} | {ms(x['max'])} |")
    lines += ["", "The agent's alternative, a child process per operation (its floor: a fresh "
              "interpreter that imports the engine), against the supervisor's interpreter:", "",
              "| process | CPU median (ms) | wall median (ms) |", "|---|---:|---:|"]  # fmt: skip
    for name in ("python -c 'import micropatch.live'", "python -I -S -c pass"):
        lines.append(f"| `{name}` | {ms(f[name + ' cpu']['median'])} | "
                     f"{ms(f[name + ' wall']['median'])} |")  # fmt: skip
    h, p = z["held"], z["past"]
    lines += ["", f"A patcher frozen (SIGSTOP) inside `stop_world` of the {BLOCKED + 1}-thread "
              f"target, stop timeout {TIMEOUT} s, watchdog limit {LIMIT} s, "
              f"{h['n']} times: the target held **{h['median']:.3f} s** median (max "
              f"{h['max']:.3f}) from the arming; past the {TIMEOUT + LIMIT:g} s bound by "
              f"**{ms(p['median'])} ms** median, p90 {ms(p['p90'])}, max {ms(p['max'])} "
              "(wake-up, SIGKILL, the kernel's detach, 0.2 ms polling). The target answered "
              "correctly after each."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    args = report.parse(parser, argv)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    with tempfile.TemporaryDirectory(prefix="bench-watchdog-") as tmp:
        exe = build(Path(tmp))
        result: dict[str, Any] = {"rounds": rounds}
        result["common"] = common_case(exe, rounds)
        result["child"] = child_floor(max(3, rounds // 3))
        result["frozen"] = frozen(exe, QUICK_FROZEN if args.quick else FROZEN)
    result["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json_path, md_path = report.write(
        NAME, args, argv, "watchdog: the stop watchdog's cost, and a frozen patcher's hold",
        result, markdown(result),
    )  # fmt: skip
    print(md_path.read_text())
    print(f"watchdog: wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

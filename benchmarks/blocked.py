"""blocked: what each kind of stop does to threads parked in blocking system calls.

The target is tests/targets/waiters.c: one thread parked in each of 32 kinds
of blocking call, counting how each call returns (EINTR, a result, another
error). Each method stops the whole process N times, waiting after each until
every waiter is parked again, then reads the counts:

- `SIGSTOP/SIGCONT`: a job-control stop (what a shell's ^Z does);
- `bare ptrace`: every thread seized, interrupted, waited for and detached,
  as gdb or strace attaching do (issue 20.3's "a bare ptrace stop");
- `stop_world`: micropatch's stop, empty (`with stop_world(pid): pass`);
- `apply+remove`: `live.apply` then `live.remove` of a one-patchlet patch
  (two stops, or more when the engine retries: the column counts cycles).

A count equal to the number of stops means every stop ended that call early.
Needs root (the SysV IPC waiters run in an IPC namespace of their own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import patches, report

NAME = "blocked"
SOURCES = ("waiters.c", "vuln_fn.c", "proto.c")
TARGETS = Path(__file__).resolve().parent.parent / "tests" / "targets"
CFLAGS = ["-O2", "-g", "-pthread", "-Wl,--build-id=sha1"]
STOPS = 40
QUICK_STOPS = 3
FIX = "cmp esi, 64\njle ok\nmov esi, -1\nok:"


def build(directory: Path) -> Path:
    exe = directory / "waiters"
    sources = [str(TARGETS / s) for s in SOURCES]
    subprocess.run(["cc", *CFLAGS, "-o", str(exe), *sources], check=True)
    return exe


class Waiters:
    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = int(self.readline().split()[1])

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("waiters exited")
        return line.strip()

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        return self.readline()

    def counts(self) -> dict[str, list[int]]:
        answer = self.cmd("settle")
        if answer != "settled":
            raise RuntimeError(answer)
        return {
            name: [int(v) for v in value.split("/")]
            for name, value in (item.split("=") for item in self.cmd("counts").split())
        }

    def close(self) -> None:
        self.cmd("quit")
        self.proc.wait(10)


def _state(tid: int) -> str:
    with open(f"/proc/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def sigstop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    tasks = os.listdir(f"/proc/{pid}/task")
    while any(_state(int(t)) != "T" for t in tasks) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(pid, signal.SIGCONT)


def bare_ptrace(pid: int) -> None:
    from micropatch.process import ptrace

    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for tid in tids:
        ptrace.seize(tid)
        ptrace.interrupt(tid)
    for tid in tids:
        os.waitpid(tid, os.__dict__.get("__WALL", 0x40000000))
    for tid in tids:
        ptrace.detach(tid)


def empty_stop(pid: int) -> None:
    from micropatch.process.world import stop_world

    with stop_world(pid):
        pass


def apply_remove(exe: Path) -> Callable[[int], None]:
    from micropatch import live

    text = (
        '[patch]\nid = "blocked-fix"\nversion = 1\n\n[target]\nmodule = "waiters"\n'
        f'build_id = "{patches.build_id(exe)}"\n\n[[patchlet]]\nat = "copy_packet"\n'
        f"code = '''\n{FIX}\n'''\n"
    )
    patch = patches.parse(text)

    def cycle(pid: int) -> None:
        live.apply(patch, pid)
        live.remove(patch.id, pid)

    return cycle


def run(exe: Path, stops: int) -> dict[str, dict[str, list[int]]]:
    methods: dict[str, Callable[[int], None]] = {
        "SIGSTOP/SIGCONT": sigstop,
        "bare ptrace": bare_ptrace,
        "stop_world": empty_stop,
        "apply+remove": apply_remove(exe),
    }
    results = {}
    for method, stop in methods.items():
        target = Waiters(exe)
        try:
            for _ in range(stops):
                stop(target.pid)
                target.counts()  # wait until every waiter is parked again
            results[method] = target.counts()
        finally:
            target.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument("--stops", type=int, default=STOPS)
    args = report.parse(parser, argv)
    stops = QUICK_STOPS if args.quick else args.stops
    with tempfile.TemporaryDirectory(prefix="micropatch-blocked-") as tmp:
        exe = build(Path(tmp))
        results = run(exe, stops)
    methods = list(results)
    kinds = list(results[methods[0]])
    rows = []
    for kind in kinds:
        cells = []
        for m in methods:
            eintr, ok, other = results[m][kind]
            extra = f" (+{ok} ok, {other} other)" if ok or other else ""
            cells.append(f"{eintr}{extra}")
        rows.append(f"| `{kind}` | " + " | ".join(cells) + " |")
    markdown = (
        f"Early returns with EINTR per waiter after {stops} stops of each kind "
        "(apply+remove: cycles) of tests/targets/waiters.c, one thread per kind; "
        "`_inf`: no timeout, `_timed` and the rest with one: an hour.\n\n"
        "| call | " + " | ".join(methods) + " |\n|---|" + "---:|" * len(methods) + "\n"
        + "\n".join(rows) + "\n"
    )  # fmt: skip
    data: dict[str, Any] = {
        "target": {"sources": [f"tests/targets/{s}" for s in SOURCES], "cflags": CFLAGS},
        "stops": stops,
        "results": results,
    }
    _, md_path = report.write(NAME, args, argv, "blocked: stops and blocking calls", data, markdown)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python: CPython patches (docs/python-patches.md) against gdb-driven injection, the
cost of a guard per call, and the patcher SIGKILLed at random instants.

1. latency: on an interpreter whose main thread is blocked in a read on stdin
   while another thread runs Python, `runtimes.cpython.engine.apply` then
   `remove` of a one-function guard, against the pyrasite method in the same
   run: `gdb -p PID -batch` calling PyGILState_Ensure, PyRun_SimpleString with
   a `__code__` assignment of the same function, PyGILState_Release. For
   micropatch: wall time of the call, time until in force, and the time the
   threads were stopped (`paused`); for gdb: its wall time, during which the
   process is stopped from attach to detach except while the call runs.
2. guard cost: ns per call of parse_header("a:1") (the guard does not fire),
   measured in the target over 200,000 calls, before and after apply.
3. chaos: the patcher (a subprocess running the engine) SIGKILLed at a random
   instant 0-30 ms after its first stop of the target begins (covering the
   stop, the arming, the wait for a thread and the commit), alternating apply
   and remove; after each
   kill: the target alive, no thread left stopped, every reference answering
   all patched or all unpatched, and the page agreeing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.stats import median, ratio, summary

NAME = "python"
ROUNDS, QUICK_ROUNDS = 30, 3
CHAOS, QUICK_CHAOS = 200, 10
CALLS = 200_000
PYTHON = os.environ.get("MICROPATCH_TEST_PYTHON", "/usr/bin/python3.11")
PYSHOP = Path(__file__).resolve().parents[1] / "tests" / "integration" / "cpython" / "pyshop.py"
PARSERS = """def parse_header(line, limit=40):
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


class Parser:
    def feed(self, data):
        return len(data)

    @classmethod
    def check(cls, data):
        return data.isascii()
"""
LONG = "x" * 60 + ":1"
GDB_CODE = "import sys; f = sys.modules['shop.parsers'].parse_header; f.__code__ = f.__code__"
KILLER = """
import sys
from micropatch.runtimes.cpython import engine
from micropatch.trust.admission import admit_any
op, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if op == "remove":
    engine.remove(path, pid)
else:
    engine.apply(admit_any(open(path, "rb").read(), name=path, keys=None,
                           allow_unsigned=True), pid)
"""


class Target:
    def __init__(self, directory: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-u", str(PYSHOP), str(directory), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = int(self._line().split()[1])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        if not ready:
            raise RuntimeError(f"pid {self.proc.pid}: no answer")
        return self.proc.stdout.readline().rstrip("\n")

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _shop(directory: Path) -> Path:
    (directory / "shop").mkdir()
    (directory / "shop" / "__init__.py").write_text("")
    (directory / "shop" / "parsers.py").write_text(PARSERS)
    return directory / "shop" / "parsers.py"


def _artifact(directory: Path, module: Path) -> tuple[Any, Path]:
    from micropatch.runtimes.cpython.build import build
    from micropatch.trust.admission import admit_any

    digest = hashlib.sha256(module.read_bytes()).hexdigest()
    source = directory / "fix.toml"
    source.write_text(
        '[patch]\nid = "hdr-fix"\nversion = 1\n\n[target]\nruntime = "cpython"\n'
        f'module = "shop.parsers"\nsha256 = "{digest}"\n\n[[patchlet]]\nat = "parse_header"\n'
        'when = "len(line) > limit"\nthen = "blocked; raise ValueError(\'header too long\')"\n'
    )
    built = build(source, module, python=PYTHON)
    path = built.write(directory)
    return admit_any(built.to_bytes(), name=built.file_name, keys=None, allow_unsigned=True), path


def _gdb(pid: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        ["gdb", "-p", str(pid), "-batch", "-nx",
         "-ex", "set $g = (int) PyGILState_Ensure()",
         "-ex", f"call (int) PyRun_SimpleString({json.dumps(GDB_CODE)})",
         "-ex", "call (void) PyGILState_Release($g)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or "$1 = 0" not in done.stdout:
        raise RuntimeError(f"gdb failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    return elapsed


def latency(directory: Path, rounds: int) -> dict[str, Any]:
    from micropatch.runtimes.cpython import engine

    patch, _ = _artifact(directory, _shop(directory))
    target = Target(directory, "--workers", "busy:1")
    kinds = ("apply_wall", "apply_in_force", "apply_paused", "remove_wall", "remove_paused",
             "gdb_wall")  # fmt: skip
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            outcome = engine.apply(patch, target.pid)
            samples["apply_wall"].append(time.perf_counter() - start)
            samples["apply_in_force"].append(outcome.waited)
            samples["apply_paused"].append(outcome.paused)
            start = time.perf_counter()
            outcome = engine.remove("hdr-fix", target.pid)
            samples["remove_wall"].append(time.perf_counter() - start)
            samples["remove_paused"].append(outcome.paused)
            samples["gdb_wall"].append(_gdb(target.pid))
        assert json.loads(target.ask(f"call {LONG}"))[0].startswith("(")  # unpatched, alive
        before = [float(target.ask(f"bench {CALLS}")) for _ in range(5)]
        engine.apply(patch, target.pid)
        after = [float(target.ask(f"bench {CALLS}")) for _ in range(5)]
        engine.remove("hdr-fix", target.pid)
    finally:
        target.close()
    return {
        "samples": samples,
        "summary": {k: summary(v) for k, v in samples.items()},
        "guard_ns": {"before": before, "after": after, "added": median(after) - median(before)},
    }


def chaos(directory: Path, rounds: int, seed: int = 19) -> dict[str, Any]:
    from micropatch.runtimes.cpython import engine, states

    rng = random.Random(seed)
    _, path = _artifact(directory, _shop(directory))
    target = Target(directory, "--workers", "busy:1,sleep:1")
    result = {"rounds": rounds, "killed": 0, "finished": 0, "deaths": 0, "half": 0,
              "disagree": 0, "stopped_left": 0}  # fmt: skip
    try:
        for i in range(rounds):
            applied = bool(states.status(target.pid))
            op, arg = ("remove", "hdr-fix") if applied else ("apply", str(path))
            proc = subprocess.Popen(
                [sys.executable, "-c", KILLER, op, str(target.pid), arg],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 5
            while not _stopped(target.pid) and proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.0002)
            time.sleep(rng.uniform(0, 0.03))  # within the stop, the arming, the wait, the commit
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
            result["killed" if code == -signal.SIGKILL else "finished"] += 1
            if target.proc.poll() is not None:
                result["deaths"] += 1
                break
            time.sleep(0.2)  # an armed operation may still run: let it settle
            answers = json.loads(target.ask(f"call {LONG}"))[:3]
            kinds = {a.startswith("ERR ValueError: header too long") for a in answers}
            if len(kinds) != 1:
                result["half"] += 1
            page = any(s.patch_id == "hdr-fix" for s in states.status(target.pid))
            if page != (True in kinds):
                result["disagree"] += 1
            if _stopped(target.pid):
                result["stopped_left"] += 1
            engine.repair(target.pid)
            if i % 20 == 0:
                print(f"chaos {i}/{rounds}: {result}", file=sys.stderr)
    finally:
        target.close()
    return result


def _stopped(pid: int) -> bool:
    """A thread of `pid` in a tracing stop: the patcher's first stop has begun."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("t", "T"):
                    return True
    except OSError:
        return False
    return False


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__ or "", argv)
    args = report.parse(parser, argv)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        lat = latency(Path(a), rounds)
        cha = chaos(Path(b), QUICK_CHAOS if args.quick else CHAOS)
    s = lat["summary"]
    ms = lambda k, q="median": f"{s[k][q] * 1e3:.2f}"  # noqa: E731
    rows = [
        ("micropatch apply (wall)", ms("apply_wall"), ms("apply_wall", "p90")),
        ("micropatch apply: first stop until in force", ms("apply_in_force"),
         ms("apply_in_force", "p90")),
        ("micropatch apply: threads stopped (pause)", ms("apply_paused"),
         ms("apply_paused", "p90")),
        ("micropatch remove (wall)", ms("remove_wall"), ms("remove_wall", "p90")),
        ("micropatch remove: pause", ms("remove_paused"), ms("remove_paused", "p90")),
        ("gdb -p -batch PyRun_SimpleString (wall; stopped from attach to detach "
         "but for the call)", ms("gdb_wall"), ms("gdb_wall", "p90")),
    ]  # fmt: skip
    g = lat["guard_ns"]
    markdown = (
        f"CPython {PYTHON}; target: main thread blocked in a read on stdin, one thread "
        f"running a Python loop. {rounds} rounds, each: apply, remove, gdb injection.\n\n"
        "| operation | median ms | p90 ms |\n|---|---|---|\n"
        + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
        + f"\nPause, gdb wall / micropatch apply pause: "
        f"{ratio(s['gdb_wall']['median'], s['apply_paused']['median']):.0f}x.\n\n"
        f'Guard cost: parse_header("a:1") {median(g["before"]):.0f} ns per call before, '
        f"{median(g['after']):.0f} ns after apply (the guard `len(line) > limit` not firing): "
        f"+{g['added']:.0f} ns (medians of 5 runs of {CALLS:,} calls, in the target).\n\n"
        f"Chaos: {cha['rounds']} rounds, patcher SIGKILLed 0-30 ms after its first stop "
        f"({cha['killed']} killed, {cha['finished']} finished first): "
        f"{cha['deaths']} deaths, {cha['half']} half states, {cha['disagree']} page/behaviour "
        "disagreements, "
        f"{cha['stopped_left']} threads left stopped.\n"
    )
    report.write(NAME, args, argv, "CPython patches", {"latency": lat, "chaos": cha}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

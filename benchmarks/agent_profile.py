"""Where the agent's time and memory go: py-spy on the agent process (summed by
activity and by innermost micropatch function) and the memory its imports take."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from benchmarks.agent_setup import Agent


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

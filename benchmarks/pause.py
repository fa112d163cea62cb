"""pause: how long one live.apply / live.remove stops the target's threads.

Against the bare cost of stopping and resuming the same threads in the same
run (`with stop_world(pid): pass`, timed by the same clock as
Outcome.paused: from the first thread seized to the last one let go), for
targets of 1, 16 and 128 threads. Every round interleaves, on one target:

    bare | apply spare (new cave) | apply compute (existing cave) | bare |
    remove compute (cave kept) | remove spare (last: cave unmapped) | bare |
    apply compute (new cave) | remove compute (last: cave unmapped)

Both patches are empty patchlets (relocated displaced instructions and a jump
back). `compute` is the function every spinning thread calls; `spare` is
called by no one and only keeps a cave mapped.

Two machines in one run: idle (1, 16, 128 threads), then loaded (16 and 128
threads) with every CPU saturated by `nproc` busy processes (pure spin loops
at nice 0) for the whole measurement. Aims (issue 18): idle, apply ≤ 3x bare
at 1 thread, ≤ 1.5x at 16, ≤ 1.3x at 128 (medians); loaded, apply's p99 ≤ 1.3x
the bare stop's p99 in the same run. The report: `benchmarks.pause_report`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import patches, report
from benchmarks.pause_report import HOG, OPS, markdown
from benchmarks.stats import percentile, summary
from benchmarks.target import Target, build, build_command

NAME = "pause"
THREADS = (1, 16, 128)
QUICK_THREADS = (1, 16)
LOADED_THREADS = (16, 128)
QUICK_LOADED_THREADS = (16,)
MODES = ("idle", "loaded")
ROUNDS = 100
MIN_ROUNDS = 10
BUDGET = 45.0  # seconds per thread count, after which rounds stop (at least MIN_ROUNDS)
QUICK_BUDGET = 4.0
QUICK_ROUNDS = 2
BURN = 200  # multiplications between two calls of compute() in each spinning thread


def layout(threads: int) -> tuple[int, int]:
    """(spinning threads besides main, blocked threads) for a process of `threads` threads.

    The main thread spins too; one in eight threads is blocked in read().
    """
    blocked = threads // 8
    return threads - 1 - blocked, blocked


def bare(pid: int) -> float:
    """Seconds to stop and resume every thread of pid, timed like Outcome.paused.

    The engine's own clock (StoppedProcess.paused: first seize to last detach)
    when it has one, else perf_counter around the block.
    """
    from micropatch.process.world import stop_world  # imported before the clock starts

    start = time.perf_counter()
    with stop_world(pid) as proc:
        pass
    outer = time.perf_counter() - start
    return float(getattr(proc, "paused", outer))


class Run:
    """Samples of one target: seconds paused per operation, attempts, errors."""

    def __init__(self) -> None:
        self.paused: dict[str, list[float]] = {op: [] for op in OPS}
        self.wall: dict[str, list[float]] = {op: [] for op in OPS}
        self.attempts: dict[str, list[int]] = {op: [] for op in OPS}
        self.errors: list[str] = []

    def bare(self, pid: int) -> None:
        gc.collect()
        self.paused["bare"].append(bare(pid))

    def live(self, op: str, call: Callable[[], Any]) -> bool:
        gc.collect()
        start = time.perf_counter()
        try:
            outcome = call()
        except Exception as e:  # record and go on: one failure must not hide the rest
            self.errors.append(f"{op}: {type(e).__name__}: {e}")
            return False
        self.wall[op].append(time.perf_counter() - start)
        self.paused[op].append(outcome.paused)
        self.attempts[op].append(outcome.attempts)
        return True


def measure(
    exe: Path, threads: int, rounds: int, budget: float, patch_compute: Any, patch_spare: Any
) -> dict[str, Any]:
    spin, blocked = layout(threads)
    run = Run()
    with Target(exe, spin=spin, blocked=blocked, burn=BURN, mainspin=True) as target:
        counted = target.threads()
        pid = target.pid
        if patch_compute is not None:
            from micropatch import live

        bare(pid)  # warm-up, not recorded: first-call costs of Python and the kernel
        if patch_compute is not None:
            _clean(pid, [])
            for warm in (patch_compute, patch_spare):
                live.apply(warm, pid)
                live.remove(warm.id, pid)
        gc.disable()
        try:
            deadline = time.monotonic() + budget
            done = 0
            for _ in range(rounds):
                if done >= MIN_ROUNDS and time.monotonic() > deadline:
                    break  # a busy machine: fewer rounds rather than an endless run
                done += 1
                run.bare(pid)
                if patch_compute is None:
                    run.bare(pid)
                    run.bare(pid)
                    continue
                spare_on = run.live("apply_spare_new_cave", lambda: live.apply(patch_spare, pid))
                on = run.live(
                    "apply_existing_cave" if spare_on else "apply_new_cave",
                    lambda: live.apply(patch_compute, pid),
                )
                run.bare(pid)
                if on:
                    run.live(
                        "remove_cave_kept" if spare_on else "remove_last",
                        lambda: live.remove(patch_compute.id, pid),
                    )
                if spare_on:
                    run.live("remove_spare_last", lambda: live.remove(patch_spare.id, pid))
                run.bare(pid)
                if run.live("apply_new_cave", lambda: live.apply(patch_compute, pid)):
                    run.live("remove_last", lambda: live.remove(patch_compute.id, pid))
                _clean(target.pid, [patch_compute.id, patch_spare.id])
        finally:
            gc.enable()
        stats = target.stats() if target.alive() else {}
        alive = target.alive()
        exit_text = target.describe_exit()
    return {
        "threads": threads,
        "threads_counted": counted,
        "spinning": spin + 1,
        "blocked": blocked,
        "burn": BURN,
        "rounds": done,
        "rounds_requested": rounds,
        "budget_seconds": budget,
        "seconds": {op: _summary(v) for op, v in run.paused.items()},
        "wall_seconds": {op: summary(v) for op, v in run.wall.items()},
        "retried": {op: sum(1 for a in v if a > 1) for op, v in run.attempts.items()},
        "max_attempts": {op: max(v, default=0) for op, v in run.attempts.items()},
        "samples": run.paused,
        "attempts": run.attempts,
        "errors": run.errors,
        "target_alive": alive,
        "target_exit": exit_text,
        "target_stats": stats,
    }


def _summary(samples: list[float]) -> dict[str, float]:
    return {**summary(samples), "p99": percentile(samples, 99)}


class Hogs:
    """`count` busy processes at nice 0, spinning until the block ends."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Hogs:
        for _ in range(self.count):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", HOG],
                    preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 0),
                    start_new_session=True,
                )
            )
        time.sleep(1.0)  # warm-up: let them start and the scheduler spread them
        return self

    def nice(self) -> list[int]:
        return [os.getpriority(os.PRIO_PROCESS, p.pid) for p in self.procs]

    def __exit__(self, *_: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def _clean(pid: int, ids: list[str]) -> None:
    """After a failed step: remove whatever of ours is still applied."""
    from micropatch import live

    for patch_id in ids:
        with contextlib.suppress(Exception):
            live.remove(patch_id, pid)


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"rounds per target (default {ROUNDS})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="thread counts on the idle machine (default 1 16 128)",
    )
    parser.add_argument(
        "--loaded-threads",
        type=int,
        nargs="+",
        default=None,
        help="thread counts on the loaded machine (default 16 128)",
    )
    parser.add_argument(
        "--mode",
        choices=(*MODES, "both"),
        default="both",
        help="idle machine, loaded machine (nproc busy processes), or both in turn (default)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds per thread count after which rounds stop (default {BUDGET:.0f})",
    )
    args = report.parse(parser, argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    budget = args.budget or (QUICK_BUDGET if args.quick else BUDGET)
    counts = args.threads or (QUICK_THREADS if args.quick else THREADS)
    loaded_counts = args.loaded_threads or (QUICK_LOADED_THREADS if args.quick else LOADED_THREADS)
    modes = MODES if args.mode == "both" else (args.mode,)
    engine_error = patches.engine_error()
    results = []
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp:
        exe = build(Path(tmp))
        patch_compute = patch_spare = None
        if engine_error is None:
            try:
                bid = patches.build_id(exe)
                patch_compute = patches.parse(
                    patches.source("bench-pause", bid, "compute", patches.EMPTY)
                )
                patch_spare = patches.parse(
                    patches.source("bench-pause-spare", bid, "spare", patches.EMPTY)
                )
            except Exception as e:
                engine_error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        if "idle" in modes:
            for threads in counts:
                print(f"pause: idle, {threads} threads, {rounds} rounds", file=sys.stderr)
                results.append(measure(exe, threads, rounds, budget, patch_compute, patch_spare))
        loaded = None
        if "loaded" in modes:
            hogs = len(os.sched_getaffinity(0))
            loaded = {"hogs": hogs, "load_at_start": report.load_average(), "results": []}
            with Hogs(hogs) as running:
                loaded["hogs_nice"] = running.nice()
                for threads in loaded_counts:
                    print(
                        f"pause: loaded ({hogs} busy processes), {threads} threads, "
                        f"{rounds} rounds",
                        file=sys.stderr,
                    )
                    loaded["results"].append(
                        measure(exe, threads, rounds, budget, patch_compute, patch_spare)
                    )
                loaded["load_at_end"] = report.load_average()
    md = markdown(results, loaded, engine_error)
    data = {
        "target": {"source": "benchmarks/targets/bench_target.c", "build": build_command()},
        "engine_error": engine_error,
        "results": results,
        "loaded": loaded,
    }
    _json_path, md_path = report.write(
        NAME, args, argv, "pause: threads stopped per operation", data, md
    )
    print(md_path.read_text())
    return 1 if engine_error else 0


if __name__ == "__main__":
    sys.exit(main())

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
at nice 0) for the whole measurement. Aims (issue 7): idle, apply ≤ 1.5x bare
at every thread count; loaded, p99 ≤ 20 ms at 16 threads.
"""

from __future__ import annotations

import contextlib
import gc
import math
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
from benchmarks.stats import percentile, ratio, summary
from benchmarks.target import Target, build, build_command

NAME = "pause"
THREADS = (1, 16, 128)
QUICK_THREADS = (1, 16)
LOADED_THREADS = (16, 128)
QUICK_LOADED_THREADS = (16,)
MODES = ("idle", "loaded")
HOG = "while True: pass"  # one busy process: a pure spin loop
ROUNDS = 100
MIN_ROUNDS = 10
BUDGET = 45.0  # seconds per thread count, after which rounds stop (at least MIN_ROUNDS)
QUICK_BUDGET = 4.0
QUICK_ROUNDS = 2
BURN = 200  # multiplications between two calls of compute() in each spinning thread

OPS = [
    "bare",
    "apply_new_cave",
    "apply_existing_cave",
    "remove_cave_kept",
    "remove_last",
    "apply_spare_new_cave",
    "remove_spare_last",
]


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


def _cell(s: dict[str, float]) -> str:
    if not s["n"]:
        return "—"
    return f"{report.ms(s['median'])} / {report.ms(s['p90'])}"


def _idle_markdown(results: list[dict[str, Any]], engine_error: str | None) -> str:
    lines = [
        "## Idle machine",
        "",
        "Seconds every thread of the target is stopped, in ms, **median / p90**; "
        "`bare` = `with stop_world(pid): pass`, the same threads stopped and resumed, "
        "timed by the same clock as `Outcome.paused` (first seize to last detach), "
        "interleaved with the engine's operations on the same target. "
        "Ratios are of medians. Spinning threads call `compute()` (the patched function) "
        f"between runs of {BURN} multiplications; one thread in eight is blocked in `read()`.",
        "",
    ]
    if engine_error:
        lines += [
            f"**The engine could not be imported** ({engine_error}): only `bare` was measured.",
            "",
        ]
    lines += [
        "| threads | bare | apply, new cave | apply, existing cave | remove, cave kept "
        "| remove, last (unmaps cave) | apply/bare (new cave) | apply/bare (existing cave) "
        "| remove/bare (cave kept) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["seconds"]
        b = s["bare"]["median"]
        lines.append(
            f"| {r['threads']} | {_cell(s['bare'])} | {_cell(s['apply_new_cave'])} "
            f"| {_cell(s['apply_existing_cave'])} | {_cell(s['remove_cave_kept'])} "
            f"| {_cell(s['remove_last'])} "
            f"| {_fmt_ratio(ratio(s['apply_new_cave']['median'], b))} "
            f"| {_fmt_ratio(ratio(s['apply_existing_cave']['median'], b))} "
            f"| {_fmt_ratio(ratio(s['remove_cave_kept']['median'], b))} |"
        )
    lines += ["", "Samples per cell, attempts and failures:", ""]
    for r in results:
        n = {op: r["seconds"][op]["n"] for op in OPS}
        retried = {op: c for op, c in r["retried"].items() if c}
        lines.append(
            f"- {_threads(r['threads'])} ({r['threads_counted']} counted in /proc/PID/task: "
            f"{r['spinning']} spinning, {r['blocked']} blocked), {r['rounds']} rounds"
            f"{'' if r['rounds'] == r['rounds_requested'] else ' (time budget reached)'}: "
            f"n = {n['bare']} bare, {n['apply_new_cave']} apply (new cave), "
            f"{n['apply_existing_cave']} apply (existing cave), {n['remove_cave_kept']} remove "
            f"(cave kept), {n['remove_last']} remove (last); "
            f"operations that needed a retry (a thread in the way; `paused` counts the successful "
            f"attempt only): {retried or 'none'}; errors: {len(r['errors'])}"
            + (f" (first: `{r['errors'][0]}`)" if r["errors"] else "")
            + f"; target afterwards: {'alive' if r['target_alive'] else r['target_exit']}, "
            f"{r['target_stats'].get('bad', '?')} bad results."
        )
    lines += ["", "Aim (issue 7): the engine's operations ≤ 1.5x bare at every thread count.", ""]
    for r in results:
        s = r["seconds"]
        b = s["bare"]["median"]
        for label, op in _AIMED:
            q = ratio(s[op]["median"], b)
            if not math.isnan(q):
                lines.append(
                    f"- {_threads(r['threads'])}, {label}: {q:.2f}x bare — "
                    f"{'met' if q <= 1.5 else 'NOT met'}"
                )
    return "\n".join(lines)


_AIMED = (
    ("apply (new cave)", "apply_new_cave"),
    ("apply (existing cave)", "apply_existing_cave"),
    ("remove (cave kept)", "remove_cave_kept"),
)
_LOADED_OPS = (
    ("bare", "bare"),
    ("apply, new cave", "apply_new_cave"),
    ("apply, existing cave", "apply_existing_cave"),
    ("remove, cave kept", "remove_cave_kept"),
    ("remove, last", "remove_last"),
)


def _loaded_markdown(loaded: dict[str, Any]) -> str:
    lines = [
        "## Loaded machine",
        "",
        f"Every CPU saturated: {loaded['hogs']} busy processes (`python -c '{HOG}'`, nice "
        f"{sorted(set(loaded['hogs_nice']))}) spinning through the whole measurement; load "
        f"average {loaded['load_at_start']} before they started, {loaded['load_at_end']} at the "
        "end. Same rounds and clock as above; in ms.",
        "",
        "| threads | operation | n | median | p90 | p99 | max | median / bare |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in loaded["results"]:
        s = r["seconds"]
        for label, op in _LOADED_OPS:
            c = s[op]
            if not c["n"]:
                continue
            lines.append(
                f"| {r['threads']} | {label} | {c['n']} | {report.ms(c['median'])} "
                f"| {report.ms(c['p90'])} | {report.ms(c['p99'])} | {report.ms(c['max'])} "
                f"| {_fmt_ratio(ratio(c['median'], s['bare']['median']))} |"
            )
    lines += [""]
    for r in loaded["results"]:
        retried = {op: c for op, c in r["retried"].items() if c}
        lines.append(
            f"- {_threads(r['threads'])}: {r['rounds']} rounds; retried: {retried or 'none'}; "
            f"errors: {len(r['errors'])}"
            + (f" (first: `{r['errors'][0]}`)" if r["errors"] else "")
            + f"; target afterwards: {'alive' if r['target_alive'] else r['target_exit']}, "
            f"{r['target_stats'].get('bad', '?')} bad results."
        )
    lines += ["", "Aim (issue 7): loaded, p99 ≤ 20 ms at 16 threads.", ""]
    for r in loaded["results"]:
        if r["threads"] != 16:
            continue
        for label, op in _LOADED_OPS[1:]:
            p99 = r["seconds"][op]["p99"]
            if not math.isnan(p99):
                lines.append(
                    f"- 16 threads, {label}: p99 {report.ms(p99)} ms — "
                    f"{'met' if p99 <= 0.020 else 'NOT met'}"
                )
    return "\n".join(lines)


def markdown(
    results: list[dict[str, Any]], loaded: dict[str, Any] | None, engine_error: str | None
) -> str:
    parts = []
    if results:
        parts.append(_idle_markdown(results, engine_error))
    if loaded is not None:
        parts.append(_loaded_markdown(loaded))
    return "\n\n".join(parts)


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _fmt_ratio(q: float) -> str:
    return "—" if math.isnan(q) else f"{q:.2f}x"


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

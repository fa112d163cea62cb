"""soak: 1,000 apply/remove cycles on a 16-thread target that keeps calling the patched function.

Every thread of the target (main included) calls compute() back to back and
checks each result: 2x+1 unpatched, 2x+2 patched (the patchlet
`lea eax,[rdi+rdi+2]; ret` at compute's entry), anything else is a wrong
result. Each cycle is live.apply then live.remove; the target is checked for
life after each operation, its counters every 100 cycles and at the end, and
the patched result is checked through the target's own call every 100 cycles.
Aims (issue): 0 crashes, 0 wrong results.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import patches, report
from benchmarks.stats import summary
from benchmarks.target import Target, TargetError, build, build_command, diagnose

NAME = "soak"
CYCLES = 1000
QUICK_CYCLES = 10
THREADS = 16
CHECK_EVERY = 100
ANSWER_TIMEOUT = 20.0  # seconds the target's main thread may take to answer `call 5`


def soak(exe: Path, patch: Any, cycles: int) -> dict[str, Any]:
    from micropatch import live

    apply_paused: list[float] = []
    remove_paused: list[float] = []
    apply_attempts: list[int] = []
    remove_attempts: list[int] = []
    errors: Counter[str] = Counter()
    first_errors: dict[str, str] = {}
    effect_checks = {"patched_seen": 0, "unpatched_seen": 0, "wrong": 0}
    crash = None
    hang: str | None = None
    diagnosis: list[str] = []
    completed = 0

    def failed(op: str, e: Exception) -> None:
        key = f"{op}: {type(e).__name__}"
        errors[key] += 1
        first_errors.setdefault(key, str(e))

    with Target(exe, spin=THREADS - 1, blocked=0, burn=0, mainspin=True) as target:
        pid = target.pid
        counted = target.threads()
        applied = False
        start = time.perf_counter()
        for cycle in range(cycles):
            check = cycle % CHECK_EVERY == 0 or cycle == cycles - 1
            try:
                if not applied:
                    try:
                        out = live.apply(patch, pid)
                        applied = True
                        apply_paused.append(out.paused)
                        apply_attempts.append(out.attempts)
                    except Exception as e:
                        failed("apply", e)
                if not target.alive():
                    crash = f"after apply, cycle {cycle}: {target.describe_exit()}"
                    break
                _effect(
                    target.call(5, timeout=ANSWER_TIMEOUT), 12 if applied else 11, effect_checks
                )
                if applied:
                    try:
                        out = live.remove(patch.id, pid)
                        applied = False
                        remove_paused.append(out.paused)
                        remove_attempts.append(out.attempts)
                    except Exception as e:
                        failed("remove", e)
                if not target.alive():
                    crash = f"after remove, cycle {cycle}: {target.describe_exit()}"
                    break
                _effect(
                    target.call(5, timeout=ANSWER_TIMEOUT), 12 if applied else 11, effect_checks
                )
                completed = cycle + 1
                if check:
                    s = target.stats()
                    print(f"soak: cycle {cycle + 1}/{cycles}: {s}", file=sys.stderr)
                    gc.collect()
            except TargetError as e:
                if target.alive():
                    hang = f"cycle {cycle}: {e}"
                    diagnosis = diagnose(pid)
                else:
                    crash = f"cycle {cycle}: {target.describe_exit()}"
                break
        elapsed = time.perf_counter() - start
        stats = {}
        if hang is None and target.alive():
            stats = target.stats()
            if applied:
                try:
                    live.remove(patch.id, pid)
                except Exception as e:
                    failed("final remove", e)
        alive = target.alive()
    full = sum(1 for _ in zip(apply_paused, remove_paused, strict=False))
    return {
        "threads": THREADS,
        "threads_counted": counted,
        "cycles_requested": cycles,
        "cycles_completed": completed,
        "full_cycles": full,
        "seconds": elapsed,
        "cycles_per_second": completed / elapsed if elapsed else 0.0,
        "crash": crash,
        "hang": hang,
        "hang_diagnosis": diagnosis,
        "target_alive_at_end": alive,
        "target_stats": stats,
        "wrong_results": stats.get("bad"),
        "effect_checks": effect_checks,
        "paused_seconds": {"apply": summary(apply_paused), "remove": summary(remove_paused)},
        "attempts": {
            "apply": summary([float(a) for a in apply_attempts]),
            "remove": summary([float(a) for a in remove_attempts]),
            "apply_retried": sum(1 for a in apply_attempts if a > 1),
            "remove_retried": sum(1 for a in remove_attempts if a > 1),
        },
        "errors": dict(errors),
        "first_errors": first_errors,
        "samples": {
            "apply_paused": apply_paused,
            "remove_paused": remove_paused,
            "apply_attempts": apply_attempts,
            "remove_attempts": remove_attempts,
        },
    }


def _effect(result: int, expected: int, checks: dict[str, int]) -> None:
    if result == expected:
        checks["patched_seen" if expected == 12 else "unpatched_seen"] += 1
    else:
        checks["wrong"] += 1


def _ms(s: dict[str, float]) -> str:
    return f"{report.ms(s['median'])} / {report.ms(s['p90'])}"


def markdown(r: dict[str, Any] | None, error: str | None) -> str:
    if r is None:
        return f"**Not measured**: the engine could not be used ({error})."
    st = r["target_stats"]
    pa, pr = r["paused_seconds"]["apply"], r["paused_seconds"]["remove"]
    at = r["attempts"]
    crashes = 0 if r["crash"] is None and r["target_alive_at_end"] else 1
    hung = r.get("hang")
    lines = [
        f"{r['cycles_completed']} of {r['cycles_requested']} apply/remove cycles on a "
        f"{r['threads']}-thread target ({r['threads_counted']} in /proc/PID/task), every thread "
        "calling the patched `compute()` back to back and checking each result.",
        "",
        "| | value |",
        "|---|---:|",
        f"| crashes of the target | {crashes}{' — ' + r['crash'] if r['crash'] else ''} |",
        f"| target stopped answering (main thread stuck) | {1 if hung else 0}"
        f"{' — ' + hung if hung else ''} |",
        f"| wrong results (neither 2x+1 nor 2x+2) | {st.get('bad', '?')} "
        f"of {st.get('calls', 0):,} calls |",
        f"| calls that saw the unpatched / patched result | {st.get('old', 0):,} "
        f"/ {st.get('new', 0):,} |",
        f"| cycles per second | {r['cycles_per_second']:.2f} ({r['seconds']:.1f} s) |",
        f"| apply: paused, median / p90 (ms) | {_ms(pa)} |",
        f"| remove: paused, median / p90 (ms) | {_ms(pr)} |",
        f"| applies / removes that needed a retry | {at['apply_retried']} / {at['remove_retried']} "
        f"(max attempts {at['apply']['max']:.0f} / {at['remove']['max']:.0f}) |",
        f"| failed operations | {sum(r['errors'].values())} |",
        f"| checks through the target's own call: patched / unpatched / wrong | "
        f"{r['effect_checks']['patched_seen']} / {r['effect_checks']['unpatched_seen']} / "
        f"{r['effect_checks']['wrong']} |",
    ]
    if r["errors"]:
        lines += ["", "Failed operations (no change to the target is the engine's promise):", ""]
        lines += [f"- {k}: {n}x — first: `{r['first_errors'][k]}`" for k, n in r["errors"].items()]
        if any("AlreadyTraced" in k for k in r["errors"]):
            lines += [
                "",
                "AlreadyTraced: another process was tracing the target at that moment (its name "
                "is in the message); micropatch refuses rather than waits, and the cycle tries "
                "the operation again.",
            ]
    if hung:
        lines += ["", "State of the stuck target (threads, then gdb's backtraces):", "", "```"]
        lines += r["hang_diagnosis"][:80]
        lines += ["```"]
    lines += [
        "",
        "Aims (issue): 0 crashes — "
        + ("met" if crashes == 0 and not hung else "NOT met")
        + "; 0 wrong results — "
        + ("met" if st.get("bad") == 0 else "NOT met")
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument("--cycles", type=int, default=None, help=f"default {CYCLES}")
    args = report.parse(parser, argv)
    cycles = args.cycles or (QUICK_CYCLES if args.quick else CYCLES)
    error = patches.engine_error()
    result = None
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp:
        exe = build(Path(tmp))
        if error is None:
            try:
                patch = patches.parse(
                    patches.source("bench-soak", patches.build_id(exe), "compute", patches.PLUS_ONE)
                )
                result = soak(exe, patch, cycles)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
    data = {
        "target": {"source": "benchmarks/targets/bench_target.c", "build": build_command()},
        "patchlet": patches.PLUS_ONE,
        "engine_error": error,
        "result": result,
    }
    _, md_path = report.write(
        NAME, args, argv, "soak: apply/remove cycles under load", data, markdown(result, error)
    )
    print(md_path.read_text())
    return 0 if result is not None else 1


if __name__ == "__main__":
    sys.exit(main())

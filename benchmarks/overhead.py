"""overhead: nanoseconds per call added by an empty patchlet.

The target's main thread (the only thread) times a loop of N calls of the
noinline function compute() (`lea eax,[rdi+rdi+1]; ret`), the loop's own
cost included, and reports ns per call. N is calibrated so one measurement
takes about a quarter of a second. Each round measures the function
unpatched and patched with an empty patchlet (the trampoline is the relocated
`lea; ret`, then a jump back never reached), in alternating order; the added
cost is the median over rounds of patched - unpatched of the same round.
Aim (issue): < 2 ns added.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from benchmarks import patches, report
from benchmarks.stats import median, ratio, summary
from benchmarks.target import Target, build, build_command

NAME = "overhead"
ROUNDS = 41
QUICK_ROUNDS = 2
TARGET_SECONDS = 0.25
QUICK_TARGET_SECONDS = 0.03
MIN_CALLS = 1_000_000


def calibrate(target: Target, seconds: float) -> int:
    probe = MIN_CALLS
    ns = target.ns_per_call(probe)
    return max(MIN_CALLS, int(seconds * 1e9 / max(ns, 0.05)))


def measure(exe: Path, patch: Any, rounds: int, seconds: float) -> dict[str, Any]:
    from micropatch import live

    unpatched: list[float] = []
    patched: list[float] = []
    added: list[float] = []
    with Target(exe, spin=0, blocked=0, burn=0, mainspin=False) as target:
        pid = target.pid
        calls = calibrate(target, seconds)
        live.apply(patch, pid)  # warm-up: first-call costs, and the patched path checked once
        if target.call(5) != 11:
            raise RuntimeError("the empty patchlet changed compute(5)")
        live.remove(patch.id, pid)
        for r in range(rounds):
            first_patched = r % 2 == 1
            pair: dict[str, float] = {}
            for state in ("patched", "unpatched") if first_patched else ("unpatched", "patched"):
                if state == "patched":
                    live.apply(patch, pid)
                    pair[state] = target.ns_per_call(calls)
                    live.remove(patch.id, pid)
                else:
                    pair[state] = target.ns_per_call(calls)
            unpatched.append(pair["unpatched"])
            patched.append(pair["patched"])
            added.append(pair["patched"] - pair["unpatched"])
            print(f"overhead: round {r + 1}/{rounds}: {pair}", file=sys.stderr)
        alive = target.alive()
    return {
        "calls_per_measurement": calls,
        "rounds": rounds,
        "ns_per_call": {"unpatched": summary(unpatched), "patched": summary(patched)},
        "added_ns_paired": summary(added),
        "ratio_of_medians": ratio(median(patched), median(unpatched)),
        "samples": {"unpatched": unpatched, "patched": patched, "added": added},
        "target_alive": alive,
    }


def _row(label: str, s: dict[str, float]) -> str:
    return f"| {label} | {s['median']:.3f} | {s['p90']:.3f} | {s['min']:.3f} | {s['max']:.3f} |"


def markdown(result: dict[str, Any] | None, error: str | None) -> str:
    if result is None:
        return f"**Not measured**: the engine could not be used ({error})."
    u = result["ns_per_call"]["unpatched"]
    p = result["ns_per_call"]["patched"]
    a = result["added_ns_paired"]
    lines = [
        f"ns per call of `compute()` in a loop of {result['calls_per_measurement']:,} calls "
        "(the loop's own cost included), measured by the target itself, "
        f"{result['rounds']} rounds, unpatched and patched alternating in order. "
        "Added = patched - unpatched of the same round.",
        "",
        "| | median | p90 | min | max |",
        "|---|---:|---:|---:|---:|",
        _row("unpatched", u),
        _row("patched, empty patchlet", p),
        _row("added (paired)", a),
        "",
        f"Ratio of medians patched / unpatched: {result['ratio_of_medians']:.3f}x.",
        "",
        f"Aim (issue): < 2 ns added — median added {a['median']:.3f} ns: "
        f"{'met' if a['median'] < 2 else 'NOT met'}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument("--rounds", type=int, default=None, help=f"default {ROUNDS}")
    args = report.parse(parser, argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    seconds = QUICK_TARGET_SECONDS if args.quick else TARGET_SECONDS
    error = patches.engine_error()
    result = None
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp:
        exe = build(Path(tmp))
        if error is None:
            try:
                patch = patches.parse(
                    patches.source(
                        "bench-overhead", patches.build_id(exe), "compute", patches.EMPTY
                    )
                )
                result = measure(exe, patch, rounds, seconds)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
    data = {
        "target": {"source": "benchmarks/targets/bench_target.c", "build": build_command()},
        "engine_error": error,
        "result": result,
    }
    _, md_path = report.write(
        NAME,
        args,
        argv,
        "overhead: ns per call of a patched function",
        data,
        markdown(result, error),
    )
    print(md_path.read_text())
    return 0 if result is not None else 1


if __name__ == "__main__":
    sys.exit(main())

"""pause's report: the Markdown of its idle and loaded runs, and the aims it checks.

Aims (issue 18): on an idle machine, apply's median pause ≤ 3x the bare stop's
at 1 thread, ≤ 1.5x at 16, ≤ 1.3x at 128; on a saturated machine, where an
absolute bound means nothing (the bare stop's own p99 is hundreds of ms), apply's
p99 ≤ 1.3x the bare stop's p99 in the same run.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks import report
from benchmarks.stats import ratio

HOG = "while True: pass"  # one busy process: a pure spin loop

OPS = [
    "bare",
    "apply_new_cave",
    "apply_existing_cave",
    "remove_cave_kept",
    "remove_last",
    "apply_spare_new_cave",
    "remove_spare_last",
]

# Idle: the median pause of apply over the bare stop's, by thread count.
IDLE_AIMS = {1: 3.0, 16: 1.5, 128: 1.3}
LOADED_AIM = 1.3  # loaded: apply's p99 over the bare stop's p99


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
        f"between runs of {results[0]['burn']} multiplications; one thread in eight is "
        "blocked in `read()`.",
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
    aims = ", ".join(f"≤ {q}x at {_threads(n)}" for n, q in IDLE_AIMS.items())
    lines += ["", f"Aims (issue 18.2), medians over bare: {aims}.", ""]
    for r in results:
        s = r["seconds"]
        b = s["bare"]["median"]
        aim = IDLE_AIMS.get(r["threads"])
        for label, op in _AIMED:
            q = ratio(s[op]["median"], b)
            if not math.isnan(q):
                verdict = "no aim" if aim is None else "met" if q <= aim else "NOT met"
                lines.append(f"- {_threads(r['threads'])}, {label}: {q:.2f}x bare — {verdict}")
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
        "| threads | operation | n | median | p90 | p99 | max | median / bare | p99 / bare p99 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
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
                f"| {_fmt_ratio(ratio(c['median'], s['bare']['median']))} "
                f"| {_fmt_ratio(ratio(c['p99'], s['bare']['p99']))} |"
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
    lines += [
        "",
        f"Aim (issue 18.3): loaded, apply's p99 ≤ {LOADED_AIM}x the bare stop's p99, same run.",
        "",
    ]
    for r in loaded["results"]:
        bare_p99 = r["seconds"]["bare"]["p99"]
        for label, op in _LOADED_OPS[1:3]:
            p99 = r["seconds"][op]["p99"]
            q = ratio(p99, bare_p99)
            if not math.isnan(q):
                verdict = "met" if q <= LOADED_AIM else "NOT met"
                lines.append(
                    f"- {_threads(r['threads'])}, {label}: p99 {report.ms(p99)} ms vs bare "
                    f"{report.ms(bare_p99)} ms, {q:.2f}x — {verdict}"
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

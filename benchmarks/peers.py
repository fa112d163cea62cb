"""peers: time from command to patched, and memory added, against gdb and Frida.

Every tool makes compute() of a running bench_target return 2x+2 instead of
2x+1, each on a fresh copy of the same target (4 threads calling compute()):

- `micropatch apply PATCH --pid PID --allow-unsigned`, a subprocess: process
  start included (the patch is a TOML source, so no signature is checked);
- `live.apply(patch, pid)` in this process (the patch parsed beforehand);
- `gdb -batch -p PID -ex 'set {unsigned char[5]}compute = {0xe9, ...}'`: the
  same 5-byte jump, here to compute_alt, a function of the module that
  returns 2x+2 (what a trampoline would do); process start included;
- Frida's Python API: `frida.attach(pid)`, a script doing
  `Interceptor.replace(compute, compute_alt)` and `send('done')`, timed from
  before the attach to the 'done' message (`import frida` before the clock);
- the `frida` CLI (`frida -p PID -l SCRIPT -q --eternalize`), process start
  included.

Startup (issue 6): `micropatch status --pid PID` on an idle target (no spinning
thread; nothing applied), a subprocess, timed STARTUP_RUNS times after one
warm-up, next to `gdb -batch -p PID` attaching and detaching with no command.
Both read the target and change nothing: this is the fixed cost of a command.
Aim: status at most 150 ms median on an idle machine.

Tools run in a rotating order in each trial; one warm-up trial is not
recorded. Afterwards the change is undone where the tool can (live.remove;
detaching Frida's session reverts its hook) and the target is checked for
life again. The patched result is checked after each tool. Memory added is the
target's Rss (and Anonymous) from /proc/PID/smaps_rollup, 0.2 s after the
tool finished, minus the same 0.2 s after start, before the tool. Aims
(issue): faster than both peers, at most 8 KiB added.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.peer_tools import (
    FRIDA_SCRIPT,
    GDB,
    IMPORT_CLI,
    RUNNERS,
    TOOLS,
    Context,
    ToolFailed,
    micropatch_command,
    setup,
    stop_frida,
    timed_run,
    versions,
)
from benchmarks.peers_report import markdown
from benchmarks.stats import ratio, summary
from benchmarks.target import (
    Target,
    TargetError,
    build,
    build_command,
    memfd_kib,
    memory_added,
    memory_by_mapping,
)

NAME = "peers"
TRIALS = 12
QUICK_TRIALS = 1
SPIN = 3  # spinning threads besides main: a process of 4 threads
BURN = 200
SETTLE = 0.2
MEMORY_FIELDS = ("Rss", "Pss", "Anonymous", "Private_Dirty")
STARTUP_RUNS = 20
QUICK_STARTUP_RUNS = 5

STARTUP = {
    "micropatch_status": "`micropatch status --pid` (CLI process)",
    "gdb_attach": "gdb -batch -p, attach and detach only (CLI process)",
}


def startup(ctx: Context, runs: int) -> dict[str, Any]:
    """Seconds of each STARTUP command on one idle target, alternating, after a warm-up."""
    commands = {
        "micropatch_status": lambda pid: [*micropatch_command(), "status", "--pid", str(pid)],
        "gdb_attach": lambda pid: [*GDB, "-p", str(pid)],
    }
    times: dict[str, list[float]] = {k: [] for k in STARTUP}
    errors: dict[str, list[str]] = {k: [] for k in STARTUP}
    with Target(ctx.exe, spin=0, mainspin=False) as target:
        for run in range(1 + runs):
            for name in STARTUP:
                if name == "gdb_attach" and shutil.which("gdb") is None:
                    continue
                print(f"peers: startup {run}/{runs} {name}", file=sys.stderr)
                try:
                    seconds = timed_run(commands[name](target.pid))
                except (ToolFailed, OSError, subprocess.SubprocessError) as e:
                    errors[name].append(str(e))
                    continue
                if run:
                    times[name].append(seconds)
        if not target.alive():
            errors["micropatch_status"].append(f"target {target.describe_exit()}")
    return {
        name: {
            "label": label,
            "seconds": summary(times[name]),
            "samples": times[name],
            "errors": errors[name],
        }
        for name, label in STARTUP.items()
    }


def one(ctx: Context, tool: str) -> dict[str, Any]:
    """One fresh target, one tool: seconds, memory deltas, patched or not, crashed or not.

    Then the change is undone where the tool can undo it (micropatch: live.remove;
    Frida's API: detaching the session reverts the hook) and the target checked
    again: a crash then is counted apart from one while patching.
    """
    with Target(ctx.exe, spin=SPIN, burn=BURN, mainspin=True) as target:
        try:
            outcome = _measure(ctx, tool, target)
        except (TargetError, OSError) as e:  # the target died: its /proc files are gone
            outcome = {"error": f"{type(e).__name__}: {e}"}
        if "error" in outcome:
            with contextlib.suppress(subprocess.TimeoutExpired):
                target.proc.wait(timeout=0.5)
        outcome["crashed"] = not target.alive()
        if outcome["crashed"]:
            outcome["target_exit"] = target.describe_exit()
            outcome.setdefault("error", f"target {target.describe_exit()} after the tool")
        undone = _undo(ctx, tool, target.pid, outcome)
        if undone:
            with contextlib.suppress(subprocess.TimeoutExpired):
                target.proc.wait(timeout=SETTLE)
            if not outcome["crashed"] and not target.alive():
                outcome["crashed_at_undo"] = target.describe_exit()
        if outcome["crashed"] or outcome.get("crashed_at_undo"):
            outcome["kernel_log"] = kernel_log(target.pid)
    return outcome


def _undo(ctx: Context, tool: str, pid: int, outcome: dict[str, Any]) -> bool:
    """Undo the tool's change if it has a way to; True if something was undone."""
    if ctx.frida_sessions:
        for session in ctx.frida_sessions:
            with contextlib.suppress(Exception):
                session.detach()
        ctx.frida_sessions.clear()
        return True
    if tool.startswith("micropatch") and not outcome["crashed"] and "error" not in outcome:
        from micropatch import live

        try:
            live.remove(ctx.patch.id, pid)
        except Exception as e:
            outcome["undo_error"] = f"{type(e).__name__}: {e}"
        return True
    return False


def kernel_log(pid: int) -> list[str]:
    """The kernel's lines about a crashed target (segfault address, ip), if dmesg is readable."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if f"[{pid}]" in line][-5:]


def _measure(ctx: Context, tool: str, target: Target) -> dict[str, Any]:
    if target.call(5) != 11:
        raise RuntimeError("bench_target: compute(5) != 11 before patching")
    time.sleep(SETTLE)
    before = target.rss()
    mappings_before = memory_by_mapping(target.pid)
    memfds_before = memfd_kib(target.pid)
    try:
        seconds = RUNNERS[tool](ctx, target.pid)
    except ToolFailed as e:
        return {"error": str(e)}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    result = target.call(5)
    time.sleep(SETTLE)
    after = target.rss()
    mappings_after = memory_by_mapping(target.pid)
    memfds_after = memfd_kib(target.pid)
    return {
        "seconds": seconds,
        "patched": result == 12,
        "result": result,
        "added_kib": {k: after.get(k, 0) - before.get(k, 0) for k in MEMORY_FIELDS},
        "rss_before_kib": before.get("Rss", 0),
        "memfd_added_kib": sum(memfds_after.values()) - sum(memfds_before.values()),
        "memfds": memfds_after,
        "changed_mappings": [
            line.replace(f"{ctx.workdir}/", "$TMP/")
            for line in memory_added(mappings_before, mappings_after)
        ],
    }


def reference_import() -> float | None:
    """Seconds for a fresh interpreter to import the CLI: the floor of `micropatch apply`."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", IMPORT_CLI], capture_output=True)
    return time.perf_counter() - start if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument(
        "--trials", type=int, default=None, help=f"recorded trials per tool (default {TRIALS})"
    )
    parser.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS))
    args = report.parse(parser, argv)
    trials = args.trials or (QUICK_TRIALS if args.quick else TRIALS)
    tools = [t for t in TOOLS if t in args.tools]
    samples: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    reference: list[float] = []
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp:
        ctx = Context(exe=build(Path(tmp)), workdir=Path(tmp))
        setup(ctx)
        for t in TOOLS:
            if t not in tools:
                ctx.unavailable.setdefault(t, "not selected (--tools)")
        runnable = [t for t in tools if t not in ctx.unavailable]
        warmup = 0 if args.quick else 1
        for trial in range(warmup + trials):
            shift = trial % max(1, len(runnable))
            for tool in runnable[shift:] + runnable[:shift]:
                print(f"peers: trial {trial - warmup + 1}/{trials} {tool}", file=sys.stderr)
                outcome = one(ctx, tool)
                if trial >= warmup:
                    samples[tool].append(outcome)
            seconds = reference_import()
            if trial >= warmup and seconds is not None:
                reference.append(seconds)
        startup_runs = QUICK_STARTUP_RUNS if args.quick else STARTUP_RUNS
        startup_results = startup(ctx, startup_runs)
    stop_frida()
    summaries: dict[str, Any] = {}
    for tool in TOOLS:
        ok: list[dict[str, Any]] = [s for s in samples[tool] if "error" not in s]
        summaries[tool] = {
            "label": TOOLS[tool],
            "runs": len(samples[tool]),
            "patched": sum(1 for s in ok if s["patched"]),
            "seconds": summary([s["seconds"] for s in ok]),
            "added_kib": {k: summary([s["added_kib"][k] for s in ok]) for k in MEMORY_FIELDS},
            "memfd_added_kib": summary([s["memfd_added_kib"] for s in ok]),
            "errors": [s["error"] for s in samples[tool] if "error" in s],
            "crashes": sum(1 for s in samples[tool] if s.get("crashed")),
            "crashes_at_undo": sum(1 for s in samples[tool] if s.get("crashed_at_undo")),
            "undo_errors": [s["undo_error"] for s in samples[tool] if "undo_error" in s],
            "kernel_log": [line for s in samples[tool] for line in s.get("kernel_log", [])],
            "changed_mappings": ok[0]["changed_mappings"] if ok else None,
            "unavailable": ctx.unavailable.get(tool),
        }
    summaries["reference_import"] = summary(reference)
    summaries["startup"] = startup_results
    md = markdown(summaries, ctx, trials)
    data = {
        "target": {
            "source": "benchmarks/targets/bench_target.c",
            "build": build_command(),
            "threads": SPIN + 1,
            "burn": BURN,
        },
        "versions": versions(),
        "jump": ctx.jump.hex(" "),
        "frida_script": FRIDA_SCRIPT,
        "summaries": summaries,
        "samples": samples,
        "median_ratios": {
            "gdb_cli/micropatch_cli": ratio(
                summaries["gdb_cli"]["seconds"]["median"],
                summaries["micropatch_cli"]["seconds"]["median"],
            ),
            "frida_cli/micropatch_cli": ratio(
                summaries["frida_cli"]["seconds"]["median"],
                summaries["micropatch_cli"]["seconds"]["median"],
            ),
            "frida_api/micropatch_live": ratio(
                summaries["frida_api"]["seconds"]["median"],
                summaries["micropatch_live"]["seconds"]["median"],
            ),
        },
    }
    _, md_path = report.write(
        NAME, args, argv, "peers: command to patched, and memory added", data, md
    )
    print(md_path.read_text())
    # A peer that fails or crashes the target is a result; micropatch failing is not.
    ours = [t for t in tools if t.startswith("micropatch")]
    failed = any(summaries[t]["unavailable"] or summaries[t]["errors"] for t in ours)
    failed = failed or bool(startup_results["micropatch_status"]["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

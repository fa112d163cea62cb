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
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import patches, report
from benchmarks.stats import ratio, summary
from benchmarks.target import (
    Target,
    TargetError,
    build,
    build_command,
    memfd_kib,
    memory_added,
    memory_by_mapping,
    symbol_offsets,
)

NAME = "peers"
TRIALS = 12
QUICK_TRIALS = 1
SPIN = 3  # spinning threads besides main: a process of 4 threads
BURN = 200
SETTLE = 0.2
MEMORY_FIELDS = ("Rss", "Pss", "Anonymous", "Private_Dirty")
IMPORT_CLI = "import micropatch.cli.main"
FRIDA_TIMEOUT = 60
STARTUP_RUNS = 20
QUICK_STARTUP_RUNS = 5
STARTUP_AIM = 0.150

FRIDA_SCRIPT = """\
const m = Process.getModuleByName('bench_target');
Interceptor.replace(m.getExportByName('compute'), m.getExportByName('compute_alt'));
Interceptor.flush();
send('done');
"""

TOOLS = {
    "micropatch_cli": "`micropatch apply` (CLI process)",
    "micropatch_live": "`live.apply` (in-process)",
    "gdb_cli": "gdb -batch -p (CLI process)",
    "frida_api": "Frida `Interceptor.replace` (Python API, in-process)",
    "frida_cli": "`frida -q --eternalize` (CLI process)",
}


STARTUP = {
    "micropatch_status": "`micropatch status --pid` (CLI process)",
    "gdb_attach": "gdb -batch -p, attach and detach only (CLI process)",
}


# How each tool's change is undone after the measurement, where it can be.
UNDO = {
    "micropatch_cli": "live.remove",
    "micropatch_live": "live.remove",
    "frida_api": "detach (hook reverted)",
}


class ToolFailed(Exception):
    """The tool did not patch the target; the message says what it printed."""


@dataclass
class Context:
    exe: Path
    workdir: Path
    patch: Any = None  # admitted patch, for live.apply
    patch_path: Path | None = None
    jump: bytes = b""
    unavailable: dict[str, str] = field(default_factory=dict)
    frida_sessions: list[Any] = field(default_factory=list)


def _run(argv: list[str], timeout: float = 120) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise ToolFailed(
            f"{argv[0]} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}"
        )
    return elapsed


def _micropatch() -> list[str]:
    exe = shutil.which("micropatch")
    return [exe] if exe else [sys.executable, "-m", "micropatch.cli.main"]


def micropatch_cli(ctx: Context, pid: int) -> float:
    # A TOML source needs --allow-unsigned: signing is not what is measured here.
    return _run(
        [*_micropatch(), "apply", str(ctx.patch_path), "--pid", str(pid), "--allow-unsigned"]
    )


def micropatch_live(ctx: Context, pid: int) -> float:
    from micropatch import live

    start = time.perf_counter()
    live.apply(ctx.patch, pid)
    return time.perf_counter() - start


GDB = ["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off"]


def gdb_cli(ctx: Context, pid: int) -> float:
    values = ", ".join(f"{b:#04x}" for b in ctx.jump)
    set_jump = f"set {{unsigned char[{len(ctx.jump)}]}}compute = {{{values}}}"
    return _run([*GDB, "-p", str(pid), "-ex", set_jump])


def startup(ctx: Context, runs: int) -> dict[str, Any]:
    """Seconds of each STARTUP command on one idle target, alternating, after a warm-up."""
    commands = {
        "micropatch_status": lambda pid: [*_micropatch(), "status", "--pid", str(pid)],
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
                    seconds = _run(commands[name](target.pid))
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


def frida_api(ctx: Context, pid: int) -> float:
    import frida

    done = threading.Event()
    messages: list[Any] = []

    def on_message(message: Any, data: Any) -> None:
        messages.append(message)
        done.set()

    start = time.perf_counter()
    session = frida.attach(pid)
    ctx.frida_sessions.append(session)
    script = session.create_script(FRIDA_SCRIPT)
    script.on("message", on_message)
    script.load()
    if not done.wait(FRIDA_TIMEOUT):
        raise ToolFailed(f"no message from the Frida script within {FRIDA_TIMEOUT} s")
    elapsed = time.perf_counter() - start
    if messages[0].get("payload") != "done":
        raise ToolFailed(f"Frida script: {messages[0]}")
    return elapsed


def frida_cli(ctx: Context, pid: int) -> float:
    script = ctx.workdir / "replace.js"
    frida = shutil.which("frida")
    if frida is None:
        raise ToolFailed("no `frida` command on PATH (pip install frida-tools)")
    return _run([frida, "-p", str(pid), "-l", str(script), "-q", "--eternalize"])


RUNNERS: dict[str, Callable[[Context, int], float]] = {
    "micropatch_cli": micropatch_cli,
    "micropatch_live": micropatch_live,
    "gdb_cli": gdb_cli,
    "frida_api": frida_api,
    "frida_cli": frida_cli,
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


def _stop_frida() -> None:
    """Let Frida's local helper process go, if this process started one."""
    if "frida" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["frida"].shutdown()


def setup(ctx: Context) -> None:
    """Everything a tool needs before the clock starts; a tool that cannot work says why."""
    offsets = symbol_offsets(ctx.exe, ["compute", "compute_alt"])
    rel = offsets["compute_alt"] - (offsets["compute"] + 5)
    ctx.jump = b"\xe9" + rel.to_bytes(4, "little", signed=True)
    (ctx.workdir / "replace.js").write_text(FRIDA_SCRIPT)
    error = patches.engine_error()
    if error is None:
        try:
            text = patches.source(
                "bench-peers", patches.build_id(ctx.exe), "compute", patches.PLUS_ONE
            )
            ctx.patch_path = ctx.workdir / "bench-peers.toml"
            ctx.patch_path.write_text(text)
            # live.apply takes a patch the trust policy admitted: here, the unsigned
            # source, as `micropatch apply --allow-unsigned` admits it.
            from micropatch.trust.admission import admit

            ctx.patch = admit(
                text.encode(), name=ctx.patch_path.name, keys=None, allow_unsigned=True
            )
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if error is not None:
        ctx.unavailable["micropatch_cli"] = ctx.unavailable["micropatch_live"] = f"engine: {error}"
    if shutil.which("gdb") is None:
        ctx.unavailable["gdb_cli"] = "no gdb on PATH"
    try:
        import frida  # noqa: F401  (imported before any clock starts)
    except Exception as e:
        ctx.unavailable["frida_api"] = ctx.unavailable["frida_cli"] = (
            f"import frida: {type(e).__name__}: {e}"
        )


def versions() -> dict[str, str]:
    out = {}
    try:
        out["gdb"] = subprocess.run(
            ["gdb", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        out["gdb"] = "unavailable"
    try:
        import frida

        out["frida"] = frida.__version__
    except Exception:
        out["frida"] = "unavailable"
    return out


def _undo_crashes(tool: str, s: dict[str, Any]) -> str:
    if tool not in UNDO:
        return ""
    return f" (+{s['crashes_at_undo']} at {UNDO[tool]})"


def markdown(summaries: dict[str, Any], ctx: Context, trials: int) -> str:
    cli = summaries["micropatch_cli"]["seconds"]["median"]
    inproc = summaries["micropatch_live"]["seconds"]["median"]
    lines = [
        "Wall-clock time from command to patched, in ms, **median / p90**, and the target's memory "
        f"added, in KiB (median, max): {trials} trials, each tool on a fresh 4-thread target "
        "(all threads calling `compute()`), tools in rotating order, one unrecorded warm-up trial. "
        "Ratios are of medians: time of the tool ÷ time of micropatch run the same way "
        "(CLI process against CLI process, in-process against in-process).",
        "",
        "| tool | time (ms) | ÷ micropatch | Rss added (KiB) | Anonymous added (KiB) "
        "| memfd pages added (KiB) | patched | target died | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tool, label in TOOLS.items():
        s = summaries[tool]
        if tool in ctx.unavailable:
            lines.append(f"| {label} | not run | | | | | | | {ctx.unavailable[tool]} |")
            continue
        t = s["seconds"]
        base = inproc if tool in ("micropatch_live", "frida_api") else cli
        q = ratio(t["median"], base)
        cell = "—" if not t["n"] else f"{report.ms(t['median'])} / {report.ms(t['p90'])}"
        qcell = "—" if q != q else f"{q:.2f}x"
        rss = s["added_kib"]["Rss"]
        dirty = s["added_kib"]["Anonymous"]
        mem = "—" if not rss["n"] else f"{rss['median']:.0f} ({rss['max']:.0f})"
        dmem = "—" if not dirty["n"] else f"{dirty['median']:.0f} ({dirty['max']:.0f})"
        memfd = s["memfd_added_kib"]
        fmem = "—" if not memfd["n"] else f"{memfd['median']:.0f} ({memfd['max']:.0f})"
        lines.append(
            f"| {label} | {cell} | {qcell} | {mem} | {dmem} | {fmem} | {s['patched']}/{s['runs']} "
            f"| {s['crashes']}/{s['runs']}{_undo_crashes(tool, s)} | {len(s['errors'])} |"
        )
    logs = [(TOOLS[t], line) for t in TOOLS for line in summaries[t]["kernel_log"][:3]]
    if logs:
        lines += ["", "Kernel log of crashed targets (first lines per tool):", ""]
        lines += [f"- {label}: `{line}`" for label, line in logs]
    errors = [(TOOLS[t], e) for t in TOOLS for e in summaries[t]["errors"][:1]]
    errors += [(TOOLS[t] + " (undo)", e) for t in TOOLS for e in summaries[t]["undo_errors"][:1]]
    if errors:
        lines += ["", "First error of each failing tool:", ""]
        lines += [f"- {label}: `{e}`" for label, e in errors]
    imports = summaries["reference_import"]
    if imports["n"]:
        lines += [
            "",
            f"For reference, `python -c '{IMPORT_CLI}'` alone (interpreter start-up and the CLI's "
            f"imports, no patching), timed in the same trials: {report.ms(imports['median'])} / "
            f"{report.ms(imports['p90'])} ms.",
        ]
    lines += _startup_markdown(summaries["startup"])
    lines += ["", "Mappings whose memory changed (first trial of each tool):", ""]
    for tool, label in TOOLS.items():
        changed = summaries[tool]["changed_mappings"]
        if changed is not None:
            lines.append(f"- {label}: " + ("; ".join(changed) or "none"))
    lines += ["", "Aims (issue): faster than gdb and Frida; at most 8 KiB added.", ""]
    for mine, peers_ in (
        ("micropatch_cli", ("gdb_cli", "frida_cli")),
        ("micropatch_live", ("frida_api",)),
    ):
        m = summaries[mine]["seconds"]["median"]
        for peer in peers_:
            p = summaries[peer]["seconds"]["median"]
            if m == m and p == p:
                lines.append(
                    f"- {TOOLS[mine]} vs {TOOLS[peer]}: {report.ms(m)} ms vs {report.ms(p)} ms — "
                    f"{'met' if m < p else 'NOT met'}"
                )
    for mine in ("micropatch_cli", "micropatch_live"):
        for kind in ("Rss", "Anonymous"):
            added = summaries[mine]["added_kib"][kind]
            if added["n"]:
                lines.append(
                    f"- {TOOLS[mine]}: {kind} added median {added['median']:.0f} KiB, "
                    f"max {added['max']:.0f} KiB — {'met' if added['max'] <= 8 else 'NOT met'}"
                )
    lines += [
        "",
        "Target died: killed by a signal, or exited by itself, while being patched or in the "
        "0.2 s after; in parentheses, in the 0.2 s after the change was undone (micropatch: "
        "`live.remove`; Frida's API: detaching the session, which reverts the hook; gdb and "
        "the eternalized Frida CLI leave their change in place). A crashed trial's time and "
        "memory are left out of the columns when it died before they were measured.",
        "",
        "Notes: Rss and Anonymous tell different parts. A page of code copied on write (the "
        "patched page of the module) is private memory that was already resident: Anonymous "
        "grows, Rss does not. A page of the vDSO touched by a remote system call counts in Rss "
        "but is shared by every process. micropatch's cave is a memfd mapped private: the pages "
        "written into it are private copies (in both columns); the memfd's own shmem pages they "
        "were copied from are in no process's Rss: the memfd column counts them (blocks "
        "allocated to each memfd the target maps, from /proc/PID/map_files). "
        "gdb is run with `-nx` and debuginfod off; on this machine it loads libc's debug symbols.",
    ]
    return "\n".join(lines)


def _startup_markdown(startup: dict[str, Any]) -> list[str]:
    runs = max(s["seconds"]["n"] for s in startup.values())
    lines = [
        "",
        f"Startup: a command that attaches and changes nothing, on one idle target (no spinning "
        f"thread), median / p90 / min of {runs} runs after a warm-up, alternating:",
        "",
        "| startup | time (ms) | ÷ micropatch | errors |",
        "|---|---:|---:|---:|",
    ]
    base = startup["micropatch_status"]["seconds"]["median"]
    for s in startup.values():
        t = s["seconds"]
        cell = (
            "—"
            if not t["n"]
            else (f"{report.ms(t['median'])} / {report.ms(t['p90'])} / {report.ms(t['min'])}")
        )
        q = ratio(t["median"], base)
        qcell = "—" if q != q else f"{q:.2f}x"
        lines.append(f"| {s['label']} | {cell} | {qcell} | {len(s['errors'])} |")
    status = startup["micropatch_status"]["seconds"]["median"]
    if status == status:
        verdict = "met" if status <= STARTUP_AIM else "NOT met"
        lines += [
            "",
            f"- `micropatch status --pid` median {report.ms(status)} ms, aim "
            f"≤ {STARTUP_AIM * 1e3:.0f} ms on an idle machine — {verdict}",
        ]
    return lines


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
    _stop_frida()
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

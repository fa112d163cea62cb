"""peers' report: the Markdown of its trials and of the startup commands, and the
aims it checks."""

from __future__ import annotations

from typing import Any

from benchmarks import report
from benchmarks.peer_tools import IMPORT_CLI, TOOLS, UNDO, Context
from benchmarks.stats import ratio

STARTUP_AIM = 0.150


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

"""The agent benchmark's Markdown: one section per part, aims stated."""

from __future__ import annotations

from typing import Any

from benchmarks import report
from benchmarks.agent_cli import CLIENT_IMPORTS
from benchmarks.agent_setup import AGENT_ID, CLI_ID, DIRECT_ID
from benchmarks.stats import ratio

ENABLE_AIM = 2.0
RESTART_AIM = 3.0
CPU_AIM = 0.01
RSS_AIM_KIB = 60 * 1024
GDB_AIM = 10.0


def _cell(s: dict[str, float]) -> str:
    if not s["n"]:
        return "—"
    return f"{report.ms(s['median'])} / {report.ms(s['p90'])} / {report.ms(s['max'])}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _bytecode_note(b: dict[str, Any]) -> str:
    if b["compiled_by_benchmark"]:
        return (
            f"Bytecode: micropatch's modules compiled first, as an installed package has them "
            f"({b['pyc_before']} .pyc before, {b['pyc_after']} after: this environment's "
            f"editable install with PYTHONDONTWRITEBYTECODE={b['PYTHONDONTWRITEBYTECODE']} "
            "writes none, so every command would compile micropatch's sources anew)."
        )
    return f"Bytecode: not compiled by the benchmark (--no-compile; {b['pyc_before']} .pyc)."


def _profile_markdown(prof: dict[str, Any] | None, what: str) -> list[str]:
    if not prof:
        return []
    if "error" in prof:
        return ["", f"py-spy on {what}: {prof['error']}"]
    lines = [
        "",
        f"Where the time goes, py-spy on {what}: {prof['rate']} Hz, {prof['seconds']:.1f} s, "
        f"{prof['samples']} samples of busy threads, by activity (outermost micropatch frames) "
        "and by innermost micropatch function:",
        "",
        "| samples | activity |",
        "|---:|---|",
    ]
    lines += [f"| {count} | `{name}` |" for name, count in prof["by_activity"]]
    lines += ["", "| samples | function |", "|---:|---|"]
    lines += [f"| {count} | `{name}` |" for name, count in prof["by_function"]]
    return lines


def markdown(data: dict[str, Any]) -> str:
    n = data["processes"]
    cfg = data["agent_config"]
    workers = cfg.get("workers")
    keys = "filesystems = the sandbox's tmpfs, "
    count = data.get("worker_count")
    keys += (
        f"workers unset ({count} here), every other key"
        if workers is None
        else (f"workers = {workers}, every other key")
    )
    lines = [
        f"A real agent (`micropatch agent run`; configuration: {keys} at its default, "
        f"rescan_interval = {cfg['rescan_interval']:g} s, blocked_interval = "
        f"{cfg['blocked_interval']:g} s, new_processes = {str(cfg['new_processes']).lower()}) "
        f"and {n} idle bench_target processes (one thread in read()). The agent was ready "
        f"{data['agent_ready_seconds']:.2f} s after its start with the {n} processes running. "
        "The agent and the targets run in a sandbox (own PID and mount namespaces, a private "
        "tmpfs): the agent sees only the sandbox's processes and marks only its tmpfs "
        "(fanotify, execs held there while it decides); the proc connector serves no "
        "listener outside the host's PID namespace, so crash tracking is off.",
        "",
        _bytecode_note(data["bytecode"]),
        "",
    ]
    fleet = data.get("fleet")
    if fleet:
        s = fleet["summaries"]
        rounds = s["agent_enable"]["exit"]["n"]
        lines += [
            f"## 1. A patch for {n} running processes",
            "",
            f"In ms, **median / p90 / max** of {rounds} interleaved rounds: from just before the "
            "command starts to the last process seen patched (its compute() entry is the patch's "
            "jump, read from /proc/PID/mem in sweeps while the command runs), and to the "
            "command's exit. Every process's registry checked after each step (`live.status`).",
            "",
            "| step | command | all changed (ms) | command exit (ms) | registries wrong | errors |",
            "|---|---|---:|---:|---:|---:|",
        ]
        labels = {
            "agent_enable": ("enable → all patched", f"`micropatch agent enable {AGENT_ID}`"),
            "direct_apply": (
                "apply → all patched",
                f"`MICROPATCH_NO_AGENT=1 micropatch apply {DIRECT_ID}.mpatch --all`",
            ),
            "agent_disable": ("disable → all removed", f"`micropatch agent disable {AGENT_ID}`"),
            "direct_remove": (
                "remove → all removed",
                f"`MICROPATCH_NO_AGENT=1 micropatch remove {DIRECT_ID} --all`",
            ),
        }
        for step, (what, cmd) in labels.items():
            c = s[step]
            lines.append(
                f"| {what} | {cmd} | {_cell(c['seconds'])} | {_cell(c['exit'])} "
                f"| {c['registry_wrong']} | {len(c['errors'])} |"
            )
        en, ap = s["agent_enable"]["seconds"]["median"], s["direct_apply"]["seconds"]["median"]
        dis, rm = s["agent_disable"]["seconds"]["median"], s["direct_remove"]["seconds"]["median"]
        lines += [
            "",
            f"- agent enable vs direct `apply --all`: {ratio(ap, en):.2f}x faster (medians); "
            f"agent disable vs direct `remove --all`: {ratio(rm, dis):.2f}x.",
            f"- Aim (issue 8): all {n} patched ≤ {ENABLE_AIM:g} s after enable: median "
            f"{en:.3f} s, max {s['agent_enable']['seconds']['max']:.3f} s — "
            f"{_verdict(s['agent_enable']['seconds']['max'] <= ENABLE_AIM)}.",
        ]
        for step, c in s.items():
            if c["errors"]:
                lines.append(f"- first error of {step}: `{c['errors'][0]}`")
        lines.append("")
    cost = data.get("idle")
    if cost:
        mem = cost["memory_kib"]
        lines += [
            f"## 2. The agent idle with {n} processes patched",
            "",
            f"After `agent enable` and every process patched: {cost['cpu_seconds']:.2f} s of CPU "
            f"(utime + stime, {cost['threads']} threads) in {cost['wall_seconds']:.1f} s = "
            f"**{cost['cpu_share'] * 100:.2f}% of one core**; VmRSS **{mem['VmRSS'] / 1024:.1f} "
            f"MiB** (RssAnon {mem.get('RssAnon', 0) / 1024:.1f}, RssFile "
            f"{mem.get('RssFile', 0) / 1024:.1f}; peak VmHWM {mem['VmHWM'] / 1024:.1f} MiB). "
            f"Processes covered (agent status): {cost['processes_covered']}; full passes in the "
            f"window: {cost['passes_during']} (rescan_interval {cfg['rescan_interval']:g} s); "
            f"blocked counters and store read every {cfg['blocked_interval']:g} s.",
            "",
            f"- Aim: CPU < {CPU_AIM * 100:g}% of one core — "
            f"{_verdict(cost['cpu_share'] < CPU_AIM)}",
            f"- Aim: RSS < {RSS_AIM_KIB // 1024} MB — {_verdict(mem['VmRSS'] < RSS_AIM_KIB)}",
        ]
        foot = data.get("import_footprint") or {}
        if "added_kib" in foot:
            parts = ", ".join(f"{name} +{kib / 1024:.1f}" for name, kib in foot["added_kib"])
            lines += [
                "",
                f"For reference, a fresh interpreter importing what the agent runs on: "
                f"{foot['total_kib'] / 1024:.1f} MiB VmRSS (python alone "
                f"{foot['python_kib'] / 1024:.1f}; then, in turn, MiB: {parts}). The rest of the "
                "agent's RSS is its own data (module cache, processes, SQLite, threads).",
            ]
        lines += _profile_markdown(
            data.get("profile"), "the idle agent (after the measurement, as long)"
        )
        lines += _profile_markdown(
            cost.get("enable_profile"),
            f"one more `agent enable` over the {n} processes (after the timed rounds; "
            f"all patched in {cost['enable_seconds_profiled']:.2f} s under py-spy)",
        )
        lines.append("")
    again = data.get("restart")
    if again:
        r = again["summary"]
        lines += [
            f"## 3. The agent restarted with {n} processes patched",
            "",
            f"The agent SIGKILLed and started again, {r['n']} times, with the {n} processes "
            f"patched and {again['host_processes']} processes in its sandbox (`sleep` bystanders "
            "added): from its start to ready (its first pass over every process done), in ms, "
            f"**median / p90 / max**: {_cell(r)}. Registries wrong after (the patch missing "
            f"or twice): {again['registry_wrong']}.",
            "",
            f"- Aim (issue 18): ready ≤ {RESTART_AIM:g} s after a restart with "
            f"{again['host_processes']} processes — {_verdict(r['max'] <= RESTART_AIM)}",
            "",
        ]
    cli = data.get("cli")
    if cli:
        s = cli["summaries"]
        base = s["through_agent"]["apply"]["median"]
        runs = max(v["apply"]["n"] for v in s.values())
        lines += [
            "## 4. One process: the CLI through the agent, directly, and gdb",
            "",
            f"Command start to exit (the target patched: `call 5` answers 12), in ms, **median / "
            f"p90 / max** of {runs} runs after a warm-up, tools in rotating order, on one target "
            f"({cli['target']}). Undo: `micropatch remove {CLI_ID} --pid` the same way; gdb's "
            "bytes written back through /proc/PID/mem.",
            "",
            "| tool | apply (ms) | ÷ through the agent | undo (ms) | errors |",
            "|---|---:|---:|---:|---:|",
        ]
        for v in s.values():
            q = ratio(v["apply"]["median"], base)
            lines.append(
                f"| {v['label']} | {_cell(v['apply'])} | {'—' if q != q else f'{q:.2f}x'} "
                f"| {_cell(v['undo'])} | {len(v['errors'])} |"
            )
        gdb = s["gdb"]["apply"]["median"]
        q = ratio(gdb, base)
        if q == q:
            lines += [
                "",
                f"- Aim: through the agent ≥ {GDB_AIM:g}x faster than gdb batch: "
                f"{q:.1f}x — {_verdict(q >= GDB_AIM)}",
            ]
        c = cli["client_start"]
        if c["n"]:
            lines.append(
                f"- Where the time through the agent goes: a fresh interpreter importing the "
                f"client (`python -c '{CLIENT_IMPORTS}'`, timed after each run) takes "
                f"{report.ms(c['median'])} ms median (`python -c pass`: "
                f"{report.ms(cli['python_start']['median'])} ms); the agent answering the same "
                f"request on its socket (row 4: admission of the artifact, the apply) "
                f"{report.ms(s['socket']['apply']['median'])} ms; the rest is the command's "
                "own work (reading the artifact, printing the answer)."
            )
        for t, v in s.items():
            if v["errors"]:
                lines.append(f"- first error of {t}: `{v['errors'][0]}`")
        if cli["routed_output"]:
            lines += ["", "What each command printed (first recorded run):", ""]
            lines += [f"- `{line}`" for line in cli["routed_output"]]
    return "\n".join(lines)

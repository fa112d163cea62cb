"""The Markdown table of benchmarks/server.py's results."""

from __future__ import annotations

import json
from typing import Any

from benchmarks import report, server_held
from benchmarks.simagents import CHANGED, CONCURRENCY, EVENT_BATCH, MODULES, PROCESSES

P99_AIM = 0.100
EVENTS_AIM = 1000.0
PUSH_AIM = 5.0  # seconds, p95 of a change reaching every held agent (issue 17.8)


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "?" if x is None or x != x else fmt.format(x)


def markdown(data: dict[str, Any]) -> str:
    dbs = [d for d in ("sqlite", "postgresql") if d in data["databases"]]
    res = data["databases"]
    head = "| | " + " | ".join(dbs) + " |\n|---|" + "---|" * len(dbs) + "\n"

    def row(label: str, get: Any) -> str:
        cells = []
        for d in dbs:
            try:
                cells.append(get(res[d]))
            except (KeyError, TypeError):
                cells.append(res[d].get("error", "?") if isinstance(res[d], dict) else "?")
        return f"| {label} | " + " | ".join(cells) + " |\n"

    ms = report.ms
    lines = [
        f"{data['agents']:,} agents enrolled, then each agent's first check-in with its "
        f"whole inventory ({MODULES} modules, {PROCESSES} processes), {CONCURRENCY} in "
        f"flight; check-ins of {EVENT_BATCH} events, {CONCURRENCY} in flight, for "
        f"{data['event_seconds']:g} s; then check-ins at {data['rate']:.1f}/s "
        f"(10,000 agents every 60 s) for {data['seconds']:g} s, open loop (latency from each "
        f"check-in's due time), {CHANGED:.0%} of them with a changed inventory (sent whole), "
        f"the others with its digest only, as the agent does. Client and server on the "
        "same machine.\n",
    ]
    if data.get("note"):
        lines.append(f"**{data['note']}**\n")
    table = head
    table += row("server processes", lambda r: str(r.get("workers", 1)))
    table += row("enrollment tokens via admin API (s)", lambda r: _f(r["setup"]["tokens_seconds"]))
    table += row("enrollments (s)", lambda r: _f(r["setup"]["enroll_seconds"]))
    table += row("first check-ins, whole inventory (/s)",
                 lambda r: _f(r["first_checkins"]["per_second"]))  # fmt: skip
    table += row("first check-in p50 / p99 (ms)",
                 lambda r: f"{ms(r['first_checkins']['p50'])} / "
                 f"{ms(r['first_checkins']['p99'])}")  # fmt: skip
    table += row("first check-in errors", lambda r: str(r["first_checkins"]["errors"]))
    table += row("check-ins due", lambda r: f"{r['checkin']['checkins']:,}")
    table += row("check-in p50 (ms)", lambda r: ms(r["checkin"]["latency"]["p50"]))
    table += row("check-in p99 (ms)", lambda r: ms(r["checkin"]["latency"]["p99"]))
    table += row("check-in max (ms)", lambda r: ms(r["checkin"]["latency"]["max"]))
    table += row("of which inventory sent: p50 / p99 (ms)",
                 lambda r: f"{ms(r['checkin']['inventory_sent_p50'])} / "
                 f"{ms(r['checkin']['inventory_sent_p99'])}")  # fmt: skip
    table += row("achieved rate (/s)", lambda r: _f(r["checkin"]["rate_achieved"]))
    table += row("errors", lambda r: str(r["checkin"]["errors"]))
    table += row("error kinds", lambda r: json.dumps(r["checkin"]["error_kinds"]) or "-")
    table += row("events ingested (/s)", lambda r: _f(r["events"]["events_per_second"], "{:.0f}"))
    table += row("event check-in p50 (ms)", lambda r: ms(r["events"]["checkin_p50"]))
    table += row("event errors", lambda r: str(r["events"]["errors"]))
    table += row("server peak RSS (MiB)", lambda r: _f(r["server_peak_rss_kib"] / 1024))
    table += held_rows(row)
    lines.append(table)
    aims = []
    pg = res.get("postgresql", {})
    if "checkin" in pg:
        c = pg["checkin"]
        met = c["latency"]["p99"] < P99_AIM and c["errors"] == 0
        aims.append(
            f"- check-in p99 < 100 ms with PostgreSQL, 0 errors: "
            f"{'met' if met else 'missed'} ({ms(c['latency']['p99'])} ms, {c['errors']} errors)"
        )
    else:
        aims.append("- check-in p99 < 100 ms with PostgreSQL: not measured in this run")
    for d in dbs:
        if "events" in res[d]:
            e = res[d]["events"]["events_per_second"]
            aims.append(
                f"- events ≥ 1,000/s ({d}): {'met' if e >= EVENTS_AIM else 'missed'} ({e:.0f}/s)"
            )
    for d in dbs:
        if "held" in res[d]:
            h = res[d]["held"]
            met = h["woken"] == h["agents"] and h["wake_p95"] <= PUSH_AIM
            aims.append(
                f"- push (issue 17.8), {d}: a policy change answers all "
                f"{h['agents']:,} agents holding check-ins, p95 ≤ {PUSH_AIM:g} s: "
                f"{'met' if met else 'missed'} ({h['woken']:,} answered, p95 "
                f"{_f(h['wake_p95'], '{:.2f}')} s; {h['held_at_once']:,} held at once, "
                f"{h['errors']} errors)"
            )
    aims.append(
        "- publish → applied on three real agents: see fleet_publish.md "
        "(`python -m benchmarks.fleet_publish`)"
    )
    lines.append("Aims (issues 9 and 17):\n\n" + "\n".join(aims) + "\n")
    return "\n".join(lines)


def held_rows(row: Any) -> str:
    """The rows of the connection phases (server_held.py)."""
    ms = report.ms
    return "".join([
        row(f"{server_held.BURST} connections at once: answered / statuses",
            lambda r: f"{r['burst']['answered']} / {json.dumps(r['burst']['statuses'])}"),
        row("health after them", lambda r: str(r["burst"]["health_after"])),
        row("held check-ins at once", lambda r: f"{r['held']['held_at_once']:,}"),
        row("server RSS before / while held (MiB)",
            lambda r: f"{_f(r['held']['server_rss_kib_before'] / 1024)} / "
            f"{_f(r['held']['server_rss_kib_held'] / 1024)}"),
        row("memory per held check-in (KiB)", lambda r: _f(r["held"]["per_held_kib"])),
        row("server file descriptors while held", lambda r: f"{r['held']['server_files_held']:,}"),
        row(f"probe check-ins beside them ({server_held.PROBE_RATE:g}/s): p50 / p99 (ms)",
            lambda r: f"{ms(r['held']['checkin']['latency']['p50'])} / "
            f"{ms(r['held']['checkin']['latency']['p99'])}"),
        row("check-ins beside them: errors", lambda r: str(r["held"]["checkin"]["errors"])),
        row("held ones answered and sent again (/s)", lambda r: _f(r["held"]["resent_per_second"])),
        row("server CPU per check-in beside them, held ones' included (ms)",
            lambda r: _f(r["held"].get("cpu_ms_per_checkin"), "{:.2f}")),
        row("held errors", lambda r: json.dumps(r["held"]["error_kinds"]) or "-"),
        row("policy change → held answered: woken / p50 / p95 / max (s)",
            lambda r: f"{r['held']['woken']:,} / {_f(r['held']['wake_p50'], '{:.2f}')} / "
            f"{_f(r['held']['wake_p95'], '{:.2f}')} / {_f(r['held']['wake_max'], '{:.2f}')}"),
        row("server CPU from the change until they were answered (s)",
            lambda r: _f(r["held"].get("wake_cpu_seconds"), "{:.1f}")),
    ])  # fmt: skip

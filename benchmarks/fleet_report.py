"""The summary and the Markdown table of benchmarks/fleet_publish.py's results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.fleet import HOSTS
from benchmarks.stats import percentile, summary

AIM = 5.0  # seconds, p95 of a change on all three agents
PARTS = ("checkin_wait", "answer_to_applied", "download", "live_apply", "paused_ms")


def _s(x: float | None, fmt: str = "{:.2f}") -> str:
    return "?" if x is None or x != x else fmt.format(x)


def summarise(result: dict[str, Any], kinds: Sequence[str]) -> dict[str, Any]:
    changes = result["changes"]
    out: dict[str, Any] = {}
    for kind in kinds:
        mine = [c for c in changes if c["kind"] == kind]
        every = [a["seconds"] for c in mine for a in c["agents"].values()]
        alls = [c["all_seconds"] for c in mine]
        out[kind] = {
            "all_three": summary(alls) | {"p95": percentile(alls, 95)},
            "each_agent": summary(every) | {"p95": percentile(every, 95)},
            "made": summary([c["made_seconds"] for c in mine]),
        }
    publishes = [c for c in changes if c["kind"] == "publish"]
    out["publish_parts"] = {
        key: summary(
            [a[key] for c in publishes for a in c["agents"].values() if a.get(key) is not None]
        )
        for key in PARTS
    }
    alls = [c["all_seconds"] for c in changes]
    out["every_change"] = summary(alls) | {"p95": percentile(alls, 95)}
    return out


def markdown(data: dict[str, Any], kinds: Sequence[str]) -> str:
    lines = [
        "A real `micropatch server run` (SQLite) and three real agents, each in its own "
        'PID+UTS namespace (a "host") with a vuln_pie target, **all with the default '
        f"configuration** (check-in interval {data.get('checkin_interval', '?')} s, the "
        'server\'s; check-ins held until their answer changes: docs/server.md, "Push"). '
        "Rounds of four changes — publish a new version (`micropatch publish`, its start "
        "included), disable it (policy), enable it again, revoke it — each after a random "
        f"delay in [0, {data['delay_before_each']:g}) s, timed from just before the change "
        "until every agent's status shows its effect in its target (polled every "
        f"{data['poll_seconds'] * 1e3:.0f} ms).\n",
    ]
    if data.get("error"):
        lines.append(f"**Failed: {data['error']}**\n")
    if data.get("note"):
        lines.append(f"**{data['note']}**\n")
    changes = data.get("changes") or []
    if not changes:
        return "\n".join(lines)
    s = data["summary"]
    e = s["every_change"]
    met = e["p95"] <= AIM
    lines.append(
        f"**Every change on all three agents: p95 {_s(e['p95'])} s, median "
        f"{_s(e['median'])} s, max {_s(e['max'])} s ({e['n']} changes): the aim, ≤ {AIM:g} s "
        f"at p95, is {'met' if met else 'missed'}.**\n"
    )
    table = "| change | n | all three: median / p95 / max (s) | each agent: median / p95 (s) "
    table += "| the change itself (s) |\n|---|---|---|---|---|\n"
    for kind in kinds:
        k = s[kind]
        a, g = k["all_three"], k["each_agent"]
        table += (
            f"| {kind} | {a['n']} | {_s(a['median'])} / **{_s(a['p95'])}** / {_s(a['max'])} "
            f"| {_s(g['median'])} / {_s(g['p95'])} | {_s(k['made']['median'])} |\n"
        )
    lines.append(table)
    parts = [
        ("checkin_wait", "(a) publish → the held check-in answered (`last_checkin`)", "{:.2f}"),
        ("answer_to_applied", "(b) answer → applied event", "{:.3f}"),
        ("download", "(b1) answer → downloaded (TUF + admission)", "{:.3f}"),
        ("live_apply", "(b2) downloaded → applied (reconcile + live update)", "{:.3f}"),
        ("paused_ms", "target paused by the update (ms)", "{:.3f}"),
    ]
    rows = "| publish, median over agents and rounds (p90) | |\n|---|---|\n"
    for key, label, fmt in parts:
        p = s["publish_parts"][key]
        rows += f"| {label} | {_s(p['median'], fmt)} ({_s(p['p90'], fmt)}) |\n"
    lines.append("Where a publish's time goes, from each agent's records:\n\n" + rows)
    per = "| # | change | delay before (s) | all three (s) | "
    per += " | ".join(f"{h} (s)" for h in HOSTS) + " |\n"
    per += "|---|---|---|---|" + "---|" * len(HOSTS) + "\n"
    every = ([("first", data["first"])] if data.get("first") else []) + [
        (str(i + 1), c) for i, c in enumerate(changes)
    ]
    for label, c in every:
        cells = [_s(c["agents"][h]["seconds"]) for h in HOSTS]
        per += (
            f"| {label} | {c['kind']} v{c['version']} | {_s(c['delay_before'])} | "
            f"**{_s(c['all_seconds'])}** | " + " | ".join(cells) + " |\n"
        )
    lines.append(
        'Every change ("first" is version 1: a fresh apply and the agents\' first TUF '
        "download, not in the figures above):\n\n" + per
    )
    if data.get("checkins"):
        lines.append(
            "Check-ins each agent made over the whole run (held ones included): "
            + ", ".join(f"{h} {n}" for h, n in data["checkins"].items())
            + f", for {len(changes) + 1} changes: each change answers a held check-in, the "
            "agent holds the next one; a hold that runs its course (the interval) is one more.\n"
        )
    notes = [
        f"{h} change {i + 1}: {c['agents'][h]['note']}"
        for i, c in enumerate(changes)
        for h in HOSTS
        if c["agents"][h].get("note")
    ]
    if notes:
        lines.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(lines)

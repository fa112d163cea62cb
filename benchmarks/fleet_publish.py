"""fleet_publish: publish → applied on all three real agents, in seconds (issue 9).

A real fleet on one machine, every part real: `micropatch server run` (SQLite, a
temporary data directory after the key ceremony, as benchmarks/server.py sets it
up) with `--checkin-interval CHECKIN`, an admin user and an operator user (whose
API token publishes); three hosts as in tests/integration/test_fleet_e2e.py
(tests/targets/fleet.py): each a PID and UTS namespace with its own `micropatch
agent run` (own state directory, socket, trust directory, agent.toml with
`checkin_interval = CHECKIN`), enrolled with a one-time token (`micropatch agent
enroll URL --token TOKEN`), and a target process, vuln_pie built from
tests/targets/ (vuln.c, vuln_fn.c, proto.c), whose copy_packet the patch guards
(the e2e test's GUARD: `call 65` answers -1 instead of -2).

Each agent's own agent.toml interval governs when it checks in (the agent prefers
it to the interval the server's answers carry); both are CHECKIN here, and the
server refuses less than 5 s. First the patch's version 1 is published once (a
fresh apply, TUF's first download on each agent: reported apart, not in the
median). Then ROUNDS rounds, each a new version (2, 3, ...), which the agents
update live in their targets:

1. wait a random delay, uniform in [0, CHECKIN) (seeded, recorded), so that the
   publish falls anywhere in each agent's check-in cycle;
2. `micropatch publish ARTIFACT --server URL --token OPERATOR`, timed from just
   before the command starts (its own duration is recorded too: a Python
   start, the upload, the server signing the TUF metadata);
3. every POLL s each agent's status over its socket (`AgentClient.status()`)
   until its target process carries the new version: publish → applied per
   agent, and on all three (the last of them) — the figure.

Each agent's applied time is split with its own records (wall clock, shared with
this process): (a) check-in wait, publish → the `last_checkin` of its status (set
when the check-in's answer arrived), bounded by CHECKIN plus the publish command
and a request (a check-in answered while the publish is in flight does not carry
it); (b)
answer → applied, `last_checkin` → the "updated" (or "applied") event of that
version in the target, itself split into download (TUF refresh and download,
admission with the trusted keys: the "downloaded ... from the fleet repository"
event) and live apply (reconcile and the update, whose pause the event carries).
After every round the targets are asked `call 65` (-1: the guard is in).

Server, agents, targets and this client share the machine (recorded: CPUs, load
average). Everything is stopped and removed at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import httpx

from benchmarks import peers, report
from benchmarks.server_run import BenchError, Server, key_ceremony, micropatch
from benchmarks.stats import median, summary

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from targets.fleet import (  # noqa: E402
    FleetAgent,
    Host,
    NsTarget,
    agent_config,
    available,
    build_vuln_pie,
    signed_guard,
)

NAME = "fleet_publish"
ROUNDS, QUICK_ROUNDS = 5, 2
CHECKIN = 5  # seconds: the server's --checkin-interval (its minimum) and agent.toml's
POLL = 0.02  # seconds between status polls of each agent
MARGIN = 60.0  # how long a round may take beyond one check-in before it is a failure
HOSTS = ("web-1", "web-2", "db-1")
PATCH_ID = "fleet-bench"
SEED = 9
PARTS = ("seconds", "checkin_wait", "answer_to_applied", "download", "live_apply", "paused_ms")


class Fleet:
    """The server, three hosts with an agent and a target each; `close` stops all."""

    def __init__(self, workdir: Path, checkin: int) -> None:
        self.workdir = workdir
        self.checkin = checkin
        self.hosts: list[Host] = []
        self.agents: list[FleetAgent] = []
        self.targets: list[NsTarget] = []
        data = key_ceremony(workdir)
        self.key = workdir / "keys" / "patches.key"
        public = workdir / "keys" / "patches.pub"
        root = data / "repository" / "public" / "metadata" / "1.root.json"
        self.module = build_vuln_pie(workdir / "targets")
        self.admin = micropatch("server", "admin", "create-user", "bench-admin",
                                "--role", "admin", "--data-dir", data).strip()  # fmt: skip
        self.operator = micropatch("server", "admin", "create-user", "bench-operator",
                                   "--role", "operator", "--data-dir", data).strip()  # fmt: skip
        self.server = Server(data, None, checkin_interval=checkin)
        try:
            self.server.start()
            for name in HOSTS:
                host = Host(workdir, name)
                self.hosts.append(host)
                self.targets.append(host.start(self.module))
                agent = FleetAgent(host, public, root, agent_config(checkin),
                                   command=peers._micropatch())  # fmt: skip
                self.agents.append(agent)
                agent.start()
                token = micropatch("server", "admin", "enrollment-token", "--data-dir", data)
                micropatch("agent", "enroll", self.server.url, "--token", token.strip(),
                           "--socket", agent.socket)  # fmt: skip
            deadline = time.monotonic() + checkin + MARGIN
            while not all(a.status()["fleet"]["last_checkin"] for a in self.agents):
                if time.monotonic() > deadline:
                    raise BenchError("an agent never checked in")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def hosts_on_server(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.server.url}/api/v1/hosts", timeout=30,
                      headers={"Authorization": f"Bearer {self.admin}"})  # fmt: skip
        r.raise_for_status()
        return list(r.json())

    def close(self) -> None:
        for a in self.agents:
            with contextlib.suppress(Exception):
                a.stop()
        for h in self.hosts:
            with contextlib.suppress(Exception):
                h.close()
        self.server.stop()


def _carried(status: dict[str, Any], pid: int) -> int | None:
    """The version of the patch the process `pid` carries, per the agent's status."""
    for c in status.get("processes", []):
        if c.get("pid") == pid:
            v = c.get("patches", {}).get(PATCH_ID)
            return int(v) if v is not None else None
    return None


def one_round(fleet: Fleet, version: int, delay: float) -> dict[str, Any]:
    """Publish `version`; time until every agent's target carries it."""
    artifact = signed_guard(fleet.workdir / "artifacts", fleet.module, fleet.key,
                            id=PATCH_ID, version=version)  # fmt: skip
    time.sleep(delay)
    start_wall, start = time.time(), time.monotonic()
    micropatch("publish", artifact, "--server", fleet.server.url, "--token", fleet.operator)
    cli = time.monotonic() - start
    seen: dict[str, tuple[float, float | None]] = {}  # host -> (seconds, last_checkin)
    deadline = start + fleet.checkin + MARGIN
    while len(seen) < len(fleet.agents):
        for agent, target in zip(fleet.agents, fleet.targets, strict=True):
            if agent.host.name in seen:
                continue
            status = agent.status()
            if _carried(status, target.pid) == version:
                seen[agent.host.name] = (
                    time.monotonic() - start,
                    (status.get("fleet") or {}).get("last_checkin"),
                )
        if time.monotonic() > deadline:
            missing = [a.host.name for a in fleet.agents if a.host.name not in seen]
            raise BenchError(f"v{version} not applied on {missing} after {deadline - start:.0f} s")
        if len(seen) < len(fleet.agents):
            time.sleep(POLL)
    agents = {}
    for agent, target in zip(fleet.agents, fleet.targets, strict=True):
        seconds, checkin = seen[agent.host.name]
        agents[agent.host.name] = split(agent, target, version, start_wall, seconds, checkin)
        answer = target.cmd("call 65")
        if answer != "-1":
            raise BenchError(f"{agent.host.name}: call 65 answered {answer} with v{version}")
    return {
        "version": version,
        "delay_before_publish": delay,
        "publish_cli_seconds": cli,
        "all_seconds": max(s for s, _ in seen.values()),
        "last_agent": max(seen, key=lambda n: seen[n][0]),
        "agents": agents,
    }


def split(
    agent: FleetAgent,
    target: NsTarget,
    version: int,
    start_wall: float,
    seconds: float,
    checkin: float | None,
) -> dict[str, Any]:
    """One agent's publish → applied, and its parts from the agent's own records."""
    events = agent.events(patch_id=PATCH_ID, since=start_wall)
    applied = [e for e in events if e["kind"] in ("applied", "updated")
               and e.get("version") == version and e.get("pid") == target.pid]  # fmt: skip
    downloaded = [e for e in events if e["kind"] == "agent" and e.get("version") == version
                  and str(e.get("message", "")).startswith("downloaded ")]  # fmt: skip
    out: dict[str, Any] = {
        "seconds": seconds,  # publish → seen applied in the agent's status (polled)
        "last_checkin": checkin,
        "checkin_wait": None,
        "answer_to_applied": None,
        "download": None,
        "live_apply": None,
        "event_seconds": None,
        "event_kind": None,
        "paused_ms": None,
        "note": "",
    }
    if not applied:
        out["note"] = "no applied/updated event of this version for the target"
        return out
    event = applied[0]
    out["event_kind"] = event["kind"]
    out["event_seconds"] = event["time"] - start_wall
    out["paused_ms"] = (event.get("data") or {}).get("paused_ms")
    if checkin is None or not start_wall <= checkin <= event["time"]:
        out["note"] = f"last_checkin {checkin} not between the publish and the apply"
        return out
    out["checkin_wait"] = checkin - start_wall
    out["answer_to_applied"] = event["time"] - checkin
    if downloaded:
        out["download"] = downloaded[0]["time"] - checkin
        out["live_apply"] = event["time"] - downloaded[0]["time"]
    return out


def measure(workdir: Path, rounds: int, checkin: int, seed: int, result: dict[str, Any]) -> None:
    """Into `result`, as they come (a failure keeps the rounds done)."""
    rng = random.Random(seed)
    print(f"fleet_publish: server, {len(HOSTS)} hosts, check-ins every {checkin} s",
          file=sys.stderr)  # fmt: skip
    result["rounds"] = []
    fleet = Fleet(workdir, checkin)
    try:
        print("fleet_publish: v1 (first publish)", file=sys.stderr)
        result["first"] = one_round(fleet, 1, rng.uniform(0, checkin))
        for i in range(rounds):
            version = 2 + i
            r = one_round(fleet, version, rng.uniform(0, checkin))
            print(f"fleet_publish: round {i + 1}/{rounds} (v{version}): "
                  f"{r['all_seconds']:.2f} s", file=sys.stderr)  # fmt: skip
            result["rounds"].append(r)
        result["hosts_on_server"] = len(fleet.hosts_on_server())
        result["agent_checkin_intervals"] = {
            a.host.name: (a.status().get("fleet") or {}).get("checkin_interval")
            for a in fleet.agents
        }
    finally:
        fleet.close()


def _s(x: float | None, fmt: str = "{:.2f}") -> str:
    return "?" if x is None or x != x else fmt.format(x)


def _values(rounds: list[dict[str, Any]], host: str | None, key: str) -> list[float]:
    out: list[float] = []
    for r in rounds:
        agents = r["agents"].values() if host is None else [r["agents"][host]]
        out.extend(a[key] for a in agents if a.get(key) is not None)
    return out


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    rounds = result["rounds"]
    per_agent = {}
    for host in HOSTS:
        per_agent[host] = {k: summary(_values(rounds, host, k)) for k in PARTS}
    return {
        "all_seconds": summary([r["all_seconds"] for r in rounds]),
        "publish_cli_seconds": summary([r["publish_cli_seconds"] for r in rounds]),
        "per_agent": per_agent,
        "every_agent": {k: summary(_values(rounds, None, k)) for k in PARTS},
        "phase_after_first": phases(rounds, result["checkin_interval"]),
    }


def phases(rounds: list[dict[str, Any]], interval: float) -> dict[str, float]:
    """Each host's check-in relative to the first host's, in (-interval/2, interval/2]
    (median over rounds): the agents' phases."""
    first, out = HOSTS[0], {}
    for host in HOSTS[1:]:
        offsets = []
        for r in rounds:
            a, b = r["agents"][first]["last_checkin"], r["agents"][host]["last_checkin"]
            if a is not None and b is not None:
                offsets.append(-((a - b + interval / 2) % interval - interval / 2))
        out[host] = median(offsets)
    return out


def markdown(data: dict[str, Any]) -> str:
    checkin = data["checkin_interval"]
    lines = [
        f"A real `micropatch server run` (SQLite, `--checkin-interval {checkin}`) and three "
        'real agents, each in its own PID+UTS namespace (a "host") with a vuln_pie target; '
        f"`micropatch publish` of a new version of the guard patch, then each agent's status "
        f"polled every {POLL * 1e3:.0f} ms until its target carries that version. "
        f"**Check-in interval: {checkin} s** — the agents' agent.toml `checkin_interval` "
        f"governs (an agent prefers it to the server's); the server's "
        f"`--checkin-interval` is {checkin} s too. Each publish comes after a random delay "
        f"in [0, {checkin}) s, so (a) samples the whole check-in cycle: it is at most one "
        "interval plus the `publish` command and a request (a check-in answered while the "
        "publish is in flight does not carry it).\n",
    ]
    if data.get("error"):
        lines.append(f"**Failed: {data['error']}**\n")
    if data.get("note"):
        lines.append(f"**{data['note']}**\n")
    rounds = data.get("rounds") or []
    if not rounds:
        return "\n".join(lines)
    s = data["summary"]
    a = s["all_seconds"]
    lines.append(
        f"**publish → applied on all three agents: median {_s(a['median'])} s** "
        f"(min {_s(a['min'])}, max {_s(a['max'])}; {a['n']} rounds, versions 2-"
        f"{1 + a['n']}, each a live update), with check-ins every {checkin} s.\n"
    )
    head = "| round | version | delay before (s) | `publish` CLI (s) | all three (s) | "
    head += " | ".join(f"{h} (s)" for h in HOSTS) + " |\n"
    head += "|---|---|---|---|---|" + "---|" * len(HOSTS) + "\n"
    body = ""
    every = ([("first", data["first"])] if data.get("first") else []) + [
        (str(i + 1), r) for i, r in enumerate(rounds)
    ]
    for label, r in every:
        cells = [_s(r["agents"][h]["seconds"]) for h in HOSTS]
        body += (
            f"| {label} | {r['version']} | {_s(r['delay_before_publish'])} | "
            f"{_s(r['publish_cli_seconds'])} | **{_s(r['all_seconds'])}** | "
            + " | ".join(cells)
            + " |\n"
        )
    median_cells = [_s(s["per_agent"][h]["seconds"]["median"]) for h in HOSTS]
    body += (
        f"| median of rounds | | | {_s(s['publish_cli_seconds']['median'])} | "
        f"**{_s(a['median'])}** | " + " | ".join(median_cells) + " |\n"
    )
    lines.append(
        "Per round (seconds from just before `micropatch publish` starts to the agent's "
        'status showing the version in its target; "first" is version 1, a fresh apply '
        "and the agents' first TUF download, not in the medians):\n\n" + head + body
    )
    parts = [
        ("checkin_wait", "(a) publish → check-in answer (`last_checkin`)", "{:.2f}"),
        ("answer_to_applied", "(b) check-in answer → applied event", "{:.3f}"),
        ("download", "(b1) answer → downloaded (TUF + admission)", "{:.3f}"),
        ("live_apply", "(b2) downloaded → applied (reconcile + live update)", "{:.3f}"),
        ("paused_ms", "target paused by the update (ms)", "{:.3f}"),
    ]
    table = "| median over rounds | " + " | ".join(HOSTS) + " | all agents (p90) |\n"
    table += "|---|" + "---|" * (len(HOSTS) + 1) + "\n"
    for key, label, fmt in parts:
        cells = [_s(s["per_agent"][h][key]["median"], fmt) for h in HOSTS]
        e = s["every_agent"][key]
        table += (
            f"| {label} | " + " | ".join(cells) + f" | {_s(e['median'], fmt)} "
            f"({_s(e['p90'], fmt)}) |\n"
        )
    lines.append(
        "Where the time goes, from each agent's records (its status's `last_checkin`, set "
        "when a check-in's answer arrives, and its events' times; seconds unless said):\n\n" + table
    )
    phase = s["phase_after_first"]
    offsets = ", ".join(f"{h} {v:+.2f} s" for h, v in phase.items() if v == v)
    spread = max([0.0, *phase.values()]) - min([0.0, *phase.values()])
    lines.append(
        f"The agents' check-ins are not independent: each checks in at enrollment, then "
        f"every {checkin} s plus the check-in's own time, so the enrollments (one after "
        f"the other) set their phases, which drift slowly. Relative to {HOSTS[0]}'s: "
        f'{offsets} (median over rounds; all three within {_s(spread)} s), so "all '
        "three\" is close to the last one's own wait. Agents with independent phases would "
        "make it longer on average (the mean of the largest of three uniform waits is 3/4 "
        "of an interval, of one wait 1/2).\n"
    )
    notes = [
        f"{h} round {i + 1}: {r['agents'][h]['note']}"
        for i, r in enumerate(rounds)
        for h in HOSTS
        if r["agents"][h].get("note")
    ]
    if notes:
        lines.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(lines)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"new versions published and timed (default {ROUNDS}, {QUICK_ROUNDS} with --quick)",
    )
    parser.add_argument(
        "--checkin-interval",
        type=int,
        default=CHECKIN,
        help=f"seconds, for the server and the agents (default {CHECKIN}, at least 5)",
    )
    parser.add_argument("--seed", type=int, default=SEED, help="for the delays before publishing")
    parser.add_argument("--note", default="", help="a remark written into the results")
    args = report.parse(parser, argv)
    if args.checkin_interval < 5:
        parser.error("--checkin-interval: the server's minimum is 5")
    if not available():
        print("fleet_publish: needs root, unshare and nsenter", file=sys.stderr)
        return 1
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    # SIGTERM (a timeout, a CI cancel) unwinds like ^C: the fleet is stopped either way.
    signal.signal(signal.SIGTERM, _interrupted)
    data: dict[str, Any] = {
        "checkin_interval": args.checkin_interval,
        "interval_governing": "agent.toml checkin_interval (the server's "
        "--checkin-interval is the same)",
        "poll_seconds": POLL,
        "seed": args.seed,
        "hosts": list(HOSTS),
        "patch_id": PATCH_ID,
        "note": args.note,
    }
    failed = False
    workdir = Path(tempfile.mkdtemp(prefix="micropatch-bench-fleet-"))
    try:
        measure(workdir, rounds, args.checkin_interval, args.seed, data)
    except Exception as e:
        traceback.print_exc()
        failed = True
        data["error"] = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if data.get("rounds"):
        data["summary"] = summarise(data)
    md = markdown(data)
    title = "fleet_publish: publish → applied on three real agents"
    _, md_path = report.write(NAME, args, argv, title, data, md)
    print(md_path.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

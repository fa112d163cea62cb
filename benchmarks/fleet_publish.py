"""fleet_publish: publish, policy change and revoke → seen on three real agents (17.8).

A real fleet on one machine, every part real (benchmarks/fleet.py): `micropatch
server run` (SQLite, its default check-in interval, 60 s) and three hosts as in
tests/integration/test_fleet_e2e.py, each a PID and UTS namespace with its own
`micropatch agent run` with the default agent.toml (so the server's interval, and
its held check-ins: docs/server.md, "Push") and a vuln_pie target whose
copy_packet the patch guards (`call 65` answers -1 instead of -2 with it).

First the patch's version 1 is published (a fresh apply, the agents' first TUF
download: reported apart). Then ROUNDS rounds of four changes, each after a random
delay uniform in [0, DELAY) s (seeded, recorded), each timed from just before it is
made until every agent's status (over its socket, polled every POLL s) shows its
effect in its target:

1. publish version v (`micropatch publish ARTIFACT --server URL --token OPERATOR`,
   the command's own start and upload included) → every target carries v (a live
   update); the time is split with the agent's records, as `benchmarks/fleet.split`
   says;
2. policy change: PUT /api/v1/policies/ with the patch disabled → removed from
   every target;
3. policy change: enabled again → v applied in every target;
4. revoke v (POST /api/v1/patches/ID/revoke) → v gone from every target (what
   follows, the newest version not revoked applied again, is not timed).

The aim: each change on all three agents within 5 s at the 95th percentile, with
the default configuration. Server, agents, targets and this client share the
machine (recorded: CPUs, load average). Everything is stopped and removed at the end.
"""

from __future__ import annotations

import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.fleet import HOSTS, PATCH_ID, Fleet, available, carried, signed_guard, split
from benchmarks.fleet_report import markdown, summarise
from benchmarks.server_run import BenchError, micropatch

NAME = "fleet_publish"
ROUNDS, QUICK_ROUNDS = 8, 2
DELAY = 5.0  # seconds: before each change, uniform in [0, DELAY)
POLL = 0.02  # seconds between status polls of each agent
LIMIT = 90.0  # seconds a change may take before it is a failure (past one interval)
SEED = 9
KINDS = ("publish", "disable", "enable", "revoke")


def observe(
    fleet: Fleet, start: float, done: Callable[[int | None], bool], what: str
) -> dict[str, tuple[float, float | None]]:
    """Poll every agent until `done(version carried)` holds for its target: per host,
    the seconds since `start` and its status's last_checkin."""
    seen: dict[str, tuple[float, float | None]] = {}
    while len(seen) < len(fleet.agents):
        for agent, target in zip(fleet.agents, fleet.targets, strict=True):
            if agent.host.name in seen:
                continue
            status = agent.status()
            if done(carried(status, target.pid)):
                seen[agent.host.name] = (
                    time.monotonic() - start,
                    (status.get("fleet") or {}).get("last_checkin"),
                )
        if time.monotonic() - start > LIMIT:
            missing = [a.host.name for a in fleet.agents if a.host.name not in seen]
            raise BenchError(f"{what}: not seen on {missing} after {LIMIT:.0f} s")
        if len(seen) < len(fleet.agents):
            time.sleep(POLL)
    return seen


def change(fleet: Fleet, kind: str, version: int, delay: float) -> dict[str, Any]:
    """Make one change of `kind` after `delay` s; how long until every agent shows it."""
    artifact = None
    if kind == "publish":
        artifact = signed_guard(fleet.workdir / "artifacts", fleet.module, fleet.key,
                                id=PATCH_ID, version=version)  # fmt: skip
    time.sleep(delay)
    start_wall, start = time.time(), time.monotonic()
    if kind == "publish":
        micropatch("publish", artifact, "--server", fleet.server.url, "--token", fleet.operator)
        expected: Callable[[int | None], bool] = lambda v: v == version  # noqa: E731
    elif kind in ("disable", "enable"):
        state = "disabled" if kind == "disable" else "enabled"
        fleet.api("PUT", "/policies/", json={"patches": {PATCH_ID: state}})
        expected = (lambda v: v is None) if kind == "disable" else (lambda v: v == version)
    else:
        fleet.api("POST", f"/patches/{PATCH_ID}/revoke", json={"version": version})
        expected = lambda v: v != version  # noqa: E731
    made = time.monotonic() - start
    seen = observe(fleet, start, expected, f"{kind} v{version}")
    agents: dict[str, Any] = {}
    for agent, target in zip(fleet.agents, fleet.targets, strict=True):
        seconds, checkin = seen[agent.host.name]
        if kind == "publish":
            agents[agent.host.name] = split(agent, target, version, start_wall, seconds, checkin)
        else:
            agents[agent.host.name] = {"seconds": seconds, "last_checkin": checkin}
        answer = target.cmd("call 65")  # after a revoke: v removed, an older one may follow
        if kind != "revoke" and answer != ("-2" if kind == "disable" else "-1"):
            raise BenchError(f"{agent.host.name}: call 65 answered {answer} after {kind}")
    return {
        "kind": kind,
        "version": version,
        "delay_before": delay,
        "made_seconds": made,  # the command or the request itself
        "all_seconds": max(s for s, _ in seen.values()),
        "agents": agents,
    }


def measure(workdir: Path, rounds: int, seed: int, result: dict[str, Any]) -> None:
    """Into `result`, as they come (a failure keeps the changes done)."""
    rng = random.Random(seed)
    print(f"fleet_publish: server, {len(HOSTS)} hosts, default configuration", file=sys.stderr)
    result["changes"] = []
    fleet = Fleet(workdir, None, "")
    try:
        result["checkin_interval"] = Fleet.fleet_status(fleet.agents[0]).get("checkin_interval")
        print("fleet_publish: v1 (first publish)", file=sys.stderr)
        result["first"] = change(fleet, "publish", 1, rng.uniform(0, DELAY))
        for i in range(rounds):
            version = 2 + i
            for kind in KINDS:
                c = change(fleet, kind, version, rng.uniform(0, DELAY))
                print(f"fleet_publish: round {i + 1}/{rounds} {kind} v{version}: "
                      f"{c['all_seconds']:.2f} s", file=sys.stderr)  # fmt: skip
                result["changes"].append(c)
        result["checkins"] = {
            a.host.name: Fleet.fleet_status(a).get("checkins") for a in fleet.agents
        }
    finally:
        fleet.close()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds of four changes (default {ROUNDS}, {QUICK_ROUNDS} with --quick)",
    )
    parser.add_argument("--seed", type=int, default=SEED, help="for the delays before changes")
    parser.add_argument("--note", default="", help="a remark written into the results")
    args = report.parse(parser, argv)
    if not available():
        print("fleet_publish: needs root, unshare and nsenter", file=sys.stderr)
        return 1
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    # SIGTERM (a timeout, a CI cancel) unwinds like ^C: the fleet is stopped either way.
    signal.signal(signal.SIGTERM, _interrupted)
    data: dict[str, Any] = {
        "configuration": "defaults: server --checkin-interval and agent.toml unset",
        "delay_before_each": DELAY,
        "poll_seconds": POLL,
        "seed": args.seed,
        "hosts": list(HOSTS),
        "patch_id": PATCH_ID,
        "note": args.note,
    }
    failed = False
    workdir = Path(tempfile.mkdtemp(prefix="micropatch-bench-fleet-"))
    try:
        measure(workdir, rounds, args.seed, data)
    except Exception as e:
        traceback.print_exc()
        failed = True
        data["error"] = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if data.get("changes"):
        data["summary"] = summarise(data, KINDS)
    md = markdown(data, KINDS)
    title = "fleet_publish: publish, policy change and revoke → applied on three real agents"
    _, md_path = report.write(NAME, args, argv, title, data, md)
    print(md_path.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

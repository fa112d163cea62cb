"""server: the fleet server under 10,000 checking-in agents, and events ingested per second.

A real server (`micropatch server run`, a temporary data directory after the key
ceremony — `repo init --online-targets` — on a free port), first on SQLite,
then on a throwaway PostgreSQL cluster (`.ci/postgres DIR PORT`, `--database
URL`), the same steps on each:

0. Setup: an admin user (`server admin create-user`), N one-time enrollment
   tokens through the admin API (POST /api/v1/enrollment-tokens, one request
   each, a few in flight), then N simulated agents enrolled (POST /enroll with
   each token). Both timed. Then each agent's first check-in, with its whole
   inventory (~30 modules with build-ids and SHA-256s: shared libraries common
   to the fleet plus the host's own; 5 processes, one with a patch applied),
   CONCURRENCY in flight: timed, as the cost of inventories sent whole.
1. Events ingested (before 2, on a server not yet loaded): check-ins carrying
   EVENT_BATCH (100) events each, closed loop with CONCURRENCY requests in
   flight, as fast as the server answers, for EVENT_SECONDS: events stored
   (the server's `events_accepted`) per second. Aim ≥ 1,000/s.
2. Check-in load: POST /api/v1/checkin at RATE per second (default 10,000
   agents every 60 s ≈ 167/s, whatever --agents is: with fewer agents each
   checks in more often) for SECONDS, the agents in turn, from one asyncio
   aiohttp client. Open loop: check-in i is due at start + i / RATE and its
   latency is measured from that due time, not from when it was sent, so a
   server that falls behind shows as latency, not as a lower rate. Each body is
   what the agent sends (agent/fleet.py): CHANGED of them carry a changed
   inventory, whole; the others its digest only (the server holds it); each
   0-2 events. Aim (issue 9): p99 < 100 ms with PostgreSQL, 0 errors.

The client and the server share the machine (recorded: CPUs, load average).
SQLite is served by one process, as `server run` starts it; PostgreSQL by
`server run --workers W` (default: one per CPU).

Publish → applied on three real agents is measured by benchmarks/fleet_publish.py.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import report, server_held
from benchmarks.server_report import markdown
from benchmarks.server_run import Server, key_ceremony, micropatch, postgres
from benchmarks.simagents import (
    CHANGED,
    CONCURRENCY,
    EVENT_BATCH,
    MODULES,
    PROCESSES,
    REQUEST_TIMEOUT,
    HttpErrors,
    _bounded,
    client,
    events,
    inventory,
    post,
    setup_agents,
    unchanged,
)
from benchmarks.stats import median, percentile

NAME = "server"
AGENTS = 10_000
QUICK_AGENTS = 200
RATE = 10_000 / 60.0  # check-ins per second: 10,000 agents every 60 s
SECONDS = 60.0
QUICK_SECONDS = 10.0
EVENT_SECONDS = 20.0
QUICK_EVENT_SECONDS = 5.0
CONNECTIONS = 100  # the check-in load client's connections


async def first_checkins(url: str, credentials: list[str]) -> dict[str, Any]:
    """Every agent's first check-in, with its whole inventory (as after enrolling),
    CONCURRENCY in flight, as fast as the server answers."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with client(url, CONCURRENCY) as c:

        async def one(agent: int) -> None:
            headers = {"Authorization": f"Bearer {credentials[agent]}"}
            sent = time.perf_counter()
            try:
                status, _ = await post(c, "/api/v1/checkin", inventory(agent), headers)
                reason = f"HTTP {status}"
                ok = status == 200
            except HttpErrors as e:
                ok, reason = False, type(e).__name__
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                errors[reason] = errors.get(reason, 0) + 1

        start = time.perf_counter()
        await _bounded(len(credentials), CONCURRENCY, one)
        elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "per_second": len(credentials) / elapsed,
        "p50": median(latencies),
        "p99": percentile(latencies, 99),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


async def checkin_load(
    url: str, credentials: list[str], rate: float, seconds: float
) -> dict[str, Any]:
    """Open loop: check-in i due at start + i/rate, latency from its due time. Each
    agent does what the real one does: its inventory changed (CHANGED of the
    check-ins): sent whole; otherwise its digest only."""
    rng = random.Random(9)
    total = int(rate * seconds)
    latencies: list[float] = []
    full: list[float] = []  # those that sent the inventory
    service: list[float] = []  # from the moment the request was sent (reference)
    errors: dict[str, int] = {}
    late_sends = 0
    events_sent = 0
    generations: dict[int, int] = {}
    async with client(url, CONNECTIONS) as c:
        # At most CONNECTIONS requests in flight; the others wait here (in the latency).
        gate = asyncio.Semaphore(CONNECTIONS)

        async def one(i: int, due: float) -> None:
            nonlocal events_sent
            agent = i % len(credentials)
            changed = rng.random() < CHANGED
            if changed:
                generations[agent] = generations.get(agent, 0) + 1
            generation = generations.get(agent, 0)
            body = inventory(agent, generation) if changed else unchanged(agent, generation)
            k = rng.choice((0, 0, 1, 2))
            events_sent += k
            content = json.dumps(body | {"events": events(k, rng)}).encode()
            headers = {"Authorization": f"Bearer {credentials[agent]}"}
            sent = time.perf_counter()
            try:
                async with gate:  # waiting here counts in the latency (from the due time)
                    status, answer = await post(c, "/api/v1/checkin", content, headers)
                ok = status == 200 and answer["events_accepted"] == k
                reason = f"HTTP {status}" if status != 200 else "events lost"
            except HttpErrors as e:
                ok, reason = False, type(e).__name__
            end = time.perf_counter()
            if ok:
                latencies.append(end - due)
                service.append(end - sent)
                if changed:
                    full.append(end - due)
            else:
                errors[reason] = errors.get(reason, 0) + 1

        tasks = []
        start = time.perf_counter() + 0.2
        for i in range(total):
            due = start + i / rate
            if time.perf_counter() > start + seconds + 5:  # the client itself fell behind
                errors["not sent (client behind)"] = total - i
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.01:
                late_sends += 1
            tasks.append(asyncio.create_task(one(i, due)))
        sent_end = time.perf_counter()
        # Every request has REQUEST_TIMEOUT; past that (and a margin) what is left is
        # cancelled and counted as an error: the run ends whatever the server does.
        _, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 15)
        for task in pending:
            task.cancel()
        if pending:
            errors["unfinished"] = len(pending)
        end = time.perf_counter()
    return {
        "rate_target": rate,
        "seconds": seconds,
        "checkins": total,
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "events_sent": events_sent,
        "rate_achieved": len(latencies) / (end - start),
        "connections": CONNECTIONS,
        "send_rate": total / (sent_end - start),
        "sent_more_than_10ms_late": late_sends,
        "drain_seconds": end - sent_end,
        "latency": {
            "p50": median(latencies),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
            "mean": sum(latencies) / len(latencies) if latencies else float("nan"),
        },
        "changed": CHANGED,
        "inventory_sent": len(full),
        "inventory_sent_p50": median(full),
        "inventory_sent_p99": percentile(full, 99),
        "service_time_p50": median(service),
        "service_time_p99": percentile(service, 99),
        "samples": [round(x, 6) for x in latencies],
    }


async def event_ingest(url: str, credentials: list[str], seconds: float) -> dict[str, Any]:
    """Closed loop, CONCURRENCY in flight: check-ins of EVENT_BATCH events each."""
    rng = random.Random(99)
    accepted = 0
    requests = 0
    errors: dict[str, int] = {}
    latencies: list[float] = []
    async with client(url, CONCURRENCY) as c:
        start = time.perf_counter()
        stop = start + seconds
        counter = iter(range(10**9))

        async def worker() -> None:
            nonlocal accepted, requests
            while time.perf_counter() < stop:
                agent = next(counter) % len(credentials)
                body = unchanged(agent) | {"events": events(EVENT_BATCH, rng)}
                headers = {"Authorization": f"Bearer {credentials[agent]}"}
                sent = time.perf_counter()
                try:
                    status, answer = await post(c, "/api/v1/checkin", body, headers)
                    if status == 200:
                        accepted += int(answer["events_accepted"])
                        requests += 1
                        latencies.append(time.perf_counter() - sent)
                    else:
                        errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
                except HttpErrors as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "batch": EVENT_BATCH,
        "concurrency": CONCURRENCY,
        "checkins": requests,
        "events_accepted": accepted,
        "events_per_second": accepted / elapsed,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "checkin_p50": median(latencies),
        "checkin_p99": percentile(latencies, 99),
    }


def measure(
    workdir: Path,
    database: str | None,
    n: int,
    rate: float,
    seconds: float,
    event_seconds: float,
    workers: int = 1,
) -> dict[str, Any]:
    data = key_ceremony(workdir)
    env = {"MICROPATCH_SERVER_DATABASE": database} if database else {}
    admin = micropatch("server", "admin", "create-user", "bench", "--role", "admin",
                       "--data-dir", data, env=env).strip()  # fmt: skip
    server = Server(data, database, workers=workers)
    result: dict[str, Any] = {"workers": workers}
    try:
        result["server_ready_seconds"] = server.start()
        print(f"server: {n} tokens and enrollments", file=sys.stderr)
        agents = asyncio.run(setup_agents(server.url, admin, n))
        credentials = agents.pop("credentials")
        result["setup"] = agents
        print(f"server: {n} first check-ins (whole inventories)", file=sys.stderr)
        result["first_checkins"] = asyncio.run(first_checkins(server.url, credentials))
        # Events first: a server the check-in load overwhelms goes on answering the
        # requests it queued long after the client gave up on them.
        print(f"server: events for {event_seconds:g} s", file=sys.stderr)
        result["events"] = asyncio.run(event_ingest(server.url, credentials, event_seconds))
        print(f"server: check-ins at {rate:.1f}/s for {seconds:g} s", file=sys.stderr)
        result["checkin"] = asyncio.run(checkin_load(server.url, credentials, rate, seconds))
        result["server_peak_rss_kib"] = server.rss_kib()
        print(f"server: {server_held.BURST} connections at once", file=sys.stderr)
        result["burst"] = asyncio.run(server_held.burst(server.url, credentials))
        print(f"server: {n} held check-ins, check-ins at {rate:.1f}/s beside", file=sys.stderr)
        result["held"] = asyncio.run(
            server_held.held_phase(
                server,
                admin,
                credentials,
                lambda: checkin_load(server.url, credentials, server_held.PROBE_RATE, seconds),
                rate,
            )
        )
        result["server_alive_at_end"] = server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()
        result["server_log_tail"] = server.tail()[-800:] if "error" in server.tail().lower() else ""
    return result


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument("--agents", type=int, default=None, help=f"default {AGENTS:,}")
    parser.add_argument(
        "--seconds", type=float, default=None, help=f"check-in load (default {SECONDS:g})"
    )
    parser.add_argument(
        "--rate", type=float, default=RATE, help=f"check-ins per second (default {RATE:.1f})"
    )
    parser.add_argument(
        "--event-seconds", type=float, default=None, help=f"default {EVENT_SECONDS:g}"
    )
    parser.add_argument(
        "--database",
        choices=("both", "sqlite", "postgresql"),
        default=None,
        help="default both (sqlite with --quick)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="server processes with PostgreSQL (`server run --workers`; default: one per "
        "CPU); SQLite is served by one",
    )
    parser.add_argument("--note", default="", help="a remark written into the results")
    args = report.parse(parser, argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: where a stuck run is
    n = args.agents or (QUICK_AGENTS if args.quick else AGENTS)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else SECONDS)
    event_seconds = args.event_seconds or (QUICK_EVENT_SECONDS if args.quick else EVENT_SECONDS)
    which = args.database or ("sqlite" if args.quick else "both")
    data: dict[str, Any] = {
        "agents": n,
        "rate": args.rate,
        "seconds": seconds,
        "event_seconds": event_seconds,
        "event_batch": EVENT_BATCH,
        "concurrency": CONCURRENCY,
        "modules_per_checkin": MODULES,
        "processes_per_checkin": PROCESSES,
        "note": args.note,
        "databases": {},
    }
    failed = False
    for db in ("sqlite", "postgresql"):
        if which not in (db, "both"):
            continue
        print(f"server: {db}", file=sys.stderr)
        workdir = Path(tempfile.mkdtemp(prefix="micropatch-bench-server-"))
        os.chmod(workdir, 0o755)  # the postgres user reaches its cluster below it
        try:
            if db == "sqlite":
                data["databases"][db] = measure(workdir, None, n, args.rate, seconds, event_seconds)
            else:
                with postgres(workdir) as url:
                    data["databases"][db] = measure(
                        workdir, url, n, args.rate, seconds, event_seconds, args.workers
                    )
        except Exception as e:
            traceback.print_exc()
            failed = True
            data["databases"][db] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    md = markdown(data)
    _, md_path = report.write(NAME, args, argv, "server: check-in load and event ingest", data, md)
    print(md_path.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

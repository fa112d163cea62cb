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
import contextlib
import faulthandler
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from benchmarks import peers, report
from benchmarks.stats import median, percentile

NAME = "server"
AGENTS = 10_000
QUICK_AGENTS = 200
RATE = 10_000 / 60.0  # check-ins per second: 10,000 agents every 60 s
SECONDS = 60.0
QUICK_SECONDS = 10.0
EVENT_SECONDS = 20.0
QUICK_EVENT_SECONDS = 5.0
EVENT_BATCH = 100
CONCURRENCY = 8  # requests in flight while enrolling and ingesting events
MODULES = 30
SHARED_MODULES = 24  # libraries every host maps; the rest are the host's own
PROCESSES = 5
CHANGED = 0.1  # of the check-ins under load, those whose inventory changed (sent whole)
P99_AIM = 0.100
EVENTS_AIM = 1000.0
READY_TIMEOUT = 120.0
REQUEST_TIMEOUT = 30.0
CONNECTIONS = 100  # the check-in load client's connections
ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The server could not be set up or measured."""


def micropatch(*args: object, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*peers._micropatch(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise BenchError(f"micropatch {' '.join(map(str, args[:3]))}: {done.stderr.strip()[-600:]}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def key_ceremony(workdir: Path) -> Path:
    """A data directory whose repository signs targets online (as the tests set it up)."""
    from micropatch.trust.keys import generate_key, write_key_pair

    keys = workdir / "keys"
    keys.mkdir()
    private, _ = write_key_pair(generate_key("patches"), keys / "patches")
    data = workdir / "data"
    micropatch(
        "repo", "init", data / "repository", "--offline-dir", workdir / "offline",
        "--root-keys", 1, "--root-threshold", 1, "--targets-key", private, "--online-targets",
    )  # fmt: skip
    return data


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (.ci/postgres); its URL."""
    directory = workdir / "pg"
    done = subprocess.run(
        [str(ROOT / ".ci/postgres"), str(directory), str(free_port())],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise BenchError(f".ci/postgres: {done.stderr.strip()[-600:]}")
    try:
        yield done.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(
            [str(ROOT / ".ci/postgres"), "stop", str(directory / "data")],
            capture_output=True,
            timeout=120,
        )


@dataclass
class Server:
    data: Path
    database: str | None
    workers: int = 1
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    log: Path = Path()
    checkin_interval: int = 60  # seconds, what the server tells its agents

    def start(self) -> float:
        port = free_port()
        self.log = self.data.parent / f"server-{port}.log"
        database = ["--database", self.database] if self.database else []
        if self.workers > 1:
            database += ["--workers", str(self.workers)]
        start = time.perf_counter()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*peers._micropatch(), "server", "run", "--data-dir", str(self.data),
                 "--listen", f"127.0.0.1:{port}",
                 "--checkin-interval", str(self.checkin_interval), *database],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        while time.perf_counter() - start < READY_TIMEOUT:
            with contextlib.suppress(httpx.HTTPError):  # every worker may not be up yet
                if httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200:
                    self.url = url
                    return time.perf_counter() - start
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"the server did not start: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def rss_kib(self) -> int | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- what an agent sends -------------------------------------------------------------


def _hex(seed: str, n: int) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:n]


SHARED = [
    {"name": f"lib{i}.so.1", "path": f"/usr/lib/x86_64-linux-gnu/lib{i}.so.1",
     "build_id": _hex(f"build{i}", 40), "sha256": _hex(f"file{i}", 64)}
    for i in range(SHARED_MODULES)
]  # fmt: skip


def inventory(agent: int, generation: int = 0) -> dict[str, Any]:
    """The host's modules and processes, and their digest; `generation` counts the
    changes (each moves the patched process to a new pid, as a restart does)."""
    own = [
        {"name": f"app{agent}-{j}", "path": f"/opt/app{j}/bin/app{agent}",
         "build_id": _hex(f"b{agent}-{j}", 40), "sha256": _hex(f"f{agent}-{j}", 64)}
        for j in range(MODULES - SHARED_MODULES)
    ]  # fmt: skip
    processes = [
        {"pid": 1000 + p + 10 * generation, "exe": f"/opt/app{p}/bin/app{agent}",
         "unit": f"app{p}.service",
         "user": "www-data",
         "patches": [{"patch_id": "fix-int", "version": 1, "state": "applied"}] if p == 0 else []}
        for p in range(PROCESSES)
    ]  # fmt: skip
    modules = SHARED + own
    digest = hashlib.sha256(json.dumps([modules, processes]).encode()).hexdigest()
    return {"hostname": f"bench-{agent}", "kernel": "6.18.0", "agent_version": "0.1",
            "modules": modules, "processes": processes, "inventory_digest": digest}  # fmt: skip


@functools.cache
def unchanged(agent: int, generation: int = 0) -> dict[str, Any]:
    """What an agent sends when the server holds its inventory: the digest only."""
    body = inventory(agent, generation)
    return {k: v for k, v in body.items() if k not in ("modules", "processes")}


KINDS = ["applied", "removed", "skipped", "agent"]


def events(n: int, rng: random.Random) -> list[dict[str, Any]]:
    base = time.time()
    return [
        {"kind": rng.choice(KINDS), "time": base + i * 1e-6, "pid": 1000 + i % PROCESSES,
         "exe": "/opt/app0/bin/app", "patch_id": "fix-int", "version": 1,
         "message": f"bench event {i}", "data": {"seq": i}}
        for i in range(n)
    ]  # fmt: skip


# --- the measurements ---------------------------------------------------------------


async def _bounded(n: int, concurrency: int, one: Any) -> list[Any]:
    results: list[Any] = [None] * n
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            results[i] = await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


# The load client is aiohttp: httpx cost the client about 3 ms of CPU per request on
# this machine (aiohttp 0.35 ms), as much as the server it shares the CPUs with.
HttpErrors = (aiohttp.ClientError, TimeoutError)


def client(url: str, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        url,
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    )


async def post(
    c: aiohttp.ClientSession, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST `body` (JSON, or bytes already encoded): the status and the JSON answered
    (the text if it is not JSON)."""
    if isinstance(body, bytes):
        headers = {**(headers or {}), "Content-Type": "application/json"}
        request = c.post(path, data=body, headers=headers)
    else:
        request = c.post(path, json=body, headers=headers)
    async with request as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def setup_agents(url: str, admin: str, n: int) -> dict[str, Any]:
    """n enrollment tokens through the admin API, then n enrolled agents."""
    async with client(url, CONCURRENCY) as c:
        auth = {"Authorization": f"Bearer {admin}"}

        async def token(_i: int) -> str:
            status, answer = await post(c, "/api/v1/enrollment-tokens", {}, auth)
            if status != 201:
                raise BenchError(f"enrollment-tokens: {status} {str(answer)[:300]}")
            return str(answer["token"])

        start = time.perf_counter()
        tokens = await _bounded(n, CONCURRENCY, token)
        token_seconds = time.perf_counter() - start

        async def enroll(i: int) -> str:
            body = {"token": tokens[i], "hostname": f"bench-{i}", "kernel": "6.18.0",
                    "agent_version": "0.1", "machine_id": _hex(f"m{i}", 32)}  # fmt: skip
            status, answer = await post(c, "/api/v1/enroll", body)
            if status != 201:
                raise BenchError(f"enroll: {status} {str(answer)[:300]}")
            return str(answer["credential"])

        start = time.perf_counter()
        credentials = await _bounded(n, CONCURRENCY, enroll)
        enroll_seconds = time.perf_counter() - start
    return {
        "credentials": credentials,
        "tokens_seconds": token_seconds,
        "tokens_per_second": n / token_seconds,
        "enroll_seconds": enroll_seconds,
        "enroll_per_second": n / enroll_seconds,
    }


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
        result["server_alive_at_end"] = server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()
        result["server_log_tail"] = server.tail()[-800:] if "error" in server.tail().lower() else ""
    return result


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
    aims.append(
        "- publish → applied on three real agents: see fleet_publish.md "
        "(`python -m benchmarks.fleet_publish`)"
    )
    lines.append("Aims (issue 9):\n\n" + "\n".join(aims) + "\n")
    return "\n".join(lines)


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

"""The server benchmark's connection phases (issue 17.1 and 17.8), on the server
`benchmarks/server.py` set up and enrolled its agents on:

- **500 connections at once**: 500 check-ins sent together on 500 connections
  (one in four with a bogus credential): every one answered (200, 401, or a fast
  503 past the requests at work), none left unanswered; health answering after.
- **Held check-ins**: every agent holds a check-in as the agent does (`wait` and the
  answer's `policy_digest`: server/push.py), the first ones sent at the fleet's
  check-in rate (spread over the interval, as in steady state), each re-sent when
  answered (after the answer's `after` seconds when it changed, as the agent does;
  after a failure, the agent's backoff: agent/fleet/backoff.py): the fleet's own
  check-ins. While they are held, a probe of PROBE_RATE check-ins a
  second without wait (server.py's check-in load) runs beside them (its p99, errors); the server's
  memory and file descriptors are read before and while they are held. Then the
  root group's policy changes, which changes every host's answer: how long until
  each held check-in is answered (the push), and the burst of check-ins after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.server_run import Server
from benchmarks.simagents import HttpErrors, post, unchanged
from benchmarks.stats import median, percentile
from micropatch.agent.fleet import backoff

BURST = 500  # connections at once
HOLD = 60  # the `wait` an agent sends: the server's check-in interval
WAKE_TIMEOUT = 60.0  # how long the push may take before the held ones count as not woken
PROBE_RATE = 10.0  # check-ins a second without wait, beside the held ones: their latency


async def burst(url: str, credentials: list[str], n: int = BURST) -> dict[str, Any]:
    """n check-ins at once, each on a connection of its own."""
    statuses: dict[str, int] = {}
    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=n + 10, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as c:

        async def one(i: int) -> None:
            secret = credentials[i % len(credentials)] if i % 4 else f"mph_bogus{i}"
            try:
                status, _ = await post(c, "/api/v1/checkin", unchanged(i % len(credentials)),
                                       {"Authorization": f"Bearer {secret}"})  # fmt: skip
                key = str(status)
            except HttpErrors as e:
                key = type(e).__name__
            statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
        seconds = time.perf_counter() - start
        health_start = time.perf_counter()
        async with c.get("/api/v1/health") as r:
            health = r.status
    answered = sum(v for k, v in statuses.items() if k.isdigit())
    return {
        "connections": n,
        "statuses": statuses,
        "answered": answered,
        "unanswered": n - answered,
        "seconds": seconds,
        "health_after": health,
        "health_seconds": time.perf_counter() - health_start,
    }


async def change_policy(url: str, admin: str) -> int:
    """The root group's default state disabled, on a connection of its own (not one
    of the pool the server may have closed while idle); its status."""
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=60)) as c:
        for attempt in range(3):
            try:
                async with c.put("/api/v1/policies/", json={"default_state": "disabled"},
                                 headers={"Authorization": f"Bearer {admin}"}) as r:  # fmt: skip
                    return r.status
            except HttpErrors:
                if attempt == 2:
                    raise
                await asyncio.sleep(1)
    return 0


async def _post(
    c: aiohttp.ClientSession, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, Any, float | None]:
    """A check-in: its status, its JSON, its Retry-After (seconds, or None)."""
    async with c.post("/api/v1/checkin", json=body, headers=headers) as r:
        text = await r.text()
        later = backoff.retry_after(r.headers.get("Retry-After"))
        try:
            return r.status, json.loads(text), later
        except ValueError:
            return r.status, text, later


def _detail(answer: Any) -> str:
    """What the server said of an error, its numbers masked: errors counted by cause."""
    detail = answer.get("detail") if isinstance(answer, dict) else answer
    return re.sub(r"[0-9]+", "N", str(detail))[:80]


def open_files(server: Server) -> int:
    """File descriptors the server's processes hold (their sockets among them)."""
    from benchmarks.server_run import children

    if server.proc is None:
        return 0
    total = 0
    for pid in (server.proc.pid, *children(server.proc.pid)):
        with contextlib.suppress(OSError):
            total += sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return total


async def held_phase(
    server: Server,
    admin: str,
    credentials: list[str],
    load: Callable[[], Awaitable[dict[str, Any]]],
    rate: float,
) -> dict[str, Any]:
    """Every agent holds a check-in, the first ones opened at `rate` a second (then
    they come back at that rate by themselves: the fleet's own check-ins); `load`
    (a probe of check-ins without wait) runs beside them; then a policy change
    answers them all."""
    url = server.url
    rng = random.Random(17)
    n = len(credentials)
    stop = asyncio.Event()
    woken_at: dict[int, float] = {}
    errors: dict[str, int] = {}
    resent = 0
    holding = 0
    # A connection per check-in, as the agent (urllib) makes: a pooled one that the
    # server closed while it idled (keep-alive, 5 s) would fail as ServerDisconnected.
    connector = aiohttp.TCPConnector(limit=n + 100, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=HOLD + 60)
    rss_before = server.rss_kib("VmRSS")
    files_before = open_files(server)

    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as c:
        # Each host's digest of the answer it holds: from a check-in without wait.
        status, first = await post(c, "/api/v1/checkin", unchanged(0),
                                   {"Authorization": f"Bearer {credentials[0]}"})  # fmt: skip
        if status != 200:
            raise RuntimeError(f"check-in: {status} {first}")
        start_digest = first["policy_digest"]

        async def agent(i: int, due: float) -> None:
            """One agent: its first check-in at `due` (the fleet's check-ins spread over
            the interval, as in steady state), then as the agent does: held, sent
            again when answered, after `after` when it changed; after a failure, the
            agent's backoff (agent/fleet/backoff.py: seconds after a 503)."""
            nonlocal resent, holding
            headers = {"Authorization": f"Bearer {credentials[i]}"}
            digest = start_digest
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            failures = busy = 0
            while not stop.is_set():
                body = unchanged(i) | {"wait": HOLD, "policy_digest": digest}
                holding += 1
                try:
                    status, answer, later = await _post(c, body, headers)
                except HttpErrors as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    status, answer, later = 0, None, None
                finally:
                    holding -= 1
                if status != 200:
                    if status:
                        key = f"HTTP {status}: {_detail(answer)}"
                        errors[key] = errors.get(key, 0) + 1
                    # The agent's backoff (agent/fleet/backoff.py): after a 503 with
                    # Retry-After, seconds; after any other failure, the interval doubled.
                    failures += 1
                    if status in backoff.BUSY and later is not None:
                        busy += 1
                        await asyncio.sleep(backoff.busy(later, busy, rng))
                    else:
                        busy = 0
                        await asyncio.sleep(backoff.failed(HOLD, failures, rng))
                    continue
                failures = busy = 0
                resent += 1
                if answer["policy_digest"] != digest:
                    digest = answer["policy_digest"]
                    if digest != start_digest:
                        woken_at.setdefault(i, time.perf_counter())
                    await asyncio.sleep(float(answer.get("after") or 0))  # as the agent does

        opening = time.perf_counter()
        agents = [asyncio.create_task(agent(i, opening + i / rate)) for i in range(n)]
        await asyncio.sleep(n / rate)
        while holding < n and time.perf_counter() - opening < n / rate + 60:
            await asyncio.sleep(0.1)
        opened_seconds = time.perf_counter() - opening
        await asyncio.sleep(2)
        held_files = open_files(server)
        rss_held = server.rss_kib("VmRSS")
        resent_before = resent
        load_start, cpu_start = time.perf_counter(), server.cpu_seconds()
        checkin = await load()
        load_seconds = time.perf_counter() - load_start
        resent_during_load = resent - resent_before
        load_cpu = server.cpu_seconds() - cpu_start
        rss_end_of_load = server.rss_kib("VmRSS")
        holding_before_change = holding

        # The push: the root group's default state changes every host's answer.
        changed, cpu_changed = time.perf_counter(), server.cpu_seconds()
        status = await change_policy(url, admin)
        if status != 200:
            errors[f"policy change: HTTP {status}"] = 1
        while len(woken_at) < n and time.perf_counter() - changed < WAKE_TIMEOUT:
            await asyncio.sleep(0.05)
        wake = [t - changed for t in woken_at.values()]
        wake_cpu = server.cpu_seconds() - cpu_changed
        stop.set()
        for task in agents:
            task.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
    return {
        "agents": n,
        "hold": HOLD,
        "opened_seconds": opened_seconds,
        "held_at_once": holding_before_change,
        "server_files_before": files_before,
        "server_files_held": held_files,
        "server_rss_kib_before": rss_before,
        "server_rss_kib_held": rss_held,
        "server_rss_kib_end_of_load": rss_end_of_load,
        "per_held_kib": (
            (rss_held - rss_before) / n if rss_held is not None and rss_before is not None else None
        ),
        "checkin": checkin,
        "resent_during_load": resent_during_load,
        "resent_per_second": resent_during_load / load_seconds,
        # Server CPU (user + system) per check-in answered while held ones came back
        # and the probe ran: less noisy than times on a shared machine.
        "load_cpu_seconds": load_cpu,
        "cpu_ms_per_checkin": (
            1000 * load_cpu / max(1, resent_during_load + checkin["ok"] + checkin["errors"])
        ),
        "wake_cpu_seconds": wake_cpu,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "woken": len(wake),
        "wake_p50": median(wake),
        "wake_p95": percentile(wake, 95),
        "wake_max": max(wake, default=float("nan")),
        "policy_change_status": status,
    }

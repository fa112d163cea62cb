"""Simulated agents for the server benchmarks: what an agent sends (its inventory,
its digest, events), and the asyncio HTTP client that sends it."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import time
from typing import Any

import aiohttp

from benchmarks.server_run import BenchError

CONCURRENCY = 8  # requests in flight while enrolling and ingesting events
MODULES = 30
SHARED_MODULES = 24  # libraries every host maps; the rest are the host's own
PROCESSES = 5
REQUEST_TIMEOUT = 30.0
EVENT_BATCH = 100  # events in a check-in of the event phase
CHANGED = 0.1  # of the check-ins under load, those whose inventory changed (sent whole)


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

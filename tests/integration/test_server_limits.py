"""The fleet server at and past its limits, for real (`micropatch server run`, SQLite, or
PostgreSQL with $MICROPATCH_TEST_POSTGRES):

- any number of requests at once is answered (the database is never waited for by
  one thread on behalf of another), and health answers right after;
- a body is refused while it is read, past its route's limit, before it is kept in
  memory (the server's RSS is read from /proc); a publish is authenticated before
  its body is read.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from unit.server.conftest import (  # noqa: F401 (fixtures)
    fresh_postgres,
    make_artifact,
    module,
    signing_key,
)

from .test_server import data_dir, database, micropatch  # noqa: F401 (fixtures)
from .test_server_faults import Running, enroll, running  # noqa: F401 (fixtures)

CONCURRENT = 128


def rss(server: Running) -> int:
    """The server process's resident memory, in bytes."""
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_any_number_of_requests_at_once_is_answered(running: Running) -> None:  # noqa: F811
    """128 requests at once, bogus credentials and valid ones mixed, on every kind of
    route (check-in, a read, a write, a console page): each gets its answer, and health
    answers at once afterwards. (Before, ~48 such requests left every request thread
    waiting for the database lock another thread's request held, for ever.)"""
    [credential] = enroll(running, 1)
    admin = micropatch("server", "admin", "create-user", "boss", "--role", "admin",
                       "--data-dir", running.data).stdout.strip()  # fmt: skip
    kinds = [
        ("POST", "/api/v1/checkin", credential, {}, 200),
        ("POST", "/api/v1/checkin", "mph_bogus", {}, 401),
        ("GET", "/api/v1/patches", admin, None, 200),
        ("GET", "/api/v1/patches", "mpu_bogus", None, 401),
        ("POST", "/api/v1/groups", admin, "group", 201),
        ("POST", "/api/v1/groups", "mpu_bogus", {"path": "/x"}, 401),
        ("GET", "/api/v1/hosts", "mph_bogus", None, 401),
        ("GET", "/console/hosts", None, None, 303),
    ]
    answered: list[tuple[int, int]] = []

    async def flood() -> None:
        limits = httpx.Limits(max_connections=CONCURRENT)
        async with httpx.AsyncClient(base_url=running.url, timeout=120, limits=limits) as c:

            async def one(i: int) -> None:
                method, path, secret, body, _ = kinds[i % len(kinds)]
                headers = {"Authorization": f"Bearer {secret}"} if secret else {}
                if body == "group":
                    body = {"path": f"/g{i}"}
                r = await c.request(method, path, json=body, headers=headers)
                answered.append((i, r.status_code))

            await asyncio.gather(*(one(i) for i in range(CONCURRENT)))

    start = time.monotonic()
    asyncio.run(asyncio.wait_for(flood(), timeout=180))
    took = time.monotonic() - start
    assert len(answered) == CONCURRENT
    wrong = [(i, status) for i, status in answered if status != kinds[i % len(kinds)][4]]
    assert not wrong, f"unexpected answers: {wrong}"
    start = time.monotonic()
    r = httpx.get(f"{running.url}/api/v1/health", timeout=5)
    assert r.status_code == 200 and time.monotonic() - start < 5
    print(f"{CONCURRENT} requests at once answered in {took:.1f} s")

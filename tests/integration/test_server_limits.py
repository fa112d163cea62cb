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


def post_raw(server: Running, path: str, total: int, *, declared: bool,
             token: str | None = None) -> tuple[int, str, int]:  # fmt: skip
    """POST `total` bytes to `path` through a plain socket, chunked or with a declared
    Content-Length, stopping once the server answers (it may close the connection
    before the end): (status, body, bytes sent)."""
    import select
    import socket

    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
            "Content-Type: application/json"]  # fmt: skip
    head.append(f"Content-Length: {total}" if declared else "Transfer-Encoding: chunked")
    if token:
        head.append(f"Authorization: Bearer {token}")
    chunk = b"[" + b"1," * (MIB // 2 - 1) + b"1"  # about 1 MiB of JSON-ish bytes
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            while sent < total and not select.select([s], [], [], 0)[0]:
                piece = chunk[: total - sent]
                s.sendall(piece if declared else b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 20:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2].decode(errors="replace"), sent


MIB = 1 << 20


def test_bodies_are_refused_while_read(running: Running) -> None:  # noqa: F811
    """100 MB to enroll (chunked, or declared) → 413, the server's memory grown by less
    than 64 MiB; a 100 MB publish without credentials → 401, its body unread; with
    them → 413 at once. The server answers normally after."""
    [credential] = enroll(running, 1)
    before = rss(running)
    for declared in (False, True):
        status, body, sent = post_raw(running, "/api/v1/enroll", 100 * MIB, declared=declared)
        assert status == 413 and "over 64 KiB" in body, (status, body)
        assert sent < 100 * MIB  # refused before the end
        status, body, _ = post_raw(running, "/api/v1/checkin", 100 * MIB, declared=declared,
                                   token=credential)  # fmt: skip
        assert status == 413 and "over 16 MiB" in body, (status, body)
    grown = rss(running) - before
    assert grown < 64 * MIB, f"the server grew by {grown >> 20} MiB"
    status, body, sent = post_raw(running, "/api/v1/patches", 100 * MIB, declared=True)
    assert status == 401, (status, body)
    admin = micropatch("server", "admin", "create-user", "pub", "--role", "operator",
                       "--data-dir", running.data).stdout.strip()  # fmt: skip
    status, body, sent = post_raw(running, "/api/v1/patches", 100 * MIB, declared=True,
                                  token=admin)  # fmt: skip
    assert status == 413 and "over 64 MiB" in body, (status, body)
    assert sent < 100 * MIB
    assert httpx.get(f"{running.url}/api/v1/health", timeout=10).status_code == 200

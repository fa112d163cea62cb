"""The fleet server stopped and killed under check-in load (`micropatch server run` for
real, SQLite, or PostgreSQL with $MICROPATCH_TEST_POSTGRES):

- SIGTERM ends it within its graceful-shutdown time however much work is queued;
- SIGKILL at any instant leaves every host whole: its stored inventory (modules,
  patched processes) and the digest stored with it come from one and the same
  check-in, and no event is half stored; restarted, it serves on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from unit.server.conftest import (  # noqa: F401 (fixtures)
    fresh_postgres,
    make_artifact,
    module,
    signing_key,
)

from micropatch.cli.server import GRACE
from micropatch.server.app import THREADS
from micropatch.server.database import database_url, make_engine

from .test_server import ENV, data_dir, database, free_port, micropatch  # noqa: F401 (fixtures)

HOSTS = 12


class Running:
    """`micropatch server run` on a free port, started and stopped by the test."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.workers = 1

    def start(self, **env: str) -> None:
        """Start it (with these environment variables too) and wait until it answers."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["micropatch", "server", "run", "--data-dir", self.data,
                 "--listen", f"127.0.0.1:{self.port}", "--workers", str(self.workers)],
                stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **ENV, **env},
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            time.sleep(0.1)
        pytest.fail("the server did not start: " + self.log.read_text()[-2000:])

    def stop(self, sig: int) -> float:
        """Send `sig`; the seconds until the process is gone."""
        assert self.process is not None
        start = time.monotonic()
        self.process.send_signal(sig)
        self.process.wait(timeout=120)
        return time.monotonic() - start


@pytest.fixture
def running(data_dir: Path) -> Iterator[Running]:  # noqa: F811
    server = Running(data_dir)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def enroll(server: Running, n: int) -> list[str]:
    admin = micropatch("server", "admin", "create-user", "root", "--role", "admin",
                       "--data-dir", server.data).stdout.strip()  # fmt: skip
    credentials = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for i in range(n):
            r = c.post("/api/v1/enrollment-tokens", json={},
                       headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
            r = c.post("/api/v1/enroll", json={"token": r.json()["token"], "hostname": f"h{i}"})
            assert r.status_code == 201, r.text
            credentials.append(r.json()["credential"])
    return credentials


def inventory(host: int, generation: int) -> dict[str, Any]:
    """Generation g of a host's inventory: its size and names tell g apart."""
    return {
        "inventory_digest": f"h{host}-g{generation}",
        "modules": [{"name": f"g{generation}-lib{n}.so", "sha256": f"{host:02x}{n:02x}" * 16}
                    for n in range(1 + generation % 7)],
        "processes": [{"pid": 1000 + generation * 10 + p,
                       "patches": [{"patch_id": f"g{generation}", "version": 1}]}
                      for p in range(1 + generation % 3)],
    }  # fmt: skip


def load(server: Running, credentials: list[str], stop: threading.Event, events: int) -> None:
    """Check-ins with changing inventories and `events` events each, one thread per
    host, until `stop` (or the server is gone)."""

    def host(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                body = inventory(i, rng.randrange(1000)) | {"events": [
                    {"kind": "blocked", "time": time.time() + n * 1e-6, "pid": 7,
                     "message": f"m{n}"} for n in range(events)
                ]}  # fmt: skip
                try:
                    c.post("/api/v1/checkin", json=body,
                           headers={"Authorization": f"Bearer {credentials[i]}"})  # fmt: skip
                except httpx.HTTPError:
                    if stop.wait(0.05):
                        return

    threads = [threading.Thread(target=host, args=(i,)) for i in range(len(credentials))]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=60)


def events_bodies(first: int, n: int) -> list[bytes]:
    """n check-in bodies of 2,000 events each never sent before (about 0.1 s of work a
    request on a quiet machine), encoded beforehand so that they are sent at once."""
    return [
        json.dumps({"events": [{"kind": "blocked", "time": i * 10_000.0 + e, "pid": 7,
                                "message": f"m{e}"} for e in range(2000)]}).encode()
        for i in range(first, first + n)
    ]  # fmt: skip


async def post_at_once(server: Running, credentials: list[str], bodies: list[bytes],
                       answered: list[int]) -> None:  # fmt: skip
    """Every body as a check-in at once; the status of each answer into `answered`."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:

        async def one(i: int, body: bytes) -> None:
            headers = {"Authorization": f"Bearer {credentials[i % len(credentials)]}",
                       "Content-Type": "application/json"}  # fmt: skip
            try:
                r = await c.post("/api/v1/checkin", content=body, headers=headers)
                answered.append(r.status_code)
            except httpx.HTTPError:
                pass

        await asyncio.gather(*(one(i, body) for i, body in enumerate(bodies)))


def test_sigterm_under_load_ends_within_the_grace_time(running: Running) -> None:
    """Hundreds of slow check-ins queued (2,000 events each, tens of seconds of work):
    stopped, the server gives the requests under way GRACE seconds, not the whole
    queue; those past its concurrency limit were refused at once (503)."""
    credentials = enroll(running, 4)
    # What finishing the requests under way costs on this machine now: as many at once
    # as the server has threads (after the grace those run to their end; the others
    # are cancelled). Measured in this run, as the stop is: a loaded machine slows both.
    batch: list[int] = []
    start = time.monotonic()
    asyncio.run(post_at_once(running, credentials, events_bodies(400, THREADS), batch))
    under_way = time.monotonic() - start
    assert batch == [200] * THREADS, batch

    answered: list[int] = []
    bodies = events_bodies(0, 400)
    flooding = threading.Thread(
        target=asyncio.run, args=(post_at_once(running, credentials, bodies, answered),)
    )
    flooding.start()
    # A 503 says the server holds LIMIT_CONCURRENCY connections: a queue of far more
    # than GRACE seconds of work.
    deadline = time.monotonic() + 120
    while 503 not in answered and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 503 in answered, f"the server never reached its concurrency limit: {answered}"
    took = running.stop(signal.SIGTERM)
    flooding.join(timeout=180)
    # The grace ran out with work queued (the log says so), and the stop took GRACE and
    # the time to finish the requests in threads and cancel the queue, not the queue's
    # time: 256 requests at work are 16 times `under_way`. Under load the part after
    # the grace grows with the machine (18.8 s seen with both CPUs also taken; 26 s past
    # GRACE at a load average of 18 with 2 CPUs, 1.3 to 2.3 times `under_way`), hence
    # a bound that grows with `under_way` too, and far from 16 times.
    assert "timeout graceful shutdown exceeded" in running.log.read_text()
    assert took < GRACE + max(25, 5 * under_way), f"{took:.1f} s to stop ({under_way:.1f})"
    # uvicorn ends by re-raising the signal: a clean stop, as systemd counts it.
    assert running.process is not None and running.process.returncode in (0, -signal.SIGTERM)
    seen = collections.Counter(answered)
    # Some were cut short by the stop (a 500, or the connection closed): without them
    # the test would prove nothing. Nothing they would have written is half written:
    # they waited for a thread, and the others' transactions ran to their end.
    assert seen[200] + seen[503] < 400, f"the load was answered before the stop: {seen}"


def test_sigkill_under_load_leaves_every_host_whole(running: Running) -> None:
    credentials = enroll(running, HOSTS)
    url = database_url(running.data, ENV.get("MICROPATCH_SERVER_DATABASE"))
    rng = random.Random(5)
    for _round in range(3):
        stop = threading.Event()
        loader = threading.Thread(target=load, args=(running, credentials, stop, 20))
        loader.start()
        time.sleep(rng.uniform(1.0, 2.5))
        running.stop(signal.SIGKILL)  # in the middle of check-ins, at no chosen point
        stop.set()
        loader.join(timeout=120)
        assert_whole(url)
        running.start()
    # It serves on: every host checks in, and its digest is the one answered back.
    with httpx.Client(base_url=running.url, timeout=60) as c:
        for i, credential in enumerate(credentials):
            r = c.post("/api/v1/checkin", json=inventory(i, 5000),
                       headers={"Authorization": f"Bearer {credential}"})  # fmt: skip
            assert r.status_code == 200 and r.json()["inventory_digest"] == f"h{i}-g5000"
    assert_whole(url)


def test_workers_see_a_change_at_the_next_check_in(data_dir: Path, make_artifact) -> None:  # noqa: F811
    """`server run --workers 2` (PostgreSQL): each process caches the policies and
    patches per policy revision; a publish, a policy change and a revocation made
    through one process are in the very next answer of every process."""
    url = ENV.get("MICROPATCH_SERVER_DATABASE")
    if not url:
        pytest.skip("--workers needs PostgreSQL: set MICROPATCH_TEST_POSTGRES=postgresql://…")
    from unit.server.test_api import module_of

    server = Running(data_dir)
    server.workers = 2
    server.start()
    try:
        [credential] = enroll(server, 1)
        operator = micropatch("server", "admin", "create-user", "ops", "--role", "operator",
                              "--data-dir", data_dir).stdout.strip()  # fmt: skip
        ops = {"Authorization": f"Bearer {operator}"}
        data = make_artifact("fix-w", 1)
        body = {"inventory_digest": "d", "modules": [module_of(data)]}

        def states() -> set[tuple[str, str]]:
            """What every server process answers to a check-in (they must agree): new
            connections until each process has answered at least twice (which one
            answered: the one holding the server's end of the connection, from /proc)."""
            workers = worker_pids(server)
            assert len(workers) == 2, f"server processes: {workers}"
            answers: dict[int, list[set[tuple[str, str]]]] = {pid: [] for pid in workers}
            for _ in range(400):
                if all(len(a) >= 2 for a in answers.values()):
                    break
                with httpx.Client(timeout=60) as c:  # one connection: open until the end
                    r = c.post(f"{server.url}/api/v1/checkin", json=body,
                               headers={"Authorization": f"Bearer {credential}"})  # fmt: skip
                    assert r.status_code == 200, r.text
                    pid = answered_by(r, server.port, workers)
                seen = {(p["patch_id"], p["state"]) for p in r.json()["patches"]}
                answers[pid].append(
                    seen | {(p["patch_id"], "revoked") for p in r.json()["revoked"]}
                )
            else:
                pytest.fail(f"400 check-ins did not reach every process: {answers}")
            distinct = {frozenset(a) for pid in answers for a in answers[pid]}
            assert len(distinct) == 1, f"the processes disagree: {answers}"
            return set(distinct.pop())

        assert states() == set()  # every process has built its catalogue
        r = httpx.post(f"{server.url}/api/v1/patches", content=data, headers=ops, timeout=60)
        assert r.status_code == 201, r.text
        assert states() == {("fix-w", "enabled")}
        r = httpx.put(f"{server.url}/api/v1/policies/", headers=ops, timeout=60,
                      json={"default_state": "enabled", "patches": {"fix-w": "disabled"}})  # fmt: skip
        assert r.status_code == 200, r.text
        assert states() == {("fix-w", "disabled")}
        r = httpx.post(f"{server.url}/api/v1/patches/fix-w/revoke", json={}, headers=ops)
        assert r.status_code == 200, r.text
        assert states() == {("fix-w", "revoked")}
        assert server.stop(signal.SIGTERM) < GRACE + 8  # every process stops
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def worker_pids(server: Running) -> set[int]:
    """The processes of `server run --workers N` that serve requests (its children)."""
    assert server.process is not None
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    pids = {int(pid) for pid in children.read_text().split()}
    # multiprocessing may start its resource tracker beside the workers
    return {p for p in pids if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()}


def answered_by(response: httpx.Response, port: int, workers: set[int]) -> int:
    """The process of `workers` that holds the server's end of the (still open)
    connection `response` came on: its socket inode in /proc/net/tcp, then the
    process with a file descriptor on that inode."""
    _, client_port = response.extensions["network_stream"].get_extra_info("client_addr")
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
        if (local, remote) == (port, client_port):
            inodes.add(f"socket:[{fields[9]}]")
    holders = set()
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    holders.add(pid)
    assert len(holders) == 1, f"connection from port {client_port}: held by {holders}"
    return holders.pop()


def assert_whole(url: str) -> None:
    """Every host's rows are those of the inventory its stored digest names; every
    event batch is stored whole (20 events per check-in)."""
    engine = make_engine(url)
    try:
        with engine.connect() as db:
            if url.startswith("sqlite"):
                assert db.execute(text("PRAGMA integrity_check")).scalar() == "ok"
            hosts = db.execute(text("SELECT id, name, inventory_digest FROM hosts")).all()
            checked = 0
            for host_id, name, digest in hosts:
                if digest is None:
                    continue  # killed before its first check-in was committed
                host = int(name.removeprefix("h"))
                generation = int(digest.rsplit("-g", 1)[1])
                want = inventory(host, generation)
                modules = db.execute(
                    text("SELECT name FROM host_modules WHERE host_id = :h"), {"h": host_id}
                ).scalars()
                assert sorted(modules) == sorted(m["name"] for m in want["modules"]), digest
                pids = db.execute(
                    text("SELECT pid, patch_id FROM process_patches WHERE host_id = :h"),
                    {"h": host_id},
                ).all()
                assert sorted(pids) == sorted(
                    (p["pid"], f"g{generation}") for p in want["processes"]
                ), digest
                checked += 1
            assert checked >= HOSTS // 2, "too few check-ins got through to prove anything"
            sizes = db.execute(
                text("SELECT received, host_id, COUNT(*) FROM events GROUP BY received, host_id")
            ).all()
            assert sizes and {n for _, _, n in sizes} == {20}, "an event batch half stored"
    finally:
        engine.dispose()


def test_workers_die_with_their_parent(data_dir: Path) -> None:  # noqa: F811
    """`server run --workers 2` killed by SIGKILL: its workers die too (PR_SET_PDEATHSIG)
    and the port is free again at once, for a new server."""
    if not ENV.get("MICROPATCH_SERVER_DATABASE"):
        pytest.skip("--workers needs PostgreSQL: set MICROPATCH_TEST_POSTGRES=postgresql://…")
    server = Running(data_dir)
    server.workers = 2
    server.start()
    assert server.process is not None
    children = [int(p) for p in
                Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
                .read_text().split()]  # fmt: skip
    workers = [pid for pid in children
               if "app_from_environment" in _cmdline(pid) or "multiprocessing" in _cmdline(pid)]  # fmt: skip
    assert workers, children
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their parent"
        time.sleep(0.1)
    with socket.socket() as s:  # the port is free: nobody listens on it any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
    server.workers = 1
    server.start()  # a new server on the same port
    assert httpx.get(f"{server.url}/api/v1/health", timeout=10).status_code == 200
    server.process.kill()
    server.process.wait()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"

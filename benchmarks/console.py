"""console: the web console's pages on a 10,000-host fleet (issue 17.6).

A server (`create_app`, SQLite, a temporary data directory after the key ceremony)
whose database is filled directly (bulk inserts, not check-ins: the pages are what
is measured): HOSTS hosts in 20 groups, each with MODULES loaded modules drawn from
a pool of 300 identities (build-id and SHA-256); 10 patch ids with 2 versions each,
targeting 10 of those identities, enabled at the root and disabled in one group;
for each host and relevant patch, a process carrying the newest version (60%), the
older one (20%) or nothing (20%).

Each page is fetched ROUNDS times through FastAPI's TestClient (in process, no
network) with an admin's session cookie, after one warm-up: the dashboard (counts
of hosts online/stale/offline and vulnerable/outdated/protected, computed by the
database), the hosts list (first page, then filtered to vulnerable hosts, then a
name search sorted by last check-in), a host, the patches page (per-patch
compliance), the events page and the audit log. Medians and p90 in milliseconds.
Aim: every page under 1 s at 10,000 hosts.

    python -m benchmarks.console [--hosts N] [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import summary

RESULTS = Path(__file__).resolve().parent / "results"
MODULES = 40
POOL = 300
PATCHES = 10


def _seed(server: Any, hosts: int, rng: random.Random) -> dict[str, int]:
    from sqlalchemy import insert

    from micropatch.server import models as m
    from micropatch.server.fleet import groups

    now = time.time()
    identities = [(f"lib{i}.so", f"{i:040x}", f"{i:064x}") for i in range(POOL)]
    with server.database.session() as session:
        paths = ["/"] + [f"/g{i}" for i in range(19)]
        for path in paths[1:]:
            groups.create_group(session, path, None, "bench")
        ids = {g.path: g.id for g in session.query(m.Group)}
        root = session.query(m.Group).filter(m.Group.path == "/").one()
        for n in range(PATCHES):
            session.add(m.GroupPatchState(group_id=root.id, patch_id=f"fix-{n}", state="enabled"))
        session.add(m.GroupPatchState(group_id=ids["/g0"], patch_id="fix-0", state="disabled"))
        for n in range(PATCHES):
            name, build_id, sha = identities[n]
            for version in (1, 2):
                session.add(m.Patch(
                    patch_id=f"fix-{n}", version=version, artifact_id=f"{n:032x}{version:032x}",
                    title=f"fix {n}", module_name=name, module_build_id=build_id,
                    module_sha256=sha, target=f"fix-{n}-{version}", size=1000, published=now,
                    published_by="bench",
                ))  # fmt: skip
        session.flush()
        host_rows = [
            dict(name=f"host-{i:05d}", group_id=ids[paths[i % len(paths)]],
                 credential_hash=f"{i:064x}", enrolled=now - 86400,
                 last_seen=now - rng.choice((10, 30, 600, 7200)), kernel="6.18.0",
                 agent_version="0.1.0")
            for i in range(hosts)
        ]  # fmt: skip
        session.execute(insert(m.Host), host_rows)
        host_ids = [h for (h,) in session.query(m.Host.id)]
        modules, processes = [], []
        for host_id in host_ids:
            for k in rng.sample(range(POOL), MODULES):
                name, build_id, sha = identities[k]
                modules.append(dict(host_id=host_id, name=name, path=f"/usr/lib/{name}",
                                    build_id=build_id, sha256=sha))  # fmt: skip
                if k < PATCHES:
                    roll = rng.random()
                    if roll < 0.8:
                        processes.append(dict(host_id=host_id, pid=1000 + k, exe="/usr/bin/x",
                                              patch_id=f"fix-{k}", version=2 if roll < 0.6 else 1,
                                              state="applied"))  # fmt: skip
        session.execute(insert(m.HostModule), modules)
        session.execute(insert(m.ProcessPatch), processes)
        events = [dict(host_id=host_ids[i % len(host_ids)], kind="blocked", time=now - i,
                       received=now - i, pid=1, message="", data={"count": 1})
                  for i in range(5000)]  # fmt: skip
        session.execute(insert(m.Event), events)
    return {"hosts": hosts, "modules": len(modules), "processes": len(processes)}


def run(hosts: int, rounds: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from micropatch.server.app import create_app
    from micropatch.server.ceremony import init_repository
    from micropatch.server.context import Server, Settings
    from micropatch.server.fleet import users
    from micropatch.trust.keys import generate_key

    rng = random.Random(17)
    with tempfile.TemporaryDirectory(prefix="mp-console-bench-") as tmp:
        data = Path(tmp) / "data"
        init_repository(data / "repository", offline_dir=Path(tmp) / "offline", root_keys=1,
                        root_threshold=1, targets_keys=[generate_key("t")],
                        online_targets=True)  # fmt: skip
        settings = Settings(data_dir=data, repository_url="http://repo.invalid/r")
        server = Server(settings)
        app = create_app(settings, server=server)
        started = time.perf_counter()
        sizes = _seed(server, hosts, rng)
        seed_s = time.perf_counter() - started
        with server.database.session() as session:
            user, _ = users.create_user(session, server.passwords, "ada", "admin", None, "bench")
            secret = users.issue_token(session, user, "console", ttl=3600)
        client = TestClient(app, cookies={"mp_session": secret})
        pages = {
            "dashboard": "/console/",
            "hosts": "/console/hosts",
            "hosts vulnerable": "/console/hosts?state=vulnerable",
            "hosts search, by last check-in": "/console/hosts?q=host-01&sort=last_seen&order=desc",
            "host": f"/console/hosts/{hosts // 2}",
            "patches": "/console/patches",
            "events": "/console/events",
            "audit": "/console/audit",
        }
        results: dict[str, Any] = {}
        for name, url in pages.items():
            first = client.get(url)
            assert first.status_code == 200, (url, first.status_code, first.text[:300])
            samples = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                r = client.get(url)
                samples.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200
            results[name] = {"url": url, "bytes": len(first.content), **summary(samples),
                             "samples": samples}  # fmt: skip
        dashboard = client.get("/console/").text
        server.database.dispose()
    return {"sizes": sizes, "seed_s": seed_s, "pages": results,
            "dashboard_excerpt": dashboard[dashboard.find('id="compliance"'):][:600]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="1,000 hosts, 5 rounds")
    args = parser.parse_args()
    hosts, rounds = (1000, 5) if args.quick else (args.hosts, args.rounds)
    out = run(hosts, rounds)
    command = "python -m benchmarks.console" + (" --quick" if args.quick else
                                                f" --hosts {hosts} --rounds {rounds}")  # fmt: skip
    machine = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    target = RESULTS / ("quick" if args.quick else "")
    target.mkdir(parents=True, exist_ok=True)
    (target / "console.json").write_text(
        json.dumps({"command": command, "machine": machine, **out}, indent=1)
    )
    lines = [
        "# console: pages at a fleet's size", "",
        f"Command: `{command}`  ", f"Machine: {machine['cpus']} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in machine['load'])} (shared with other builds and tests)  ",
        f"Fleet: {out['sizes']['hosts']:,} hosts, {out['sizes']['modules']:,} loaded modules, "
        f"{out['sizes']['processes']:,} patched processes, 10 patches x 2 versions, 5,000 "
        f"events (seeded in {out['seed_s']:.0f} s)", "",
        "| page | URL | median ms | p90 ms | max ms | KiB |", "|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, r in out["pages"].items():
        lines.append(f"| {name} | `{r['url']}` | {r['median']:.0f} | {r['p90']:.0f} | "
                     f"{r['max']:.0f} | {r['bytes'] / 1024:.0f} |")  # fmt: skip
    worst = max(r["median"] for r in out["pages"].values())
    lines += ["", f"Aim: every page under 1,000 ms: {'met' if worst < 1000 else 'missed'} "
              f"(slowest median {worst:.0f} ms)."]  # fmt: skip
    (target / "console.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

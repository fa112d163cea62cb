"""What a check-in sends (docs/agent.md, "Fleet"): the host's inventory (the
executable modules its processes map; the applied state of the processes the
policy covers, for the patches of the agent's store), its digest, and the
events since the last check-in.

Each item is checked on its own against the limits of the server's schema
(`server/schemas.py`; `tests/unit/agent/test_fleet_report.py` holds the two
together) before it is sent: a string too long is cut, a NUL replaced, a number
out of range left out; an item that cannot be made valid is dropped, and said
once, so that one bad item never costs the rest of a check-in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from micropatch.agent.events import KINDS
from micropatch.agent.policy import PolicyView, covers
from micropatch.errors import MicropatchError
from micropatch.patch.model import VERSION_MAX
from micropatch.process.select import ProcessInfo

if TYPE_CHECKING:
    from micropatch.agent.covered import Covered
    from micropatch.agent.db import Database

MAX_MODULES = 5000  # modules in one inventory
IDENTIFY_BUDGET = 2.0  # seconds of hashing new module files per inventory scan
EVENT_BATCH = 1000  # events per check-in (more wait for the next one, sent at once)
PID_MAX = 2**31 - 1  # pid_t
PATCHES_PER_PROCESS = 1000
# The events that concern the store and the policy themselves (a revocation, a drop,
# a rejection): sent even once their patch has left the store.
LIFECYCLE = frozenset({"agent", "disabled", "rejected"})
_HEX = re.compile(r"[0-9a-f]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def text(value: Any, limit: int) -> str | None:
    """A string as the server takes it: at most `limit` characters, no NUL; None
    for None or an empty string."""
    if value is None or value == "":
        return None
    return str(value).replace("\x00", "\ufffd")[:limit]


def number(value: Any, low: int, high: int) -> int | None:
    """An int within [low, high], else None (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def module_item(m: dict[str, Any]) -> dict[str, Any] | None:
    """A module of the inventory, or None if it cannot be sent (no name, no SHA-256)."""
    sha256 = m.get("sha256")
    name = text(m.get("name"), 255)
    if name is None or not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        return None
    build_id = m.get("build_id")
    if not isinstance(build_id, str) or len(build_id) > 128 or not _HEX.fullmatch(build_id):
        build_id = None
    return {"name": name, "path": text(m.get("path"), 1024), "build_id": build_id,
            "sha256": sha256}  # fmt: skip


def process_item(p: dict[str, Any]) -> dict[str, Any] | None:
    """A process and what it carries, or None if nothing of it can be sent."""
    pid = number(p.get("pid"), 1, PID_MAX)
    patches = []
    for applied in p.get("patches", [])[:PATCHES_PER_PROCESS]:
        patch_id = text(applied.get("patch_id"), 128)
        version = number(applied.get("version"), 0, VERSION_MAX)
        if patch_id is not None and version is not None:
            patches.append({"patch_id": patch_id, "version": version,
                            "state": text(applied.get("state"), 16) or "applied"})  # fmt: skip
    if pid is None or not patches:
        return None
    return {"pid": pid, "exe": text(p.get("exe"), 1024), "unit": text(p.get("unit"), 255),
            "user": text(p.get("user"), 64), "patches": patches}  # fmt: skip


def event_item(e: dict[str, Any]) -> dict[str, Any] | None:
    """An event of the history as the server takes it, or None (an unknown kind, no
    time)."""
    when = e.get("time")
    if e.get("kind") not in KINDS or not isinstance(when, int | float) or not math.isfinite(when):
        return None
    data = e.get("data")
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError):
        data = {"value": repr(data)[:1024]}
    return {
        "kind": e["kind"], "time": float(when), "pid": number(e.get("pid"), 1, PID_MAX),
        "exe": text(e.get("exe"), 1024), "patch_id": text(e.get("patch_id"), 128),
        "version": number(e.get("version"), 0, VERSION_MAX),
        "module": text(e.get("module"), 255), "message": text(e.get("message"), 4096) or "",
        "data": data if isinstance(data, dict) else {"value": data},
    }  # fmt: skip


def inventory_digest(modules: list[dict[str, Any]], processes: list[dict[str, Any]]) -> str:
    """A digest of the inventory, whatever order the scan found it in: the check-in
    sends the inventory itself only when the server does not hold this digest."""
    canonical = json.dumps(
        [sorted(modules, key=lambda x: json.dumps(x, sort_keys=True)), processes],
        sort_keys=True, separators=(",", ":"),
    )  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def processes(
    covered: Iterable[Covered], stored: Iterable[str], view: PolicyView
) -> list[dict[str, Any]]:
    """The applied state the fleet may know: per process the policy covers, the
    patches of the store it carries (not those applied by hand from elsewhere)."""
    from micropatch.process.select import read_info

    store = set(stored)
    out = []
    for c in sorted(covered, key=lambda c: c.pid):
        mine = {p: v for p, v in c.patches.items() if p in store}
        if not mine:
            continue
        try:
            info = read_info(c.pid)
        except (MicropatchError, OSError):
            continue  # gone: not running any more
        mine = {p: v for p, v in mine.items() if covers(p, info, view)}
        item = process_item({
            "pid": c.pid, "exe": c.exe, "unit": info.unit, "user": str(info.uid),
            "patches": [{"patch_id": p, "version": v, "state": "applied"}
                        for p, v in sorted(mine.items())],
        })  # fmt: skip
        if item is not None:
            out.append(item)
    return out


def events(
    db: Database, cursor: int, stored: Iterable[str], view: PolicyView
) -> tuple[list[dict[str, Any]], int, int]:
    """The events after `cursor` the fleet may know, at most EVENT_BATCH of them;
    the new cursor (past those left out too); how many could not be sent at all.

    Left out: events about patches not in the store (applied by hand from another
    artifact; what the store and policy went through is sent whatever became of
    the patch), and blocked attempts in a process the policy excludes from the
    patch (judged on the process now, or on its executable once it is gone)."""
    from micropatch.process.select import read_info

    store = set(stored)
    rows = db.rows("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (cursor, EVENT_BATCH))
    infos: dict[int, ProcessInfo] = {}
    out, bad = [], 0
    for r in rows:
        cursor = max(cursor, int(r["id"]))
        patch_id, pid = r["patch_id"], r["pid"]
        if patch_id and r["kind"] not in LIFECYCLE:
            if patch_id not in store:
                continue  # a patch applied by hand from elsewhere: not the fleet's
            if r["kind"] == "blocked" and pid and pid > 0:
                if pid not in infos:
                    try:
                        infos[pid] = read_info(pid)
                    except (MicropatchError, OSError):
                        infos[pid] = ProcessInfo(pid, r["exe"] or "", -1, "", None)
                if not covers(patch_id, infos[pid], view):
                    continue  # a process the policy excludes from this patch
        try:
            data = json.loads(r["data"])
        except ValueError:
            data = {}
        item = event_item({**dict(r), "data": data})
        if item is None:
            bad += 1
        else:
            out.append(item)
    return out, cursor, bad


class Inventory:
    """The executable modules mapped by the host's processes, identified once per file
    version (device, inode, size, mtime): later scans read only /proc/PID/maps."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, int], tuple[str | None, str]] = {}

    def scan(self) -> list[dict[str, Any]]:
        from micropatch.elf.identity import identify
        from micropatch.process.maps import read_maps
        from micropatch.process.select import all_pids

        found: dict[tuple[str, int], dict[str, Any]] = {}
        budget = time.monotonic() + IDENTIFY_BUDGET
        for pid in all_pids():
            try:
                mappings = read_maps(pid)
            except (MicropatchError, OSError):
                continue
            for m in mappings:
                if "x" not in m.perms or not m.inode or not m.path.startswith("/"):
                    continue
                if m.path.startswith("/memfd:") or (m.dev, m.inode) in found:
                    continue
                if len(found) >= MAX_MODULES:
                    break
                path = m.path.removesuffix(" (deleted)")
                try:
                    with open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", "rb") as f:
                        st = os.fstat(f.fileno())
                        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                        known = self._known.get(key)
                        if known is None:
                            if time.monotonic() > budget:
                                continue  # the next scan identifies it
                            identity = identify(f)
                            known = self._known[key] = (identity.build_id, identity.sha256)
                except (OSError, MicropatchError):
                    continue
                item = module_item({"name": os.path.basename(path), "path": path,
                                    "build_id": known[0], "sha256": known[1]})  # fmt: skip
                if item is not None:
                    found[(m.dev, m.inode)] = item
        return list(found.values())

"""The check-in: what a host reports is stored, every interval, for every host.

The one request whose cost multiplies by the fleet (10,000 hosts every 60 s is
about 170 a second), so it is kept cheap:

- an agent sends its inventory (modules, patched processes) only when it
  changed since the server last stored it, and otherwise only its digest
  (the stored one is answered back: docs/server.md, "Agent protocol"); the
  host's rows are rewritten only then;
- the statements are built once, here, and run on the session's connection:
  building a statement and the ORM's per-execution work cost more than the
  database did;
- the policy and the patches are shared by all check-ins (`server.catalogue`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, delete, exists, func, insert, select, update
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server import schemas as s
from micropatch.server.auth import secret_hash
from micropatch.server.blocked import bound
from micropatch.server.catalogue import REVISION, ModuleKey
from micropatch.server.errors import Unauthorized

_hosts = cast(Table, m.Host.__table__)
_groups = cast(Table, m.Group.__table__)
_modules = cast(Table, m.HostModule.__table__)
_applied = cast(Table, m.ProcessPatch.__table__)
_events = cast(Table, m.Event.__table__)

# Who is checking in, and what the server holds for them, in one statement.
_HOST = (
    select(_hosts.c.id, _hosts.c.group_id, _hosts.c.inventory_digest, _groups.c.path,
           REVISION.scalar_subquery(), _hosts.c.last_seen, _hosts.c.name, _hosts.c.kernel,
           _hosts.c.agent_version)
    .join(_groups, _hosts.c.group_id == _groups.c.id)
    .where(_hosts.c.credential_hash == bindparam("credential_hash"))
)  # fmt: skip
_other = _hosts.alias("other")
# Host names are unique: a host renamed to a name another host has keeps its own.
_NAME_FREE = ~exists().where(_other.c.name == bindparam("name"), _other.c.id != _hosts.c.id)
_KEEP: dict[str, Any] = {  # a value the agent did not send keeps the stored one
    "name": func.coalesce(case((_NAME_FREE, bindparam("name"))), _hosts.c.name),
    "kernel": func.coalesce(bindparam("kernel"), _hosts.c.kernel),
    "agent_version": func.coalesce(bindparam("agent_version"), _hosts.c.agent_version),
}
_SEEN = (
    update(_hosts)
    .where(_hosts.c.id == bindparam("host_id"))
    .values(last_seen=bindparam("now"), **_KEEP)
)
_SEEN_WITH_INVENTORY = _SEEN.values(inventory_digest=bindparam("digest"))
_MODULES = select(_modules.c.build_id, _modules.c.sha256).where(
    _modules.c.host_id == bindparam("host_id")
)
_DROP_MODULES = delete(_modules).where(_modules.c.host_id == bindparam("host_id"))
_DROP_APPLIED = delete(_applied).where(_applied.c.host_id == bindparam("host_id"))
_ADD_MODULES = insert(_modules)
_ADD_APPLIED = insert(_applied)
_ADD_EVENTS = insert(_events)
_STORED_EVENTS = select(
    _events.c.kind, _events.c.time, _events.c.pid, _events.c.patch_id, _events.c.message
).where(
    _events.c.host_id == bindparam("host_id"),
    _events.c.time >= bindparam("low"),
    _events.c.time <= bindparam("high"),
)


@dataclass(frozen=True)
class CheckedIn:
    host_id: int
    revision: int  # of the catalogue, as this transaction read it
    group_id: int
    group: str
    modules: list[ModuleKey]  # what the host maps, as stored after this check-in
    inventory_digest: str | None  # the stored inventory's digest, as the agent computed it
    events_accepted: int


def check_in(session: Session, credential: str, request: s.CheckinRequest) -> CheckedIn:
    """Store what the host whose credential this is reported: its inventory replaces
    the stored one when sent, events are added (a batch sent again is not stored
    twice). Unauthorized if no host has this credential."""
    db = session.connection()
    now = time.time()
    found = db.execute(_HOST, {"credential_hash": secret_hash(credential)}).one_or_none()
    if found is None:
        raise Unauthorized("unknown or expired credentials")
    host_id, group_id, digest, group_path, revision, last_seen, *_ = found
    seen: dict[str, Any] = {
        "host_id": host_id, "now": now, "name": request.hostname or None,
        "kernel": request.kernel or None, "agent_version": request.agent_version or None,
    }  # fmt: skip
    if request.modules is None:
        modules = host_modules(session, host_id)
        db.execute(_SEEN, seen)
    else:
        modules = _store_inventory(session, host_id, request.modules, request.processes or [])
        digest = request.inventory_digest
        db.execute(_SEEN_WITH_INVENTORY, seen | {"digest": digest})
    elapsed = None if last_seen is None else now - last_seen
    accepted = _store_events(session, host_id, now, elapsed, request.events)
    return CheckedIn(host_id, revision or 0, group_id, group_path, modules, digest, accepted)


def quiet(request: s.CheckinRequest) -> bool:
    """Whether a check-in may have nothing to store but the time (`look_up`): no
    inventory, no events."""
    return request.modules is None and not request.events


def look_up(session: Session, credential: str, request: s.CheckinRequest) -> CheckedIn | None:
    """A check-in with nothing to store (`quiet`; its name, kernel and agent version
    those stored), read without writing: what the server holds for the host. None
    when there is something to store after all (then `check_in`); Unauthorized if no
    host has this credential. Its time is the caller's to note (`server.seen`)."""
    found = (
        session.connection()
        .execute(_HOST, {"credential_hash": secret_hash(credential)})
        .one_or_none()
    )
    if found is None:
        raise Unauthorized("unknown or expired credentials")
    host_id, group_id, digest, group_path, revision, _, name, kernel, version = found
    sent = (request.hostname, request.kernel, request.agent_version)
    stored = (name, kernel, version)
    if not quiet(request) or any(v and v != k for v, k in zip(sent, stored, strict=True)):
        return None  # a new name, kernel or agent version: stored by `check_in`
    modules = host_modules(session, host_id)
    return CheckedIn(host_id, revision or 0, group_id, group_path, modules, digest, 0)


def host_modules(session: Session, host_id: int) -> list[ModuleKey]:
    """The (build-id, SHA-256) of each module the host reported."""
    return [tuple(r) for r in session.connection().execute(_MODULES, {"host_id": host_id})]


def _store_inventory(
    session: Session, host_id: int, modules: list[s.ModuleIn], processes: list[s.ProcessIn]
) -> list[ModuleKey]:
    db = session.connection()
    db.execute(_DROP_MODULES, {"host_id": host_id})
    rows = {(x.name, x.path, x.build_id or None, x.sha256): None for x in modules}
    if rows:
        db.execute(
            _ADD_MODULES,
            [{"host_id": host_id, "name": name, "path": path, "build_id": build_id,
              "sha256": sha256} for name, path, build_id, sha256 in rows],
        )  # fmt: skip
    db.execute(_DROP_APPLIED, {"host_id": host_id})
    applied = [
        {"host_id": host_id, "pid": proc.pid, "exe": proc.exe, "unit": proc.unit,
         "user": proc.user, "patch_id": a.patch_id, "version": a.version, "state": a.state}
        for proc in processes
        for a in proc.patches
    ]  # fmt: skip
    if applied:
        db.execute(_ADD_APPLIED, applied)
    return [(build_id, sha256) for _, _, build_id, sha256 in rows]


def _store_events(
    session: Session, host_id: int, now: float, elapsed: float | None, given: list[s.EventIn]
) -> int:
    if not given:
        return 0
    events = [{"host_id": host_id, "received": now, **e.model_dump()} for e in given]
    # A batch sent again (the agent never saw the answer to a check-in the server
    # committed) is not stored twice: an event already stored for this host with
    # the same kind, time, pid, patch and message is the same event.
    db = session.connection()
    low, high = min(e["time"] for e in events), max(e["time"] for e in events)
    stored = {
        tuple(r) for r in db.execute(_STORED_EVENTS, {"host_id": host_id, "low": low, "high": high})
    }
    fresh = []
    for e in events:
        fact = (e["kind"], e["time"], e["pid"], e["patch_id"], e["message"])
        if fact not in stored:
            stored.add(fact)
            fresh.append(e)
    if fresh:
        bound(fresh, elapsed, host_id)  # blocked counts: server/blocked.py
        db.execute(_ADD_EVENTS, fresh)
    return len(fresh)

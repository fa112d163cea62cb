"""Hosts: enrollment with a one-time token, what a host is told (its effective
policy and relevant patches), listing, moving and forgetting hosts."""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from micropatch.server import models as m
from micropatch.server import policy as p
from micropatch.server import schemas as s
from micropatch.server.auth import ENROLL_PREFIX, HOST_PREFIX, new_secret, secret_hash
from micropatch.server.catalogue import Catalogue, ModuleKey, PatchRow
from micropatch.server.errors import Conflict, NotFound, Unauthorized
from micropatch.server.fleet.groups import group
from micropatch.server.fleet.records import audit


def create_enrollment_token(
    session: Session, group_path: str, expires_in: float | None, actor: str
) -> tuple[str, m.EnrollmentToken]:
    """A one-time token (its secret, shown once) to enroll a host into a group."""
    g = group(session, group_path)
    token = new_secret(ENROLL_PREFIX)
    now = time.time()
    expires = None if expires_in is None else now + expires_in
    row = m.EnrollmentToken(token_hash=secret_hash(token), group=g, created=now, expires=expires)
    session.add(row)
    session.flush()
    audit(session, actor, "enrollment-token.create", f"group:{g.path}", expires=expires,
          token=row.id)  # fmt: skip
    return token, row


def enrollment_tokens(
    session: Session, *, unused: bool = False, limit: int | None = None
) -> list[s.EnrollmentTokenInfo]:
    """Enrollment tokens, the newest first (only those not used yet with `unused`; the
    `limit` newest)."""
    query = select(m.EnrollmentToken).order_by(m.EnrollmentToken.id.desc()).limit(limit)
    if unused:
        query = query.where(m.EnrollmentToken.used.is_(None))
    return [
        s.EnrollmentTokenInfo(id=t.id, group=t.group.path, created=t.created,
                              expires=t.expires, used=t.used, host_id=t.host_id)
        for t in session.scalars(query)
    ]  # fmt: skip


def revoke_enrollment_token(session: Session, token_id: int, actor: str) -> None:
    """An enrollment token not used yet stops working (it is deleted)."""
    row = session.get(m.EnrollmentToken, token_id)
    if row is None:
        raise NotFound(f"no enrollment token {token_id}")
    if row.used is not None:
        raise Conflict(f"enrollment token {token_id} was used already (host {row.host_id})")
    session.delete(row)
    audit(session, actor, "enrollment-token.revoke", f"group:{row.group.path}", token=token_id)


def enroll(session: Session, request: s.EnrollRequest) -> tuple[m.Host, str]:
    """A new host from a one-time token; returns it with its credential (shown once)."""
    digest = secret_hash(request.token)
    token = session.scalar(select(m.EnrollmentToken).where(m.EnrollmentToken.token_hash == digest))
    now = time.time()
    if token is None or not request.token.startswith(ENROLL_PREFIX):
        raise Unauthorized("unknown enrollment token")
    if token.expires is not None and token.expires <= now:
        raise Unauthorized("this enrollment token has expired: ask for a new one")
    # Used up in one statement: of two hosts racing with one token, one wins.
    taken = session.execute(
        update(m.EnrollmentToken)
        .where(m.EnrollmentToken.id == token.id, m.EnrollmentToken.used.is_(None))
        .values(used=now)
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise Unauthorized("this enrollment token was already used: ask for a new one")
    # A name taken: refused, the token kept (this transaction does not commit).
    taken_by = session.scalar(select(m.Host.id).where(m.Host.name == request.hostname))
    if taken_by is not None:
        raise _name_taken(request.hostname, taken_by)
    credential = new_secret(HOST_PREFIX)
    host = m.Host(
        name=request.hostname,
        group_id=token.group_id,
        credential_hash=secret_hash(credential),
        enrolled=now,
        kernel=request.kernel,
        agent_version=request.agent_version,
        machine_id=request.machine_id,
    )
    session.add(host)
    try:
        session.flush()
    except IntegrityError:  # enrolled under that name at the same time: the token is kept
        raise _name_taken(request.hostname, None) from None
    token.host_id = host.id
    audit(session, f"host:{host.id}", "host.enroll", f"host:{host.id}",
          hostname=request.hostname, group=token.group.path)  # fmt: skip
    return host, credential


def _name_taken(name: str, host_id: int | None) -> Conflict:
    which = "another host" if host_id is None else f"host {host_id}"
    ident = host_id or "ID"
    forget = f"Retire on its page in the console, or DELETE /api/v1/hosts/{ident} as an admin"
    return Conflict(
        f"{which} is enrolled under the name {name!r}: host names are unique; if it was "
        f"this machine before a reinstall, forget the old one ({forget}) and enroll "
        "again with a new token; otherwise give this machine another host name "
        "(hostnamectl set-hostname NAME)"
    )


def host(session: Session, host_id: int) -> m.Host:
    found = session.get(m.Host, host_id)
    if found is None:
        raise NotFound(f"no host {host_id}")
    return found


def host_policy(
    catalogue: Catalogue, group_id: int, modules: Iterable[ModuleKey]
) -> tuple[p.Effective, list[s.RelevantPatch], list[s.RevokedPatch]]:
    """A host's effective policy, its relevant patches (each with its state and the
    group that decided it) and the revoked patches for its modules."""
    return decided(catalogue.policy(group_id), *catalogue.relevant(modules))


def decided(
    effective: p.Effective, live: Iterable[PatchRow], revoked: Iterable[PatchRow]
) -> tuple[p.Effective, list[s.RelevantPatch], list[s.RevokedPatch]]:
    """`host_policy` of a host whose relevant and revoked patches these are."""
    relevant = []
    for row in live:
        decision = effective.state(row.patch_id)
        relevant.append(
            s.RelevantPatch(
                patch_id=row.patch_id,
                version=row.version,
                artifact_id=row.artifact_id,
                title=row.title,
                target=row.target,
                module=module_ref(row),
                state=decision.state,  # type: ignore[arg-type]
                decided_by=decision.decided_by,
                reason=decision.reason,
            )
        )
    gone = [
        s.RevokedPatch(patch_id=r.patch_id, version=r.version, artifact_id=r.artifact_id)
        for r in revoked
    ]
    return effective, relevant, gone


def module_ref(row: m.Patch | PatchRow) -> s.ModuleRef:
    return s.ModuleRef(name=row.module_name, build_id=row.module_build_id, sha256=row.module_sha256)


def host_out(session: Session, h: m.Host, *, detail: bool = False) -> s.HostOut:
    modules = session.scalar(select(func.count()).where(m.HostModule.host_id == h.id)) or 0
    processes = []
    if detail:
        processes = [
            s.ProcessOut(pid=x.pid, exe=x.exe, unit=x.unit, user=x.user, patch_id=x.patch_id,
                         version=x.version, state=x.state)
            for x in session.scalars(
                select(m.ProcessPatch).where(m.ProcessPatch.host_id == h.id)
                .order_by(m.ProcessPatch.pid)
            )
        ]  # fmt: skip
    return s.HostOut(
        id=h.id,
        name=h.name,
        group=h.group.path,
        enrolled=h.enrolled,
        last_seen=h.last_seen,
        kernel=h.kernel,
        agent_version=h.agent_version,
        modules=modules,
        processes=processes,
    )


def hosts_out(
    session: Session, *, group_id: int | None = None, offset: int = 0, limit: int = 1000
) -> tuple[list[s.HostOut], int]:
    """A page of hosts by id (of one group, or all), and how many there are: three
    statements whatever the page's size (a fleet has thousands)."""
    where = [] if group_id is None else [m.Host.group_id == group_id]
    total = session.scalar(select(func.count()).select_from(m.Host).where(*where)) or 0
    page = session.execute(
        select(m.Host, m.Group.path).join(m.Group, m.Host.group_id == m.Group.id)
        .where(*where).order_by(m.Host.id).offset(offset).limit(limit)
    ).all()  # fmt: skip
    ids = [h.id for h, _ in page]
    counts: dict[int, int] = dict(
        session.execute(
            select(m.HostModule.host_id, func.count())
            .where(m.HostModule.host_id.in_(ids)).group_by(m.HostModule.host_id)
        ).all()
    ) if ids else {}  # fmt: skip
    out = [
        s.HostOut(id=h.id, name=h.name, group=path, enrolled=h.enrolled, last_seen=h.last_seen,
                  kernel=h.kernel, agent_version=h.agent_version, modules=counts.get(h.id, 0))
        for h, path in page
    ]  # fmt: skip
    return out, total


def move_host(session: Session, h: m.Host, group_path: str, actor: str) -> None:
    g = group(session, group_path)
    before = h.group.path
    h.group_id = g.id
    session.flush()
    session.refresh(h)
    audit(session, actor, "host.move", f"host:{h.id}", before=before, after=g.path)


def delete_host(session: Session, h: m.Host, actor: str) -> None:
    """Forget a host: its credential stops working at once, its inventory and events go
    (the audit log keeps that it was deleted, and by whom)."""
    audit(session, actor, "host.delete", f"host:{h.id}", name=h.name, group=h.group.path)
    session.delete(h)

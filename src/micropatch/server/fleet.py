"""What the server does, on a database session: users, enrollment, check-in, groups
and policies, publishing and revocation, the audit log.

The API (`server.app`) and the CLI (`server admin …`) both call these; each
raises `ServerError` subclasses below, which the API turns into HTTP statuses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, update
from sqlalchemy.orm import Session

from micropatch.errors import MicropatchError, ServerError
from micropatch.server import models as m
from micropatch.server import policy as p
from micropatch.server import schemas as s
from micropatch.server.auth import (
    ENROLL_PREFIX,
    HOST_PREFIX,
    USER_PREFIX,
    LoginThrottle,
    Passwords,
    Principal,
    new_secret,
    secret_hash,
)
from micropatch.server.catalogue import Catalogue, ModuleKey, PatchRow, bump, load

log = logging.getLogger(__name__)


class NotFound(ServerError):
    """The thing named does not exist (HTTP 404)."""


class Conflict(ServerError):
    """The request contradicts the stored state (HTTP 409)."""


class Invalid(ServerError):
    """The request is well formed but not acceptable (HTTP 422)."""


class Unauthorized(ServerError):
    """A secret is missing, unknown, expired or used up (HTTP 401)."""


class TooManyAttempts(ServerError):
    """Too many failed logins for a user name lately (HTTP 429, Retry-After)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def audit(
    session: Session, actor: str, action: str, subject: str, **details: Any
) -> None:
    session.add(
        m.AuditEntry(time=time.time(), actor=actor, action=action, subject=subject,
                     details=details)
    )  # fmt: skip


# --- users, tokens ------------------------------------------------------------------


def create_user(
    session: Session,
    passwords: Passwords,
    name: str,
    role: str,
    password: str | None,
    actor: str,
) -> tuple[m.User, str]:
    """A new user and an API token for it (returned once)."""
    if role not in m.ROLES:
        raise Invalid(f"role {role!r}: must be one of {', '.join(m.ROLES)}")
    if session.scalar(select(m.User).where(m.User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    user = m.User(
        name=name,
        role=role,
        password_hash=passwords.hash(password) if password else None,
        created=time.time(),
    )
    session.add(user)
    session.flush()
    token = issue_token(session, user, "created with the user")
    audit(session, actor, "user.create", f"user:{name}", role=role)
    return user, token


def issue_token(session: Session, user: m.User, label: str, ttl: float | None = None) -> str:
    token = new_secret(USER_PREFIX)
    now = time.time()
    session.add(
        m.ApiToken(user_id=user.id, token_hash=secret_hash(token), label=label, created=now,
                   expires=None if ttl is None else now + ttl)
    )  # fmt: skip
    return token


def login(
    session: Session,
    passwords: Passwords,
    name: str,
    password: str,
    *,
    via: str = "api",
    throttle: LoginThrottle | None = None,
) -> tuple[m.User, str]:
    """A 12-hour token for a user name and password: an API token, or (via="console")
    the console's session, which logging out deletes. With a `throttle`, a name with
    too many failed logins lately is refused (TooManyAttempts) unchecked."""
    wait = throttle.wait(name) if throttle else 0.0
    if wait:
        seconds = math.ceil(wait)
        raise TooManyAttempts(
            f"too many failed logins for {name!r}: try again in {seconds} s", seconds
        )
    user = session.scalar(select(m.User).where(m.User.name == name))
    if user is None or not passwords.verify(user.password_hash, password):
        if throttle:
            throttle.failed(name)
        raise Unauthorized("wrong user name or password")
    if throttle:
        throttle.succeeded(name)
    token = issue_token(session, user, "login" if via == "api" else via, ttl=12 * 3600)
    details = {} if via == "api" else {"via": via}
    audit(session, f"user:{name}", "user.login", f"user:{name}", **details)
    return user, token


# Built once: every check-in authenticates.
_HOST_BY_CREDENTIAL = select(m.Host.id, m.Host.name).where(
    m.Host.credential_hash == bindparam("digest")
)


def authenticate(session: Session, secret: str) -> Principal:
    """The user or host a bearer secret belongs to; Unauthorized otherwise."""
    digest = secret_hash(secret)
    if secret.startswith(USER_PREFIX):
        token = session.scalar(select(m.ApiToken).where(m.ApiToken.token_hash == digest))
        if token is not None and (token.expires is None or token.expires > time.time()):
            return Principal("user", token.user.id, token.user.name, token.user.role)
    elif secret.startswith(HOST_PREFIX):
        host = session.connection().execute(_HOST_BY_CREDENTIAL, {"digest": digest}).one_or_none()
        if host is not None:
            return Principal("host", host.id, host.name)
    raise Unauthorized("unknown or expired credentials")


# --- groups -------------------------------------------------------------------------


def group(session: Session, path: str) -> m.Group:
    path = p.normalise_path(path)
    found = session.scalar(select(m.Group).where(m.Group.path == path))
    if found is None:
        raise NotFound(f"no group {path!r}")
    return found


def create_group(session: Session, path: str, default_state: str | None, actor: str) -> m.Group:
    path = p.normalise_path(path)
    if session.scalar(select(m.Group).where(m.Group.path == path)) is not None:
        raise Conflict(f"group {path!r} already exists")
    parent_path = p.parent_of(path)
    if parent_path is None:
        raise Conflict("the root group / always exists")
    parent = group(session, parent_path)
    created = m.Group(path=path, parent_id=parent.id, default_state=default_state)
    session.add(created)
    session.flush()
    bump(session)
    audit(session, actor, "group.create", f"group:{path}", default_state=default_state)
    return created


def delete_group(session: Session, path: str, actor: str) -> None:
    found = group(session, path)
    if found.path == "/":
        raise Conflict("the root group / cannot be deleted")
    if session.scalar(select(func.count()).where(m.Group.parent_id == found.id)):
        raise Conflict(f"group {found.path!r} has subgroups: delete them first")
    if session.scalar(select(func.count()).where(m.Host.group_id == found.id)):
        raise Conflict(f"group {found.path!r} has hosts: move them to another group first")
    session.execute(delete(m.EnrollmentToken).where(m.EnrollmentToken.group_id == found.id))
    session.delete(found)
    bump(session)
    audit(session, actor, "group.delete", f"group:{found.path}")


def set_policy(session: Session, path: str, policy: s.PolicyIn, actor: str) -> m.Group:
    """Replace what the group sets: default state, per-patch states, exclusions."""
    found = group(session, path)
    found.default_state = policy.default_state
    found.patch_states = [
        m.GroupPatchState(patch_id=pid, state=state)
        for pid, state in sorted(policy.patches.items())
    ]
    found.exclusions = [
        m.Exclusion(kind=e.kind, value=e.value, patch_id=e.patch_id) for e in policy.exclusions
    ]
    bump(session)
    audit(session, actor, "policy.set", f"group:{found.path}", **policy.model_dump())
    return found


def group_out(session: Session, g: m.Group) -> s.GroupOut:
    hosts = session.scalar(select(func.count()).where(m.Host.group_id == g.id)) or 0
    return s.GroupOut(
        path=g.path,
        parent=p.parent_of(g.path),
        default_state=g.default_state,
        patches={x.patch_id: x.state for x in g.patch_states},
        exclusions=[
            s.ExclusionIn(kind=e.kind, value=e.value, patch_id=e.patch_id)  # type: ignore[arg-type]
            for e in g.exclusions
        ],
        hosts=hosts,
    )


def effective_policy(session: Session, g: m.Group) -> p.Effective:
    """The policy of group `g`, inherited from the root down, as this session sees it
    (uncached: right also in the transaction that changed it)."""
    session.flush()
    return load(session).policy(g.id)


def policy_out(effective: p.Effective, patch_ids: Sequence[str] = ()) -> s.EffectivePolicy:
    return s.EffectivePolicy.model_validate(effective.explain(patch_ids))


# --- hosts: enrollment and check-in -------------------------------------------------


def create_enrollment_token(
    session: Session, group_path: str, expires_in: float | None, actor: str
) -> tuple[str, m.Group, float | None]:
    g = group(session, group_path)
    token = new_secret(ENROLL_PREFIX)
    now = time.time()
    expires = None if expires_in is None else now + expires_in
    session.add(
        m.EnrollmentToken(token_hash=secret_hash(token), group_id=g.id, created=now,
                          expires=expires)
    )  # fmt: skip
    audit(session, actor, "enrollment-token.create", f"group:{g.path}", expires=expires)
    return token, g, expires


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
    session.flush()
    token.host_id = host.id
    audit(session, f"host:{host.id}", "host.enroll", f"host:{host.id}",
          hostname=request.hostname, group=token.group.path)  # fmt: skip
    return host, credential


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
    effective = catalogue.policy(group_id)
    live, revoked = catalogue.relevant(modules)
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


# --- events and the audit log ------------------------------------------------------


def events(
    session: Session,
    *,
    host_id: int | None = None,
    kind: str | None = None,
    patch_id: str | None = None,
    since: float | None = None,
    before: int | None = None,
    limit: int = 1000,
) -> Sequence[m.Event]:
    """Events, newest first, optionally of one host, kind or patch (the API and the
    console's timeline); `before`: only those after the event of that id in this
    order (the next page)."""
    query = select(m.Event).order_by(m.Event.time.desc(), m.Event.id.desc()).limit(limit)
    if before is not None:
        last = session.get(m.Event, before)
        if last is not None:
            query = query.where(
                or_(m.Event.time < last.time, (m.Event.time == last.time) & (m.Event.id < last.id))
            )
    if host_id is not None:
        query = query.where(m.Event.host_id == host_id)
    if kind is not None:
        query = query.where(m.Event.kind == kind)
    if patch_id is not None:
        query = query.where(m.Event.patch_id == patch_id)
    if since is not None:
        query = query.where(m.Event.time >= since)
    return session.scalars(query).all()


def audit_entries(
    session: Session, *, since: float | None = None, limit: int = 1000
) -> Sequence[m.AuditEntry]:
    """The audit log, newest first."""
    query = select(m.AuditEntry).order_by(m.AuditEntry.id.desc()).limit(limit)
    if since is not None:
        query = query.where(m.AuditEntry.time >= since)
    return session.scalars(query).all()


# --- patches ------------------------------------------------------------------------


def publish(session: Session, repository: Any, data: bytes, actor: str) -> tuple[m.Patch, bool]:
    """Check an uploaded artifact (parse, id, signature by a trusted patch-signing key,
    source consistent with the recorded facts: no compiler runs), record it and add it
    to the TUF targets. Returns (patch, created); publishing the same artifact again
    changes nothing."""
    from micropatch.server.artifacts import check, describe

    try:
        artifact = check(data, "the uploaded artifact", repository.trusted_keys())
    except MicropatchError as exc:
        raise Invalid(str(exc)) from None
    facts = describe(artifact)
    same = session.scalar(select(m.Patch).where(m.Patch.artifact_id == artifact.id))
    if same is not None:
        if same.revoked:
            raise Conflict(
                f"patch {same.patch_id} v{same.version} ({artifact.id[:12]}…) was revoked; "
                "publish a new version instead"
            )
        return same, False
    clash = session.scalar(
        select(m.Patch).where(
            m.Patch.patch_id == facts["patch_id"], m.Patch.version == facts["version"]
        )
    )
    if clash is not None:
        raise Conflict(
            f"patch {clash.patch_id} v{clash.version} is already published as another "
            f"artifact ({clash.artifact_id[:12]}…): bump the version"
        )
    row = m.Patch(
        patch_id=facts["patch_id"],
        version=facts["version"],
        artifact_id=artifact.id,
        title=facts["title"],
        module_name=facts["module"]["name"],
        module_build_id=facts["module"]["build_id"],
        module_sha256=facts["module"]["sha256"],
        target=artifact.file_name,
        size=len(data),
        published=time.time(),
        published_by=actor,
        revoked=False,
    )
    session.add(row)
    session.flush()  # a clash with a concurrent publish fails here, before the repository
    repository.add_target(artifact.file_name, data, custom={"micropatch": facts})
    bump(session)
    audit(session, actor, "patch.publish", f"patch:{row.patch_id}", version=row.version,
          artifact_id=row.artifact_id, target=row.target)  # fmt: skip
    return row, True


def revoke(
    session: Session, repository: Any, patch_id: str, version: int | None, actor: str
) -> list[m.Patch]:
    """Revoke one version, or every version, of a patch: removed from the TUF targets,
    reported to hosts as revoked so their agents remove it live."""
    query = select(m.Patch).where(m.Patch.patch_id == patch_id, m.Patch.revoked.is_(False))
    if version is not None:
        query = query.where(m.Patch.version == version)
    rows = list(session.scalars(query))
    if not rows:
        what = patch_id if version is None else f"{patch_id} v{version}"
        raise NotFound(f"no published, unrevoked patch {what}")
    published = repository.target_files()
    now = time.time()
    bump(session)
    for row in rows:
        row.revoked, row.revoked_at = True, now
        if row.target in published:
            repository.remove_target(row.target)
        audit(session, actor, "patch.revoke", f"patch:{row.patch_id}", version=row.version,
              artifact_id=row.artifact_id)  # fmt: skip
    return rows


def patch_out(session: Session, row: m.Patch, *, counts: bool = False) -> s.PatchOut:
    out = s.PatchOut(
        patch_id=row.patch_id,
        version=row.version,
        artifact_id=row.artifact_id,
        title=row.title,
        target=row.target,
        module=module_ref(row),
        size=row.size,
        published=row.published,
        published_by=row.published_by,
        revoked=row.revoked,
        revoked_at=row.revoked_at,
    )
    if counts:
        matches = or_(
            m.HostModule.sha256 == row.module_sha256,
            m.HostModule.build_id == row.module_build_id
            if row.module_build_id
            else m.HostModule.id.is_(None),
        )
        out.hosts_relevant = session.scalar(
            select(func.count(func.distinct(m.HostModule.host_id))).where(matches)
        )
        out.processes_applied = session.scalar(
            select(func.count()).where(
                m.ProcessPatch.patch_id == row.patch_id, m.ProcessPatch.version == row.version
            )
        )
    return out

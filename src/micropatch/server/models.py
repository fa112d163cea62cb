"""The server's tables (SQLAlchemy 2). The schema changes only through a migration
under `server/migrations/versions/`; `tests/unit/server/test_storage.py` checks that
the migrations and these models describe the same schema.

Times are seconds since the epoch (floats), as the agent's events carry them.
Secrets are never stored: passwords as argon2 hashes, tokens and host
credentials as SHA-256 (they are random and long, so a slow hash adds nothing).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("admin", "operator", "auditor")
# Patch versions are 63-bit (PostgreSQL's bigint; SQLite's integer is 64-bit anyway).
Version = BigInteger
STATES = ("enabled", "disabled")
EXCLUSION_KINDS = ("exe", "unit", "user")


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    created: Mapped[float] = mapped_column(Float)
    # When the user was disabled (None: enabled): its tokens and sessions are refused.
    disabled: Mapped[float | None] = mapped_column(Float)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(64), default="")
    created: Mapped[float] = mapped_column(Float)
    expires: Mapped[float | None] = mapped_column(Float)

    user: Mapped[User] = relationship()


class Group(Base):
    """A node of the group tree: `path` is "/" for the root, "/prod/web" below it."""

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(255), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id"), index=True)
    # None: inherit the parent's default state for new patches.
    default_state: Mapped[str | None] = mapped_column(String(16))

    patch_states: Mapped[list[GroupPatchState]] = relationship(
        cascade="all, delete-orphan", order_by="GroupPatchState.patch_id"
    )
    exclusions: Mapped[list[Exclusion]] = relationship(
        cascade="all, delete-orphan", order_by="Exclusion.id"
    )


class GroupPatchState(Base):
    """A group's explicit state for one patch (by patch id, every version)."""

    __tablename__ = "group_patch_states"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    patch_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))


class Exclusion(Base):
    """Processes a group's hosts never patch: by executable (glob), systemd unit or user;
    for one patch, or every patch (patch_id None)."""

    __tablename__ = "exclusions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    value: Mapped[str] = mapped_column(String(512))
    patch_id: Mapped[str | None] = mapped_column(String(128))


class Host(Base):
    """An enrolled host; its name is unique."""

    __tablename__ = "hosts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"), index=True)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float)
    kernel: Mapped[str | None] = mapped_column(String(255))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    machine_id: Mapped[str | None] = mapped_column(String(64))
    # The digest of the inventory (modules, patched processes) stored for the host, as
    # its agent computed it: an agent whose inventory is unchanged sends only this.
    inventory_digest: Mapped[str | None] = mapped_column(String(128))

    group: Mapped[Group] = relationship()


class EnrollmentToken(Base):
    """One-time: used by one host, then never again."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"))
    created: Mapped[float] = mapped_column(Float)
    expires: Mapped[float | None] = mapped_column(Float)
    used: Mapped[float | None] = mapped_column(Float)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"))

    group: Mapped[Group] = relationship()


class Patch(Base):
    """A published artifact: what the server recorded of it, and whether it is revoked."""

    __tablename__ = "patches"
    __table_args__ = (UniqueConstraint("patch_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patch_id: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Version)
    artifact_id: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str | None] = mapped_column(String(512))
    module_name: Mapped[str] = mapped_column(String(255))
    module_build_id: Mapped[str | None] = mapped_column(String(128), index=True)
    module_sha256: Mapped[str] = mapped_column(String(64), index=True)
    # "native", or "cpython": module_sha256 is then the SHA-256 of the module's source
    runtime: Mapped[str] = mapped_column(String(16), default="native", server_default="native")
    target: Mapped[str] = mapped_column(String(255))  # the TUF target name
    size: Mapped[int] = mapped_column(Integer)
    published: Mapped[float] = mapped_column(Float)
    published_by: Mapped[str] = mapped_column(String(64))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class HostModule(Base):
    """A module file mapped by some process on a host, from its last check-in."""

    __tablename__ = "host_modules"
    __table_args__ = (
        # Covering the joins from a patch's module to the hosts that load it (compliance).
        Index("ix_host_modules_build_id_host", "build_id", "host_id"),
        Index("ix_host_modules_sha256_host", "sha256", "build_id", "host_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str | None] = mapped_column(String(1024))
    build_id: Mapped[str | None] = mapped_column(String(128))
    sha256: Mapped[str | None] = mapped_column(String(64))


class ProcessPatch(Base):
    """A patch in a process on a host (the registry's state), from its last check-in."""

    __tablename__ = "process_patches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    pid: Mapped[int] = mapped_column(Integer)
    exe: Mapped[str | None] = mapped_column(String(1024))
    unit: Mapped[str | None] = mapped_column(String(255))
    user: Mapped[str | None] = mapped_column(String(64))
    patch_id: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Version)
    state: Mapped[str] = mapped_column(String(16))


class Event(Base):
    """What an agent reported: applied, removed, failed, blocked, crashed, ..."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_host_time", "host_id", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), index=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    received: Mapped[float] = mapped_column(Float)
    pid: Mapped[int | None] = mapped_column(Integer)
    exe: Mapped[str | None] = mapped_column(String(1024))
    patch_id: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[int | None] = mapped_column(Version)
    module: Mapped[str | None] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Revision(Base):
    """A counter bumped, in the same transaction, by every change of what check-ins
    share: "policy" (groups, their policies, patches). A server process rebuilds what
    it caches of them when the counter moved (server/catalogue.py)."""

    __tablename__ = "revisions"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


class LoginFailure(Base):
    """A failed login, by user name and source address: the throttle's memory, shared by
    every server process (server/throttle.py); rows older than its window are deleted."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    address: Mapped[str] = mapped_column(String(64), index=True)


class AuditEntry(Base):
    """One change, by whom: every request that changes something writes one."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # "user:alice", "host:3", "cli"
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(512))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

"""The API's request and response bodies (the OpenAPI schema is generated from these).

The agent's side of enrollment and check-in uses exactly these shapes
(docs/server.md, "Agent protocol").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["admin", "operator", "auditor"]
State = Literal["enabled", "disabled"]
ExclusionKind = Literal["exe", "unit", "user"]
EventKind = Literal[
    "applied", "removed", "updated", "failed", "blocked", "crashed", "disabled", "rejected",
    "skipped", "agent",
]  # fmt: skip
Name = Field(min_length=1, max_length=255)
INT_MAX = 2**31 - 1  # the columns are 32-bit integers (PostgreSQL's integer)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _no_nul(self) -> Any:
        # PostgreSQL's text cannot hold NUL; no name, path or message needs one.
        for name, value in self:
            if name != "data" and _has_nul(value):
                raise ValueError(f"{name}: must not contain NUL characters")
        return self


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


# --- users and tokens --------------------------------------------------------------


class TokenRequest(_In):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenOut(BaseModel):
    token: str
    name: str
    role: str


class UserIn(_In):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    role: Role
    password: str | None = Field(default=None, min_length=8, max_length=1024)


class UserOut(BaseModel):
    id: int
    name: str
    role: str
    created: float


class UserCreated(UserOut):
    token: str  # an API token for the new user, shown once


class EnrollmentTokenIn(_In):
    group: str = Field(default="/", max_length=255)
    expires_in: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="seconds; none: never"
    )


class EnrollmentTokenOut(BaseModel):
    token: str  # shown once
    group: str
    expires: float | None


# --- agent protocol ----------------------------------------------------------------


class EnrollRequest(_In):
    token: str = Field(min_length=1, max_length=256)
    hostname: str = Name
    machine_id: str | None = Field(default=None, max_length=64)
    kernel: str | None = Field(default=None, max_length=255)
    agent_version: str | None = Field(default=None, max_length=64)


class EnrollResponse(BaseModel):
    host_id: int
    credential: str  # the host's bearer credential, shown once
    group: str
    checkin_interval: int
    repository: str  # the TUF repository's URL (metadata/ and targets/ below it)


class ModuleIn(_In):
    name: str = Name
    path: str | None = Field(default=None, max_length=1024)
    build_id: str | None = Field(default=None, max_length=128, pattern=r"^[0-9a-f]*$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class AppliedIn(_In):
    patch_id: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=0, le=INT_MAX)
    state: str = Field(default="applied", max_length=16)


class ProcessIn(_In):
    pid: int = Field(ge=1, le=INT_MAX)
    exe: str | None = Field(default=None, max_length=1024)
    unit: str | None = Field(default=None, max_length=255)
    user: str | None = Field(default=None, max_length=64)
    patches: list[AppliedIn] = Field(default_factory=list, max_length=1000)


class EventIn(_In):
    kind: EventKind
    time: float = Field(allow_inf_nan=False)
    pid: int | None = Field(default=None, ge=1, le=INT_MAX)
    exe: str | None = Field(default=None, max_length=1024)
    patch_id: str | None = Field(default=None, max_length=128)
    version: int | None = Field(default=None, ge=0, le=INT_MAX)
    module: str | None = Field(default=None, max_length=255)
    message: str = Field(default="", max_length=4096)
    data: dict[str, Any] = Field(default_factory=dict)


class CheckinRequest(_In):
    hostname: str | None = Field(default=None, max_length=255)
    kernel: str | None = Field(default=None, max_length=255)
    agent_version: str | None = Field(default=None, max_length=64)
    modules: list[ModuleIn] = Field(default_factory=list, max_length=100_000)
    processes: list[ProcessIn] = Field(default_factory=list, max_length=100_000)
    events: list[EventIn] = Field(default_factory=list, max_length=10_000)


class ModuleRef(BaseModel):
    name: str
    build_id: str | None
    sha256: str


class RelevantPatch(BaseModel):
    """A published patch for a module this host runs, and what its policy says."""

    patch_id: str
    version: int
    artifact_id: str
    title: str | None
    target: str  # the TUF target name: download it through the repository
    module: ModuleRef
    state: State
    decided_by: str | None
    reason: str


class RevokedPatch(BaseModel):
    patch_id: str
    version: int
    artifact_id: str


class ExclusionOut(BaseModel):
    kind: str
    value: str
    patch_id: str | None
    decided_by: str


class DefaultOut(BaseModel):
    state: str
    decided_by: str | None


class DecisionOut(BaseModel):
    patch_id: str
    state: str
    decided_by: str | None
    reason: str


class EffectivePolicy(BaseModel):
    group: str
    default_state: DefaultOut
    patches: list[DecisionOut]
    exclusions: list[ExclusionOut]


class CheckinResponse(BaseModel):
    host_id: int
    group: str
    checkin_interval: int
    repository: str
    policy: EffectivePolicy
    patches: list[RelevantPatch]
    revoked: list[RevokedPatch]
    events_accepted: int


# --- patches, groups, hosts, events, audit -----------------------------------------


class PatchOut(BaseModel):
    patch_id: str
    version: int
    artifact_id: str
    title: str | None
    target: str
    module: ModuleRef
    size: int
    published: float
    published_by: str
    revoked: bool
    revoked_at: float | None
    hosts_relevant: int | None = None
    processes_applied: int | None = None


class RevokeIn(_In):
    version: int | None = Field(
        default=None, ge=0, le=INT_MAX, description="one version; none: every version"
    )


class ExclusionIn(_In):
    kind: ExclusionKind
    value: str = Field(min_length=1, max_length=512)
    patch_id: str | None = Field(default=None, max_length=128)


class PolicyIn(_In):
    default_state: State | None = None
    patches: dict[str, State] = Field(default_factory=dict)
    exclusions: list[ExclusionIn] = Field(default_factory=list, max_length=1000)


class GroupIn(_In):
    path: str = Field(min_length=1, max_length=255)
    default_state: State | None = None


class GroupOut(BaseModel):
    path: str
    parent: str | None
    default_state: str | None
    patches: dict[str, str]
    exclusions: list[ExclusionIn]
    hosts: int


class GroupPolicyOut(BaseModel):
    group: GroupOut
    effective: EffectivePolicy


class HostGroupIn(_In):
    group: str = Field(min_length=1, max_length=255)


class ProcessOut(BaseModel):
    pid: int
    exe: str | None
    unit: str | None
    user: str | None
    patch_id: str
    version: int
    state: str


class HostOut(BaseModel):
    id: int
    name: str
    group: str
    enrolled: float
    last_seen: float | None
    kernel: str | None
    agent_version: str | None
    modules: int
    processes: list[ProcessOut] = Field(default_factory=list)


class HostPolicyOut(BaseModel):
    host_id: int
    effective: EffectivePolicy
    patches: list[RelevantPatch]


class EventOut(BaseModel):
    id: int
    host_id: int
    kind: str
    time: float
    pid: int | None
    exe: str | None
    patch_id: str | None
    version: int | None
    module: str | None
    message: str
    data: dict[str, Any]


class AuditOut(BaseModel):
    id: int
    time: float
    actor: str
    action: str
    subject: str
    details: dict[str, Any]

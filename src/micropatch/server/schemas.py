"""The API's request and response bodies (the OpenAPI schema is generated from these).

The agent's side of enrollment and check-in uses exactly these shapes
(docs/server.md, "Agent protocol").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from micropatch.patch.model import VERSION_MAX
from micropatch.server.validation import Items, nul_at

Role = Literal["admin", "operator", "auditor"]
State = Literal["enabled", "disabled"]
ExclusionKind = Literal["exe", "unit", "user"]
EventKind = Literal[
    "applied", "removed", "updated", "failed", "blocked", "crashed", "disabled", "rejected",
    "skipped", "agent",
]  # fmt: skip
Name = Field(min_length=1, max_length=255)
INT_MAX = 2**31 - 1  # ids, pids, counts: 32-bit integer columns (PostgreSQL's integer)
# VERSION_MAX: a patch version, 63 bits wherever it is stored or sent (patch/model.py)


class _In(BaseModel):
    """Part of a request body: unknown fields refused."""

    model_config = ConfigDict(extra="forbid")


class _Body(_In):
    """A whole request body: no string in it may hold a NUL (PostgreSQL's text cannot;
    no name, path or message needs one), but an event's free-form `data`.

    Checked once, on the raw body, before the fields are validated: walking the
    validated models instead cost a check-in with an inventory about 2 ms."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        where = nul_at(data)
        if where is not None:
            raise ValueError(f"{'.'.join(map(str, where)) or 'body'}: must not contain NUL "
                             "characters")  # fmt: skip
        return data


# --- users and tokens --------------------------------------------------------------


class TokenRequest(_Body):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenOut(BaseModel):
    token: str
    name: str
    role: str


class UserIn(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    role: Role
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    token_expires_in: float | None = Field(
        default=None, gt=0, le=10 * 365 * 86400, allow_inf_nan=False,
        description="seconds the user's first API token is valid; none: until revoked",
    )  # fmt: skip


class UserOut(BaseModel):
    id: int
    name: str
    role: str
    created: float
    disabled: float | None = None  # when it was disabled


class PasswordIn(_Body):
    password: str = Field(min_length=8, max_length=1024)


class TokenInfo(BaseModel):
    """A user's API token (or console session), without its secret."""

    id: int
    user: str
    label: str
    created: float
    expires: float | None


class EnrollmentTokenInfo(BaseModel):
    """An enrollment token, without its secret."""

    id: int
    group: str
    created: float
    expires: float | None
    used: float | None
    host_id: int | None


class UserCreated(UserOut):
    token: str  # an API token for the new user, shown once


class EnrollmentTokenIn(_Body):
    group: str = Field(default="/", max_length=255)
    expires_in: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="seconds; none: never"
    )


class EnrollmentTokenOut(BaseModel):
    id: int
    token: str  # shown once
    group: str
    expires: float | None


# --- agent protocol ----------------------------------------------------------------


class EnrollRequest(_Body):
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
    version: int = Field(ge=0, le=VERSION_MAX)
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
    version: int | None = Field(default=None, ge=0, le=VERSION_MAX)
    module: str | None = Field(default=None, max_length=255)
    message: str = Field(default="", max_length=4096)
    data: dict[str, Any] = Field(default_factory=dict)


MAX_ITEMS = {"modules": 100_000, "processes": 100_000, "events": 10_000}  # in a check-in


class CheckinRequest(_Body):
    hostname: str | None = Field(default=None, max_length=255)
    kernel: str | None = Field(default=None, max_length=255)
    agent_version: str | None = Field(default=None, max_length=64)
    # The inventory: sent when it changed (then both lists, a missing one meaning
    # empty), left out (null) when the server already holds it.
    modules: list[ModuleIn] | None = Field(default=None, max_length=MAX_ITEMS["modules"])
    processes: list[ProcessIn] | None = Field(default=None, max_length=MAX_ITEMS["processes"])
    # The inventory's digest, as the agent computes it: stored with a sent inventory
    # and answered back, so the agent knows what the server holds.
    inventory_digest: str | None = Field(default=None, max_length=128, pattern=r"^[!-~]*$")
    events: list[EventIn] = Field(default_factory=list, max_length=MAX_ITEMS["events"])
    # What was left out of the lists above, one line each: set here, never sent.
    ignored: list[str] = Field(default_factory=list, exclude=True)
    # A held check-in (docs/server.md, "Push"): when the answer's `policy_digest` is
    # still this one, the server answers when it changes, or after `wait` seconds
    # (at most the `hold` it offered), instead of at once.
    wait: int = Field(default=0, ge=0, le=3600)
    policy_digest: str | None = Field(default=None, max_length=128, pattern=r"^[!-~]*$")

    @model_validator(mode="before")
    @classmethod
    def _item_by_item(cls, data: Any) -> Any:
        """One bad item never costs the rest of a check-in: each module, process and
        event is validated on its own; one that fails is left out and named in
        `ignored`. (Runs before `_Body`'s whole-body NUL check, so an item holding a
        NUL is left out alone.) A list longer than its limit is refused whole."""
        if not isinstance(data, dict):
            return data
        if "ignored" in data:
            raise ValueError("ignored: the server's to say, not a field of a check-in")
        data, ignored = dict(data), list[str]()
        for name in _ITEMS:
            items = data.get(name)
            if not isinstance(items, list) or len(items) > MAX_ITEMS[name]:
                continue
            data[name] = _ITEMS[name].valid(items, ignored)
        data["ignored"] = ignored
        return data

    @model_validator(mode="after")
    def _whole_inventory(self) -> Any:
        if (self.modules is None) != (self.processes is None):
            if self.modules is None:
                self.modules = []
            else:
                self.processes = []
        return self


_ITEMS = {name: Items(name, model) for name, model in
          (("modules", ModuleIn), ("processes", ProcessIn), ("events", EventIn))}  # fmt: skip


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
    # The digest of the inventory the server holds for this host (null: none, or one
    # sent without a digest): when it is not the agent's own, the agent sends its
    # inventory at the next check-in.
    inventory_digest: str | None = None
    # Items of the check-in left out because they were not valid (the first ones).
    ignored: list[str] = Field(default_factory=list)
    # The digest of group, policy, patches and revoked: sent back with `wait`, the
    # check-in is held until they change. `hold`: the longest wait this server holds a
    # check-in now (0: it does not; the agent checks in every checkin_interval).
    policy_digest: str = ""
    hold: int = 0
    # Seconds to wait before the next check-in: set in an answer a change woke, to
    # spread the check-ins of the fleet it woke (server/push.py, WAKE_RATE).
    after: float = 0.0


# --- patches, groups, hosts, events, audit -----------------------------------------


class PatchOut(BaseModel):
    patch_id: str
    version: int
    artifact_id: str
    title: str | None
    target: str
    module: ModuleRef
    runtime: str = "native"  # or "cpython" (docs/python-patches.md)
    size: int
    published: float
    published_by: str
    revoked: bool
    revoked_at: float | None
    hosts_relevant: int | None = None
    processes_applied: int | None = None


class RevokeIn(_Body):
    version: int | None = Field(
        default=None, ge=0, le=VERSION_MAX, description="one version; none: every version"
    )


class ExclusionIn(_In):
    kind: ExclusionKind
    value: str = Field(min_length=1, max_length=512)
    patch_id: str | None = Field(default=None, max_length=128)


class PolicyIn(_Body):
    default_state: State | None = None
    patches: dict[str, State] = Field(default_factory=dict)
    exclusions: list[ExclusionIn] = Field(default_factory=list, max_length=1000)


class GroupIn(_Body):
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


class HostGroupIn(_Body):
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

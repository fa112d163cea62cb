"""What the agent reports: one Event per thing that happened (CORE owns this module;
this is the shape every part of the agent shares, docs/agent.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    kind: str  # "applied" | "removed" | "updated" | "failed" | "blocked" | "crashed"
    # | "disabled" | "rejected" | "skipped" | "agent"
    time: float  # time.time()
    pid: int | None = None
    exe: str | None = None
    patch_id: str | None = None
    version: int | None = None
    module: str | None = None
    message: str = ""
    data: dict[str, object] = field(default_factory=dict)


EventSink = Callable[[Event], None]  # thread-safe

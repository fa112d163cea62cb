"""The interface a runtime offers the CLI, and later the agent and the server.

identity → is this process affected → apply / remove / update / status. The
CPython runtime implements it (`runtimes.cpython.CPythonRuntime`); the native
engine (`live`) has the same operations with its own types and could sit
behind it with a thin adapter (see docs/python-patches.md, "Phase 2").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Outcome:
    """What one operation did to one process (the fields of `live.Outcome`)."""

    pid: int
    patch_id: str
    action: str  # "applied", "removed", "updated"
    version: int | None
    sites: int  # functions changed
    attempts: int
    paused: float  # seconds every thread was stopped, in total
    moved: int = 0
    entered: str = ""  # how the code got to run: a pending call, a parked thread
    waited: float = 0.0  # seconds from the first stop until the patch was in force


@dataclass(frozen=True)
class PatchState:
    """One patch applied to one process, read from the process without running code."""

    pid: int
    process: str
    module: str
    patch_id: str
    version: int
    title: str
    applied_at: float
    sites: tuple[str, ...]  # the functions changed
    blocked: int | None
    state: str = "applied"
    runtime: str = "cpython"


class Runtime(Protocol):
    """What the agent needs of a runtime (phase 2)."""

    name: str

    def affected(self, pid: int, module: str) -> bool:
        """Whether process `pid` may hold `module` (cheap, without stopping it)."""

    def status(self, pid: int) -> list[PatchState]:
        """What is applied to `pid`, read from the process."""

    def remove(self, patch_id: str, pid: int) -> Outcome:
        """Restore what `patch_id` changed in `pid`."""

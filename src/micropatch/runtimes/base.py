"""What a runtime's operations return: an Outcome per operation, a PatchState per
applied patch (the fields of `live.Outcome` and `live.states.PatchState`, so the
CLI prints both runtimes one way). `runtimes.engines` dispatches between the
engines; the agent's CPython pass (`agent/pythonpass.py`) reads these too.
"""

from __future__ import annotations

from dataclasses import dataclass


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

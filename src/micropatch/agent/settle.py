"""`agent add|enable|disable|update --wait`: until the running processes are as the
policy says for one patch.

Settled means: every running process that maps the patch's module and that the
policy wants to carry it carries its stored version, and none that the policy
wants without it carries any version. What the policy wants is what a pass over
the processes decided (`PassResult.wanted`/`unwanted`); only a pass *begun* after
the request saw the change, so the wait starts one and reads its result. A pass
that leaves something unsettled (an apply failed, a process busy) is followed by
another, a second apart, until the timeout; then the error names the processes
not yet settled and why.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from micropatch.errors import AgentError

if TYPE_CHECKING:
    from micropatch.agent.reconcile import PassResult
    from micropatch.agent.service import Agent

RETRY = 1.0  # seconds between two passes while unsettled


@dataclass
class Tally:
    patch_id: str
    version: int
    carry: bool  # the patch is enabled: wanted processes carry it
    carriers: dict[int, int] = field(default_factory=dict)  # pid -> version carried
    missing: list[int] = field(default_factory=list)  # wanted, not carrying this version
    extra: list[int] = field(default_factory=list)  # unwanted, still carrying it
    wanted: int = 0

    @property
    def settled(self) -> bool:
        return not self.missing and not self.extra

    def carrying(self) -> int:
        """Processes carrying the stored version now."""
        return sum(1 for v in self.carriers.values() if v == self.version)


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return "gone"


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def tally(agent: Agent, patch_id: str, version: int, result: PassResult) -> Tally:
    """Where the processes stand against what `result`'s pass decided."""
    covered = agent.reconciler.covered()
    t = Tally(patch_id, version, agent.view().enabled(patch_id))
    t.carriers = {pid: c.patches[patch_id] for pid, c in covered.items() if patch_id in c.patches}
    wanted = {pid for pid in result.wanted.get(patch_id, ()) if _alive(pid)}
    t.wanted = len(wanted)
    t.missing = sorted(pid for pid in wanted if t.carriers.get(pid) != version)
    t.extra = sorted(
        pid for pid in result.unwanted.get(patch_id, ()) if pid in t.carriers and _alive(pid)
    )  # fmt: skip
    return t


def settle(agent: Agent, patch_id: str, timeout: float) -> dict[str, Any]:
    """Wait until the running processes are as the policy says for `patch_id` (see
    the module's docstring); what they carry then. AgentError after `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    after = agent.passes_begun()
    while True:
        stored = agent._stored(patch_id)  # UnknownPatch if it left the store meanwhile
        agent.wake()
        result = agent.await_pass(after, deadline)
        if result is None:
            raise AgentError(_not_settled(agent, patch_id, stored.version, timeout, None),
                             patch_id=patch_id)  # fmt: skip
        t = tally(agent, patch_id, stored.version, result)
        if t.settled:
            return {
                "patch_id": patch_id, "version": stored.version,
                "state": "enabled" if t.carry else "disabled", "carriers": t.carrying(),
                "wanted": t.wanted, "seconds": round(time.monotonic() - started, 3),
            }  # fmt: skip
        if time.monotonic() + RETRY >= deadline:
            raise AgentError(_not_settled(agent, patch_id, stored.version, timeout, t),
                             patch_id=patch_id)  # fmt: skip
        time.sleep(RETRY)
        after = result.number


def _not_settled(agent: Agent, patch_id: str, version: int, timeout: float, t: Tally | None) -> str:
    head = f"{patch_id} v{version}: not settled within {timeout:g} s"
    if t is None:
        return (f"{head}: no pass over the running processes ended in that time; "
                "try a longer --timeout")  # fmt: skip
    lines = []
    for pid in t.missing + t.extra:
        why = agent.reconciler.failure(pid, patch_id) or "not done yet"
        doing = "to apply" if pid in t.missing else "to remove"
        lines.append(f"pid {pid} ({_exe(pid)}) {doing}: {why}")
    shown = "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
    if t.carry:
        return (f"{head}: {t.wanted - len(t.missing)} of {t.wanted} matching processes carry "
                f"it; {shown}")  # fmt: skip
    return f"{head}: {len(t.extra)} processes still carry it; {shown}"

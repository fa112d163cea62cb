"""The fleet server's answer applied as the agent's policy (docs/agent.md, "Fleet"):
the relevant patches downloaded through TUF (`server.updater.PatchUpdater`,
imported lazily: TUF is heavy) and added to the store as `agent add` does, their
states, the exclusions (the server's replace the local ones), and revocations
(disabled at once, removed live, then dropped from the store). Every change makes
the agent reconcile live.

Each part of the answer is taken on its own: a patch entry the agent cannot read
is skipped (and said once), never the rest of the answer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from micropatch.agent.events import Event
from micropatch.agent.policy import DISABLED, ENABLED, Exclusion, exclusion
from micropatch.errors import MicropatchError

if TYPE_CHECKING:
    from micropatch.agent.service import Agent
    from micropatch.agent.store import AnyStored


def _downloaded(stored: AnyStored) -> str:
    return f"downloaded {stored.path.name} from the fleet repository"


def _entries(value: Any, *keys: str) -> list[dict[str, Any]]:
    """The dict entries of a list that have these keys (the rest are not read)."""
    if not isinstance(value, list):
        return []
    return [e for e in value if isinstance(e, dict) and all(k in e for k in keys)]


class Answer:
    """Applies check-in answers; keeps what must outlive one (revocations in progress,
    what was already said)."""

    def __init__(self, agent: Agent, tuf_dir: Path) -> None:
        self.agent = agent
        self.tuf_dir = tuf_dir
        self.said: dict[str, str] = {}
        self.revoking: dict[str, int] = {}  # patch id -> the agent's pass count then

    def say(self, key: str, message: str, kind: str = "agent", **fields: Any) -> None:
        """An event, once per distinct message under `key` (retried silently after)."""
        if self.said.get(key) == message:
            return
        self.said[key] = message
        data = {"fleet": True, **fields.pop("data", {})}
        self.agent.report(Event(kind, time.time(), message=message, data=data, **fields))

    def apply(self, answer: dict[str, Any], repository: str) -> None:
        agent = self.agent
        changed = False
        for revoked in _entries(answer.get("revoked"), "patch_id", "version"):
            changed |= self._revoke(revoked)
        self.drop_revoked()
        relevant = [
            p for p in _entries(answer.get("patches"), "patch_id", "version", "target", "state")
            if p["patch_id"] not in self.revoking
        ]  # fmt: skip
        changed |= self._download(relevant, repository)
        given = answer.get("policy")
        policy: dict[str, Any] = given if isinstance(given, dict) else {}
        states = {d["patch_id"]: d for d in _entries(policy.get("patches"), "patch_id", "state")}
        states.update({p["patch_id"]: p for p in relevant})
        for patch_id, decision in states.items():
            stored = agent.store.get(str(patch_id))
            if stored is None or patch_id in self.revoking:
                continue
            wanted = decision["state"]
            if wanted not in (ENABLED, DISABLED) or agent.state.state(stored.id) == wanted:
                continue
            agent.state.set_state(stored.id, wanted)
            changed = True
            agent.report(Event(
                "agent" if wanted == ENABLED else "disabled", time.time(), patch_id=stored.id,
                version=stored.version,
                message=f"{stored.id} {wanted} by the fleet policy "
                f"(decided by {decision.get('decided_by') or 'the default'})",
                data={"fleet": True, "decided_by": decision.get("decided_by")},
            ))  # fmt: skip
        changed |= self._exclusions(_entries(policy.get("exclusions"), "kind", "value"))
        if changed:
            agent._policy_changed()

    def _download(self, relevant: list[dict[str, Any]], repository: str) -> bool:
        agent = self.agent
        wanted = []
        for p in relevant:
            stored = agent.store.get(str(p["patch_id"]))
            if not isinstance(p["version"], int):
                continue
            if stored is not None and stored.version >= p["version"]:
                continue
            wanted.append(p)
        if not wanted:
            return False
        from micropatch.server.updater import PatchUpdater  # lazily: TUF is heavy

        updater = PatchUpdater(repository, self.tuf_dir, keys=agent.store.keys())
        try:
            updater.refresh()
        except Exception as e:  # UpdateError, or what python-tuf raised unexplained
            self._download_failed("refresh", None, e)
            return False
        added = False
        for p in wanted:
            target = str(p["target"])
            try:
                data = updater.download(target)  # TUF: length and hash as signed
                state = p["state"] if p.get("state") in (ENABLED, DISABLED) else None
                agent.keep(data, target, state, _downloaded, {"fleet": True, "target": target})
            except Exception as e:
                self._download_failed(target, p, e)
                continue
            self.said.pop(target, None)
            added = True
        return added

    def _download_failed(self, what: str, patch: dict[str, Any] | None, e: Exception) -> None:
        self.say(
            what, f"fleet repository: {what}: {e}", "rejected" if patch is not None else "agent",
            patch_id=patch["patch_id"] if patch else None,
            version=patch["version"] if patch else None,
            data={"target": what, "error": type(e).__name__},
        )  # fmt: skip

    def _revoke(self, revoked: dict[str, Any]) -> bool:
        """Disable a revoked patch at once (removed live); it leaves the store once no
        process carries it (`drop_revoked`)."""
        agent = self.agent
        patch_id = str(revoked["patch_id"])
        stored = agent.store.get(patch_id)
        if stored is None or patch_id in self.revoking:
            return False
        artifact = stored.admitted.artifact
        same = stored.version == revoked["version"] or (
            artifact is not None and artifact.id == revoked.get("artifact_id")
        )
        if not same:
            return False  # another version is stored: not this one's revocation
        self.revoking[patch_id] = agent.passes
        agent.state.set_state(patch_id, DISABLED)
        agent.report(Event(
            "disabled", time.time(), patch_id=patch_id, version=stored.version,
            message=f"{patch_id} version {stored.version} revoked by the fleet server: "
            "removing it from every process, then from the store",
            data={"fleet": True, "revoked": True},
        ))  # fmt: skip
        return True

    def drop_revoked(self) -> None:
        agent = self.agent
        for patch_id, passes in list(self.revoking.items()):
            stored = agent.store.get(patch_id)
            if stored is None:
                del self.revoking[patch_id]
                continue
            everywhere = agent.reconciler.python.covered(agent.reconciler.covered().values())
            carried = any(patch_id in c.patches for c in everywhere)
            if carried or agent.passes <= passes:
                continue  # the reconciler has not removed it everywhere yet
            agent.drop(patch_id, "revoked by the fleet server")
            del self.revoking[patch_id]

    def _exclusions(self, given: list[dict[str, Any]]) -> bool:
        wanted: set[Exclusion] = set()
        for e in given:
            try:
                wanted.add(exclusion(str(e["kind"]), str(e["value"]), e.get("patch_id")))
            except MicropatchError as error:
                self.say(f"exclusion {e}", f"fleet exclusion ignored: {error}",
                         data={"exclusion": e})  # fmt: skip
        state = self.agent.state
        current = set(state.exclusions())
        for new in wanted - current:
            state.exclude(new)
        for old in current - wanted:
            state.unexclude(old)
        return wanted != current

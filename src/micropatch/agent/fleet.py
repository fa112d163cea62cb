"""The agent's side of the fleet server (docs/agent.md, "Fleet"; docs/server.md,
"Agent protocol"): enrollment, then a check-in every `checkin_interval`.

A check-in sends the host's inventory (the executable modules mapped by its
processes, with their build-ids and SHA-256, identified once per file
version) and the applied state per process (what the reconciler knows) when
they changed since the server last stored them (otherwise only their digest),
and the events recorded since the last successful check-in (by id: the cursor is in
agent.db and moves only when the server has answered, so an event is never
lost and, after a restart, never sent twice). The answer is applied as the
agent's policy: the relevant patches are downloaded through TUF
(`server.updater.PatchUpdater`, imported lazily in this thread) and added to
the store as `agent add` does; their states and the exclusions are the
server's; revoked patches are disabled (removed live from every process) and
then dropped from the store.

The server unreachable: the agent goes on with what it has, retries with
exponential backoff, and says so in one "agent" event (and one when it is back).

Layering: nothing of the server but `server.updater` is imported here; HTTP is
the standard library's (urllib), so the API client costs no dependency.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from micropatch.agent.events import KINDS, Event
from micropatch.agent.policy import DISABLED, ENABLED, Exclusion, exclusion
from micropatch.agent.store import AnyStored, write_private
from micropatch.errors import AgentError, MicropatchError
from micropatch.files import read_bounded

if TYPE_CHECKING:
    from micropatch.agent.service import Agent

log = logging.getLogger(__name__)

FLEET_FILE = "fleet.json"  # in the state directory, 0600: the credential is in it
ROOT_NAME = "repository-root.json"  # the trusted TUF root, beside the trusted keys
EVENT_BATCH = 1000  # events per check-in (more wait for the next one, sent at once)
MAX_BACKOFF = 600.0
MAX_MODULES = 5000  # modules in one inventory
IDENTIFY_BUDGET = 2.0  # seconds of hashing new module files per inventory scan
HTTP_TIMEOUT = 30.0
MAX_FLEET_FILE = 1 << 20  # fleet.json, the repository's root metadata
SERVER_EXTRA = ("tuf",)  # what the TUF client (server/updater.py) needs beyond the agent


class HttpError(AgentError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _agent_version() -> str:
    from micropatch import __version__

    return str(__version__)


def _machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            value = Path(path).read_text().strip()
            if value:
                return value[:64]
    return None


def post_json(url: str, body: dict[str, Any], credential: str | None = None) -> dict[str, Any]:
    """POST JSON, the answer's JSON. URLError/OSError when the server cannot be reached,
    HttpError for an error status."""
    request = urllib.request.Request(
        url, data=json.dumps(body, default=str).encode(), method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json",
                 **({"Authorization": f"Bearer {credential}"} if credential else {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read() or b"{}").get("detail", "")
        except (ValueError, AttributeError, OSError):
            detail = ""
        raise HttpError(e.code, f"{url}: HTTP {e.code}: {detail or e.reason}") from None
    if not isinstance(answer, dict):
        raise HttpError(200, f"{url}: the answer is not a JSON object")
    return answer


@dataclass(frozen=True)
class Enrollment:
    """What `agent enroll` obtained, kept in STATE/fleet.json (0600)."""

    server: str
    credential: str
    repository: str
    host_id: int
    group: str
    checkin_interval: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def inventory_digest(modules: list[dict[str, Any]], processes: list[dict[str, Any]]) -> str:
    """A digest of the inventory, whatever order the scan found it in: the check-in
    sends the inventory itself only when the server does not hold this digest."""
    canonical = json.dumps(
        [sorted(modules, key=lambda x: json.dumps(x, sort_keys=True)), processes],
        sort_keys=True, separators=(",", ":"),
    )  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def _downloaded(stored: AnyStored) -> str:
    return f"downloaded {stored.path.name} from the fleet repository"


class Inventory:
    """The executable modules mapped by the host's processes, identified once per file
    version (device, inode, size, mtime): later scans read only /proc/PID/maps."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, int], tuple[str | None, str]] = {}

    def scan(self) -> list[dict[str, Any]]:
        from micropatch.elf.identity import identify
        from micropatch.process.maps import read_maps
        from micropatch.process.select import all_pids

        found: dict[tuple[str, int], dict[str, Any]] = {}
        budget = time.monotonic() + IDENTIFY_BUDGET
        for pid in all_pids():
            try:
                mappings = read_maps(pid)
            except (MicropatchError, OSError):
                continue
            for m in mappings:
                if "x" not in m.perms or not m.inode or not m.path.startswith("/"):
                    continue
                if m.path.startswith("/memfd:") or (m.dev, m.inode) in found:
                    continue
                if len(found) >= MAX_MODULES:
                    break
                path = m.path.removesuffix(" (deleted)")
                try:
                    with open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", "rb") as f:
                        st = os.fstat(f.fileno())
                        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                        known = self._known.get(key)
                        if known is None:
                            if time.monotonic() > budget:
                                continue  # the next scan identifies it
                            identity = identify(f)
                            known = self._known[key] = (identity.build_id, identity.sha256)
                except (OSError, MicropatchError):
                    continue
                found[(m.dev, m.inode)] = {
                    "name": os.path.basename(path)[:255], "path": path[:1024],
                    "build_id": known[0], "sha256": known[1],
                }  # fmt: skip
        return list(found.values())


class Fleet:
    """The fleet part of the agent: enrollment and the check-in thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.path = agent.paths.state_dir / FLEET_FILE
        self.tuf_dir = agent.paths.state_dir / "tuf"
        self.db = agent.db  # its `fleet` table keeps the event cursor (agent/db.py)
        self.enrollment: Enrollment | None = self._load()
        self.inventory = Inventory()
        self._modules: list[dict[str, Any]] = []
        self._scanned: float | None = None  # time.monotonic() of the last scan; None: never
        self._acknowledged: str | None = None  # the inventory digest the server holds
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._lock = threading.Lock()
        self.failures = 0
        self.last_checkin: float | None = None
        self.last_error: str | None = None
        self._said: dict[str, str] = {}
        self._revoking: dict[str, int] = {}  # patch id -> the agent's pass count at the revocation

    # --- life ---------------------------------------------------------------

    def start(self) -> None:
        """The check-in thread, if enrolled (an agent that never enrolls runs none)."""
        self._started = True
        if self.enrollment is not None:
            self._run_thread()

    def _run_thread(self) -> None:
        with self._lock:
            if self._thread is None and self._started and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._loop, name="fleet", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a daemon thread: a hung request never holds the stop

    def wake(self) -> None:
        self._wake.set()

    # --- enrollment -----------------------------------------------------------

    def _load(self) -> Enrollment | None:
        try:
            data = json.loads(read_bounded(self.path, MAX_FLEET_FILE))
            return Enrollment(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("%s: unreadable (%s): not enrolled", self.path, e)
            return None

    def enroll(self, url: str, token: str, root: str | None) -> dict[str, Any]:
        """Trade a one-time token for this host's credential; keep it (0600) with the
        server's and the repository's URLs; check in at once."""
        url = url.rstrip("/")
        missing = [m for m in SERVER_EXTRA if importlib.util.find_spec(m) is None]
        if missing:
            raise AgentError(
                f"enrolling needs the fleet client ({', '.join(missing)} missing): "
                "install micropatch with its server extra, pip install 'micropatch[server]', "
                "and restart the agent"
            )
        root_bytes = root.encode() if root is not None else self._trusted_root()
        try:
            json.loads(root_bytes)
        except ValueError:
            raise AgentError("the repository's root metadata is not JSON") from None
        body = {
            "token": token, "hostname": platform.node()[:255] or "localhost",
            "machine_id": _machine_id(), "kernel": os.uname().release,
            "agent_version": _agent_version(),
        }  # fmt: skip
        try:
            answer = post_json(f"{url}/api/v1/enroll", body)
        except HttpError as e:
            raise AgentError(f"enrollment refused: {e}") from None
        except (OSError, urllib.error.URLError) as e:
            raise AgentError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
        enrollment = Enrollment(
            server=url, credential=str(answer["credential"]),
            repository=str(answer["repository"]), host_id=int(answer["host_id"]),
            group=str(answer["group"]), checkin_interval=float(answer["checkin_interval"]),
        )  # fmt: skip
        metadata = self.tuf_dir / "metadata"
        metadata.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(metadata / "root.json", root_bytes)
        self._start_cursor()
        write_private(self.path, json.dumps(enrollment.to_json(), indent=1).encode())
        self.enrollment = enrollment
        self.agent.report(Event(
            "agent", time.time(), pid=os.getpid(),
            message=f"enrolled with {url} as host {enrollment.host_id} "
            f"(group {enrollment.group})",
            data={"server": url, "host_id": enrollment.host_id, "group": enrollment.group},
        ))  # fmt: skip
        self.wake()
        self._run_thread()
        return {"server": url, "host_id": enrollment.host_id, "group": enrollment.group,
                "repository": enrollment.repository,
                "checkin_interval": self.interval()}  # fmt: skip

    def _trusted_root(self) -> bytes:
        path = self.agent.paths.trust_dir / ROOT_NAME
        try:
            return read_bounded(path, MAX_FLEET_FILE)
        except OSError:
            raise AgentError(
                f"no trusted root for the repository: give --root ROOT.json (the "
                f"1.root.json of `micropatch repo init`), or install it as {path}"
            ) from None

    def interval(self) -> float:
        configured = self.agent.config.checkin_interval
        if configured is not None:
            return float(configured)
        return self.enrollment.checkin_interval if self.enrollment else 60.0

    def status(self) -> dict[str, Any] | None:
        e = self.enrollment
        if e is None:
            return None
        return {
            "server": e.server, "host_id": e.host_id, "group": e.group,
            "repository": e.repository, "checkin_interval": self.interval(),
            "last_checkin": self.last_checkin, "failures": self.failures,
            "last_error": self.last_error, "event_cursor": self.cursor(),
        }  # fmt: skip

    # --- the loop -------------------------------------------------------------

    def _loop(self) -> None:
        due = 0.0  # monotonic time of the next check-in
        while not self._stopping.is_set():
            if self._wake.is_set():
                self._wake.clear()
                due = 0.0
            if self.enrollment is None:
                self._wake.wait(3600.0)
                continue
            if time.monotonic() >= due:
                delay = self.interval()
                try:
                    self.check_in()
                except Exception as e:
                    delay = self._failed(e)
                due = time.monotonic() + delay
            if self._revoking:
                with contextlib.suppress(Exception):
                    self._drop_revoked()
            # Revocations in progress are looked at often, the server every interval.
            wait = due - time.monotonic()
            self._wake.wait(max(0.0, min(wait, 0.2) if self._revoking else wait))

    def _failed(self, error: BaseException) -> float:
        self.failures += 1
        reason = str(getattr(error, "reason", None) or error)
        self.last_error = reason
        if not isinstance(error, OSError | urllib.error.URLError | HttpError):
            log.exception("check-in failed")
        if self.failures == 1:
            assert self.enrollment is not None
            self.agent.report(Event(
                "agent", time.time(), pid=os.getpid(),
                message=f"fleet server {self.enrollment.server} unreachable ({reason}): "
                "working on with the patches and policy at hand, retrying with backoff",
                data={"server": self.enrollment.server, "error": reason},
            ))  # fmt: skip
        return float(min(MAX_BACKOFF, self.interval() * 2 ** min(self.failures, 16)))

    def check_in(self) -> dict[str, Any]:
        """One check-in: report, then apply the answer."""
        enrollment = self.enrollment
        assert enrollment is not None
        events, cursor = self._events()
        modules, processes = self._inventory(), self._processes()
        digest = inventory_digest(modules, processes)
        body: dict[str, Any] = {
            "hostname": platform.node()[:255] or None, "kernel": os.uname().release,
            "agent_version": _agent_version(), "inventory_digest": digest, "events": events,
        }  # fmt: skip
        if digest != self._acknowledged:  # the server does not hold this inventory yet
            body["modules"], body["processes"] = modules, processes
        answer = post_json(f"{enrollment.server}/api/v1/checkin", body, enrollment.credential)
        self._set_cursor(cursor)  # the server has them: never sent again
        # What the server holds now: when it is not this digest (a server restored
        # from an older backup, say), the next check-in sends the inventory again.
        acknowledged = answer.get("inventory_digest")
        self._acknowledged = acknowledged if isinstance(acknowledged, str) else None
        if self.failures:
            self.agent.report(Event(
                "agent", time.time(), pid=os.getpid(),
                message=f"fleet server {enrollment.server} reachable again after "
                f"{self.failures} failed check-ins",
            ))  # fmt: skip
        self.failures, self.last_error, self.last_checkin = 0, None, time.time()
        try:
            self._update_enrollment(answer)
            self.apply(answer)
        except Exception as e:  # the check-in itself succeeded: not "unreachable"
            log.exception("applying the fleet server's answer")
            self._say(f"answer: {type(e).__name__}", f"cannot apply the fleet server's answer: {e}")
        if len(events) >= EVENT_BATCH:
            self.wake()  # more to send
        return answer

    def _update_enrollment(self, answer: dict[str, Any]) -> None:
        e = self.enrollment
        assert e is not None
        new = Enrollment(
            e.server, e.credential, str(answer.get("repository", e.repository)), e.host_id,
            str(answer.get("group", e.group)),
            float(answer.get("checkin_interval", e.checkin_interval)),
        )  # fmt: skip
        if new != e:
            write_private(self.path, json.dumps(new.to_json(), indent=1).encode())
            self.enrollment = new

    # --- what is sent ---------------------------------------------------------

    def cursor(self) -> int:
        rows = self.db.rows("SELECT value FROM fleet WHERE key = 'event_cursor'")
        return int(rows[0]["value"]) if rows else 0

    def _start_cursor(self) -> None:
        """At the first enrollment: the history before it is not the fleet's business."""
        with self.db.write() as c:
            c.execute(
                "INSERT OR IGNORE INTO fleet (key, value) "
                "SELECT 'event_cursor', COALESCE(MAX(id), 0) FROM events"
            )

    def _set_cursor(self, cursor: int) -> None:
        with self.db.write() as c:
            c.execute(
                "INSERT INTO fleet (key, value) VALUES ('event_cursor', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(cursor),),
            )

    def _events(self) -> tuple[list[dict[str, Any]], int]:
        cursor = self.cursor()
        rows = self.db.rows(
            "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (cursor, EVENT_BATCH)
        )
        events = []
        for r in rows:
            cursor = max(cursor, int(r["id"]))
            if r["kind"] not in KINDS:
                continue
            try:
                data = json.loads(r["data"])
            except ValueError:
                data = {}
            events.append({
                "kind": r["kind"], "time": r["time"],
                "pid": r["pid"] if r["pid"] and r["pid"] > 0 else None,
                "exe": (r["exe"] or None) and r["exe"][:1024],
                "patch_id": (r["patch_id"] or None) and r["patch_id"][:128],
                "version": r["version"] if r["version"] is None or r["version"] >= 0 else None,
                "module": (r["module"] or None) and r["module"][:255],
                "message": (r["message"] or "")[:4096],
                "data": data if isinstance(data, dict) else {"value": data},
            })  # fmt: skip
        return events, cursor

    def _inventory(self) -> list[dict[str, Any]]:
        every = self.agent.config.inventory_interval
        now = time.monotonic()  # since boot: it may be smaller than `every`
        if self._scanned is None or not self._modules or now - self._scanned >= every:
            self._modules = self.inventory.scan() + self.agent.python_pass.modules()
            self._scanned = now
        return self._modules

    def _processes(self) -> list[dict[str, Any]]:
        from micropatch.process.select import read_info

        carried = {
            pid: (info.exe, p) for pid, (info, p) in self.agent.python_pass.carried().items()
        }
        for c in self.agent.reconciler.covered().values():
            if c.patches:  # a Python interpreter may carry native patches too
                carried[c.pid] = (c.exe, {**carried.get(c.pid, ("", {}))[1], **c.patches})
        out = []
        for pid, (exe, patches) in sorted(carried.items()):
            unit = user = None
            with contextlib.suppress(MicropatchError, OSError):
                info = read_info(pid)
                unit, user = info.unit, str(info.uid)
            out.append({
                "pid": pid, "exe": exe or None, "unit": unit, "user": user,
                "patches": [{"patch_id": p, "version": v, "state": "applied"}
                            for p, v in sorted(patches.items())],
            })  # fmt: skip
        return out

    # --- what is received -----------------------------------------------------

    def apply(self, answer: dict[str, Any]) -> None:
        """The server's answer as the agent's policy: downloads, states, exclusions,
        revocations. Every change makes the agent reconcile live."""
        agent = self.agent
        changed = False
        for revoked in answer.get("revoked", []):
            changed |= self._revoke(revoked)
        self._drop_revoked()
        relevant = [p for p in answer.get("patches", []) if p["patch_id"] not in self._revoking]
        changed |= self._download(relevant)
        states = {d["patch_id"]: d for d in answer.get("policy", {}).get("patches", [])}
        states.update({p["patch_id"]: p for p in relevant})
        for patch_id, decision in states.items():
            stored = agent.store.get(patch_id)
            if stored is None or patch_id in self._revoking:
                continue
            wanted = decision["state"]
            if wanted not in (ENABLED, DISABLED) or agent.state.state(patch_id) == wanted:
                continue
            agent.state.set_state(patch_id, wanted)
            changed = True
            agent.report(Event(
                "agent" if wanted == ENABLED else "disabled", time.time(), patch_id=patch_id,
                version=stored.version,
                message=f"{patch_id} {wanted} by the fleet policy "
                f"(decided by {decision.get('decided_by') or 'the default'})",
                data={"fleet": True, "decided_by": decision.get("decided_by")},
            ))  # fmt: skip
        changed |= self._exclusions(answer.get("policy", {}).get("exclusions", []))
        if changed:
            agent._policy_changed()

    def _download(self, relevant: list[dict[str, Any]]) -> bool:
        agent = self.agent
        wanted = []
        for p in relevant:
            stored = agent.store.get(p["patch_id"])
            if stored is not None and stored.version >= int(p["version"]):
                continue
            wanted.append(p)
        if not wanted:
            return False
        from micropatch.server.updater import PatchUpdater  # lazily: TUF is heavy

        assert self.enrollment is not None
        updater = PatchUpdater(self.enrollment.repository, self.tuf_dir, keys=agent.store.keys())
        try:
            updater.refresh()
        except Exception as e:  # UpdateError, or what python-tuf raised unexplained
            self._download_failed("refresh", None, e)
            return False
        added = False
        for p in wanted:
            target = p["target"]
            try:
                data = updater.download(target)  # TUF: length and hash as signed
                state = p["state"] if p.get("state") in (ENABLED, DISABLED) else None
                agent.keep(data, target, state, _downloaded, {"fleet": True, "target": target})
            except Exception as e:
                self._download_failed(target, p, e)
                continue
            self._said.pop(target, None)
            added = True
        return added

    def _say(self, key: str, message: str) -> None:
        """An "agent" event, once per distinct message (retried silently after)."""
        if self._said.get(key) == message:
            return
        self._said[key] = message
        self.agent.report(Event("agent", time.time(), pid=os.getpid(), message=message,
                                data={"fleet": True}))  # fmt: skip

    def _download_failed(self, what: str, patch: dict[str, Any] | None, e: Exception) -> None:
        message = str(e)
        if self._said.get(what) == message:
            return  # said once; retried at every check-in
        self._said[what] = message
        self.agent.report(Event(
            "rejected" if patch is not None else "agent", time.time(),
            patch_id=patch["patch_id"] if patch else None,
            version=patch["version"] if patch else None,
            message=f"fleet repository: {what}: {message}",
            data={"fleet": True, "target": what, "error": type(e).__name__},
        ))  # fmt: skip

    def _revoke(self, revoked: dict[str, Any]) -> bool:
        """Disable a revoked patch at once (removed live); it leaves the store once no
        process carries it (`_drop_revoked`)."""
        agent = self.agent
        patch_id = revoked["patch_id"]
        stored = agent.store.get(patch_id)
        if stored is None or patch_id in self._revoking:
            return False
        artifact = stored.admitted.artifact
        same = stored.version == int(revoked["version"]) or (
            artifact is not None and artifact.id == revoked.get("artifact_id")
        )
        if not same:
            return False  # another version is stored: not this one's revocation
        self._revoking[patch_id] = agent.passes
        agent.state.set_state(patch_id, DISABLED)
        agent.report(Event(
            "disabled", time.time(), patch_id=patch_id, version=stored.version,
            message=f"{patch_id} version {stored.version} revoked by the fleet server: "
            "removing it from every process, then from the store",
            data={"fleet": True, "revoked": True},
        ))  # fmt: skip
        return True

    def _drop_revoked(self) -> None:
        agent = self.agent
        for patch_id, passes in list(self._revoking.items()):
            stored = agent.store.get(patch_id)
            if stored is None:
                del self._revoking[patch_id]
                continue
            carried = any(patch_id in c.patches for c in agent.reconciler.covered().values())
            if carried or agent.passes <= passes:
                continue  # the reconciler has not removed it everywhere yet
            agent.drop(patch_id, "revoked by the fleet server")
            del self._revoking[patch_id]

    def _exclusions(self, given: list[dict[str, Any]]) -> bool:
        wanted: set[Exclusion] = set()
        for e in given:
            try:
                wanted.add(exclusion(e["kind"], e["value"], e.get("patch_id")))
            except (MicropatchError, KeyError) as error:
                key = f"exclusion {e}"
                if self._said.get(key) is None:
                    self._said[key] = str(error)
                    self.agent.report(Event(
                        "agent", time.time(), message=f"fleet exclusion ignored: {error}",
                        data={"fleet": True, "exclusion": e},
                    ))  # fmt: skip
        state = self.agent.state
        current = set(state.exclusions())
        for new in wanted - current:
            state.exclude(new)
        for old in current - wanted:
            state.unexclude(old)
        return wanted != current

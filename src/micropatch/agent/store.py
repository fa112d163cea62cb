"""The agent's store and policy state.

`ArtifactStore`: signed artifacts in STATE/store/, one file per patch id (its
newest version), native or CPython (`python_patches()`, applied by
`agent.pythonpass`). Each is admitted with `trust.admission.admit_any` (keys:
the trust directory's *.pub) when it is loaded, and its signatures are checked again
against the keys trusted at that moment before each apply. An artifact that
does not pass — dropped into the store by hand, corrupt, signed by a key no
longer trusted — is moved to store/rejected/ and never applied.

`PolicyState`: what the operator decided (enabled or disabled per patch,
exclusions), what the agent decided (auto-disabled (patch, exe) pairs), pins
of `micropatch apply|remove --pid` through the agent, and the blocked counts
already reported, in agent.db, each change one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from micropatch.agent.db import Database
from micropatch.agent.events import Event, EventSink
from micropatch.agent.paths import AgentPaths
from micropatch.agent.policy import DISABLED, ENABLED, Exclusion, PolicyView
from micropatch.errors import (
    AgentError,
    ArtifactError,
    Downgrade,
    MicropatchError,
    NotAdmitted,
    SignatureError,
)
from micropatch.files import write_atomic
from micropatch.trust.admission import Admitted, AdmittedPython, admit, admit_any
from micropatch.trust.artifact import verify
from micropatch.trust.envelope import SUFFIX, read
from micropatch.trust.keys import PublicKey, load_public_key

log = logging.getLogger(__name__)


class _Identified:
    admitted: Admitted | AdmittedPython

    @property
    def id(self) -> str:
        return self.admitted.id

    @property
    def version(self) -> int:
        return self.admitted.version


@dataclass(frozen=True)
class Stored(_Identified):
    """An admitted (native) artifact in the store."""

    admitted: Admitted
    path: Path


@dataclass(frozen=True)
class StoredPython(_Identified):
    """An admitted CPython artifact in the store."""

    admitted: AdmittedPython
    path: Path


AnyStored = Stored | StoredPython


class ArtifactStore:
    """Signed artifacts, admitted; `patches()` is what the agent may apply."""

    def __init__(self, paths: AgentPaths, report: EventSink) -> None:
        self.paths = paths
        self._report = report
        self._lock = threading.RLock()
        self._patches: dict[str, Stored] = {}
        self._python: dict[str, StoredPython] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # file name -> (size, mtime_ns)
        self._keys: tuple[tuple[tuple[str, int, int], ...], tuple[PublicKey, ...]] | None = None

    # --- keys ---------------------------------------------------------------

    def keys(self) -> list[PublicKey]:
        """The keys trusted now: every readable *.pub of the trust directory. A key
        file that cannot be loaded is left out (trusting less is the safe side), and
        said in an event."""
        try:
            files = sorted(self.paths.trust_dir.glob("*.pub"))
            seen = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
        except OSError:
            files, seen = [], ()
        with self._lock:
            if self._keys is not None and self._keys[0] == seen:
                return list(self._keys[1])  # the same files as last time: no re-parse
        keys = []
        for path in files:
            try:
                keys.append(load_public_key(path))
            except MicropatchError as e:
                self._report(Event("agent", time.time(), message=f"ignored key file: {e}"))
        with self._lock:
            self._keys = (seen, tuple(keys))
        return keys

    def admit_bytes(self, data: bytes, name: str) -> Admitted:
        """The admission policy with the keys trusted now (no unsigned patch, ever)."""
        return admit(data, name=name, keys=self._trusted(name))

    def admit_any_bytes(self, data: bytes, name: str) -> Admitted | AdmittedPython:
        """`admit_bytes` for an artifact of either runtime."""
        return admit_any(data, name=name, keys=self._trusted(name))

    def _trusted(self, name: str) -> list[PublicKey]:
        keys = self.keys()
        if not keys:
            raise NotAdmitted(
                f"{name}: no trusted keys in {self.paths.trust_dir}: install the signers' "
                "public keys (*.pub) there"
            )
        return keys

    # --- the store ----------------------------------------------------------

    def patches(self) -> dict[str, Stored]:
        """The native patches."""
        with self._lock:
            return dict(self._patches)

    def python_patches(self) -> dict[str, AdmittedPython]:
        with self._lock:
            return {patch_id: s.admitted for patch_id, s in self._python.items()}

    def _everything(self) -> list[tuple[str, AnyStored]]:
        return [*self._patches.items(), *self._python.items()]

    def get(self, patch_id: str) -> AnyStored | None:
        """A stored patch of either runtime."""
        with self._lock:
            return self._patches.get(patch_id) or self._python.get(patch_id)

    def sync(self) -> bool:
        """Read what changed in the store directory since the last call (every file at
        the first): admit new files, reject bad ones, forget deleted ones. Whether
        the set of patches changed."""
        with self._lock:
            try:
                entries = {
                    e.name: e for e in os.scandir(self.paths.store)
                    if e.is_file(follow_symlinks=False) and e.name.endswith(SUFFIX)
                    and not e.name.startswith(".")
                }  # fmt: skip
            except FileNotFoundError:
                entries = {}
            changed = False
            for name in set(self._seen) - set(entries):
                del self._seen[name]
                for patch_id, stored in self._everything():
                    if stored.path.name == name:
                        self._patches.pop(patch_id, None)
                        self._python.pop(patch_id, None)
                        changed = True
                        self._report(Event(
                            "agent", time.time(), patch_id=patch_id, version=stored.version,
                            message=f"{name} was deleted from the store: no longer managed",
                        ))  # fmt: skip
            for name, entry in sorted(entries.items()):
                st = entry.stat(follow_symlinks=False)
                if self._seen.get(name) == (st.st_size, st.st_mtime_ns):
                    continue
                changed |= self._load(Path(entry.path))
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(entry.path)
                    self._seen[name] = (st.st_size, st.st_mtime_ns)
            return changed

    def _load(self, path: Path) -> bool:
        try:
            admitted = self.admit_any_bytes(read(path), str(path))
        except MicropatchError as e:
            self.reject(path, e)
            return False
        if isinstance(admitted, AdmittedPython):
            return self._load_python(admitted, path)
        current = self._patches.get(admitted.id)
        if current is not None and current.path != path:
            if current.version >= admitted.version:
                # a leftover of an interrupted replacement, or an older copy: the newest wins
                self._discard(path, f"older than {current.path.name}")
                return False
            self._discard(current.path, f"replaced by {path.name}")
        self._patches[admitted.id] = Stored(admitted, path)
        return current is None or current.path != path or current.version != admitted.version

    def _load_python(self, admitted: AdmittedPython, path: Path) -> bool:
        current = self._python.get(admitted.id)
        if current is not None and current.path != path:
            if current.version >= admitted.version:
                self._discard(path, f"older than {current.path.name}")
                return False
            self._discard(current.path, f"replaced by {path.name}")
        self._python[admitted.id] = StoredPython(admitted, path)
        return current is None or current.path != path or current.version != admitted.version

    def _discard(self, path: Path, why: str) -> None:
        log.info("store: removing %s (%s)", path.name, why)
        self._seen.pop(path.name, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def reject(self, path: Path, error: BaseException) -> Path | None:
        """Move a refused artifact aside (store/rejected/) with an event; never applied."""
        with self._lock:
            self._seen.pop(path.name, None)
            for patch_id, stored in self._everything():
                if stored.path == path:
                    self._patches.pop(patch_id, None)
                    self._python.pop(patch_id, None)
            self.paths.rejected.mkdir(mode=0o700, parents=True, exist_ok=True)
            target: Path | None = self.paths.rejected / f"{path.name}.{int(time.time() * 1e3)}"
            try:
                os.replace(path, target)  # type: ignore[arg-type]
            except FileNotFoundError:
                target = None
            except OSError as e:
                log.warning("cannot move %s aside: %s", path, e)
                target = None
        fields = error.fields() if isinstance(error, MicropatchError) else {"error": str(error)}
        self._report(Event(
            "rejected", time.time(), patch_id=fields.get("patch_id"),  # type: ignore[arg-type]
            message=f"{path.name}: {error}",
            data={**fields, "file": path.name, "moved_to": str(target) if target else None},
        ))  # fmt: skip
        return target

    def add(self, data: bytes, name: str) -> tuple[AnyStored, AnyStored | None]:
        """Admit an artifact (native or CPython) and copy it into the store (temporary
        file, then rename: the store never holds half a file). Returns it and the
        version it replaced. Refuses an older version than the stored one (Downgrade)."""
        admitted = self.admit_any_bytes(data, name)
        assert admitted.artifact is not None
        with self._lock:
            current = self._patches.get(admitted.id) or self._python.get(admitted.id)
            if current is not None and current.version > admitted.version:
                raise Downgrade(
                    f"the store holds {admitted.id} version {current.version}, newer than "
                    f"version {admitted.version} in {name}; the agent never goes back",
                    patch_id=admitted.id,
                )
            if current is not None and current.version == admitted.version:
                stored_id = current.admitted.artifact.id if current.admitted.artifact else None
                if stored_id == admitted.artifact.id:
                    return current, None  # the same artifact again: nothing to do
                raise AgentError(
                    f"the store holds another artifact of {admitted.id} version "
                    f"{admitted.version} ({current.path.name}); give a new build a new version",
                    patch_id=admitted.id,
                )
            path = self.paths.store / admitted.artifact.file_name
            write_private(path, data)
            self._patches.pop(admitted.id, None)
            self._python.pop(admitted.id, None)
            stored: AnyStored
            if isinstance(admitted, AdmittedPython):
                stored = self._python[admitted.id] = StoredPython(admitted, path)
            else:
                stored = self._patches[admitted.id] = Stored(admitted, path)
            st = path.stat()
            self._seen[path.name] = (st.st_size, st.st_mtime_ns)
            if current is not None:
                self._discard(current.path, f"replaced by {path.name}")
            return stored, current

    def drop(self, patch_id: str, why: str) -> AnyStored | None:
        """Take a patch out of the store (its file deleted): never applied again. The
        processes that carry it must have been unpatched first (the caller's job)."""
        with self._lock:
            stored = self._patches.pop(patch_id, None) or self._python.pop(patch_id, None)
            if stored is not None:
                self._discard(stored.path, why)
            return stored

    def recheck_python(self, patch_id: str) -> AdmittedPython:
        """`recheck` for a CPython patch."""
        stored = self._recheck(self._python.get(patch_id), patch_id)
        assert isinstance(stored, StoredPython)
        return stored.admitted

    def recheck(self, patch_id: str) -> Admitted:
        """The stored patch, its signatures checked again against the keys trusted now
        (a key removed from the trust directory, or expired, no longer admits it).
        A failure rejects the artifact and raises."""
        stored = self._recheck(self.get(patch_id), patch_id)
        assert isinstance(stored, Stored)
        return stored.admitted

    def _recheck(self, stored: AnyStored | None, patch_id: str) -> AnyStored:
        if stored is None:
            raise AgentError(f"patch {patch_id} is not in the store", patch_id=patch_id)
        artifact = stored.admitted.artifact
        try:
            if artifact is None:
                raise NotAdmitted(f"{stored.path.name} is not a signed artifact")
            keys = self.keys()
            if not keys:
                raise NotAdmitted(f"no trusted keys in {self.paths.trust_dir}")
            verify(artifact, keys)
        except (SignatureError, ArtifactError) as e:
            e.within(patch_id=patch_id)
            self.reject(stored.path, e)
            raise
        return stored


def write_private(path: Path, data: bytes) -> None:
    """Write a root-only (0600) file whole (micropatch.files.write_atomic), as AgentError."""
    try:
        write_atomic(path, data, mode=0o600)
    except OSError as e:
        raise AgentError(f"cannot write {path}: {e.strerror}") from e


class PolicyState:
    """The policy in agent.db. Every method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def state(self, patch_id: str) -> str | None:
        rows = self.db.rows("SELECT state FROM patches WHERE patch_id = ?", (patch_id,))
        return rows[0]["state"] if rows else None

    def ensure(self, patch_id: str, default: str) -> str:
        """The patch's state, set to `default` if it has none yet (a new patch)."""
        with self.db.write() as c:
            c.execute(
                "INSERT OR IGNORE INTO patches (patch_id, state, changed) VALUES (?, ?, ?)",
                (patch_id, default, time.time()),
            )
            return str(c.execute(
                "SELECT state FROM patches WHERE patch_id = ?", (patch_id,)
            ).fetchone()["state"])  # fmt: skip

    def set_state(self, patch_id: str, state: str) -> None:
        """Enable or disable a patch; enabling also lifts its crash auto-disables."""
        assert state in (ENABLED, DISABLED)
        with self.db.write() as c:
            c.execute(
                "INSERT INTO patches (patch_id, state, changed) VALUES (?, ?, ?) "
                "ON CONFLICT (patch_id) DO UPDATE SET state = excluded.state, "
                "changed = excluded.changed",
                (patch_id, state, time.time()),
            )
            if state == ENABLED:
                c.execute("DELETE FROM auto_disabled WHERE patch_id = ?", (patch_id,))

    def exclude(self, exclusion: Exclusion) -> bool:
        """Add an exclusion; False if it was there already."""
        with self.db.write() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO exclusions (kind, pattern, patch_id, added) "
                "VALUES (?, ?, ?, ?)",
                (exclusion.kind, exclusion.pattern, exclusion.patch_id or "", time.time()),
            )
            return cur.rowcount > 0

    def unexclude(self, exclusion: Exclusion) -> bool:
        """Remove an exclusion; False if there was no such one."""
        with self.db.write() as c:
            cur = c.execute(
                "DELETE FROM exclusions WHERE kind = ? AND pattern = ? AND patch_id = ?",
                (exclusion.kind, exclusion.pattern, exclusion.patch_id or ""),
            )
            return cur.rowcount > 0

    def exclusions(self) -> list[Exclusion]:
        return [
            Exclusion(r["kind"], r["pattern"], r["patch_id"] or None)
            for r in self.db.rows("SELECT * FROM exclusions ORDER BY id")
        ]

    def auto_disable(self, patch_id: str, exe: str, reason: str = "") -> bool:
        """Disable a patch for one executable (crashes); False if it already was."""
        with self.db.write() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO auto_disabled (patch_id, exe, since, reason) "
                "VALUES (?, ?, ?, ?)",
                (patch_id, exe, time.time(), reason),
            )
            return cur.rowcount > 0

    def auto_disabled(self) -> list[tuple[str, str, float, str]]:
        return [
            (r["patch_id"], r["exe"], r["since"], r["reason"])
            for r in self.db.rows("SELECT * FROM auto_disabled ORDER BY since")
        ]

    def pin(self, pid: int, start: int, patch_id: str, wanted: bool) -> None:
        with self.db.write() as c:
            c.execute(
                "INSERT OR REPLACE INTO pins (pid, start, patch_id, wanted) VALUES (?, ?, ?, ?)",
                (pid, start, patch_id, int(wanted)),
            )

    def prune(self, alive: Callable[[int, int], bool]) -> None:
        """Forget the pins and counts of processes that are gone (alive(pid, start))."""
        for table in ("pins", "counters"):
            gone = {
                (r["pid"], r["start"])
                for r in self.db.rows(f"SELECT DISTINCT pid, start FROM {table}")
                if not alive(r["pid"], r["start"])
            }
            if gone:
                with self.db.write() as c:
                    c.executemany(f"DELETE FROM {table} WHERE pid = ? AND start = ?", list(gone))

    def counted(self, pid: int, start: int, patch_id: str) -> int | None:
        rows = self.db.rows(
            "SELECT count FROM counters WHERE pid = ? AND start = ? AND patch_id = ?",
            (pid, start, patch_id),
        )
        return int(rows[0]["count"]) if rows else None

    def count(self, pid: int, start: int, patch_id: str, count: int) -> None:
        with self.db.write() as c:
            c.execute(
                "INSERT OR REPLACE INTO counters (pid, start, patch_id, count) VALUES (?, ?, ?, ?)",
                (pid, start, patch_id, count),
            )

    def view(self, starts: Callable[[int], int | None] | None = None) -> PolicyView:
        """A snapshot for the decisions. `starts(pid)`: the live process's start time,
        so that a pin of a process whose pid was reused does not apply."""
        states = {r["patch_id"]: r["state"] for r in self.db.rows("SELECT * FROM patches")}
        auto = frozenset((p, e) for p, e, _, _ in self.auto_disabled())
        pins = {}
        for r in self.db.rows("SELECT * FROM pins"):
            if starts is None or starts(r["pid"]) == r["start"]:
                pins[(r["patch_id"], r["pid"])] = bool(r["wanted"])
        return PolicyView(states, tuple(self.exclusions()), auto, pins)

"""The TUF repository, online: what the server does with it. Its offline key ceremony
(creating one, signing a new root) is `server.ceremony`.

Distribution is a TUF repository (python-tuf's Metadata API) with consistent
snapshots, so any web server or CDN can serve it and a client never sees a
half-published state: every file is written under a new name before the
timestamp, written last, points at it. The layout of a repository `DIR`::

    DIR/repository.json        expiry periods and thresholds chosen at `init`
    DIR/public/metadata/       served: N.root.json, N.targets.json, N.snapshot.json,
                               timestamp.json (and root.json, the newest root, to bootstrap)
    DIR/public/targets/        served: SHA256.NAME, one file per artifact
    DIR/online/                the server's keys: snapshot.key, timestamp.key
                               (and targets keys, when publishing is online)
    DIR/trusted/               the public halves of the targets (patch-signing) keys:
                               an uploaded artifact must be signed by one of them

Root keys never live in `DIR` (`server.ceremony`). Keys are micropatch Ed25519 keys
(`trust.keys`, as TUF keys: `server.tufkeys`), so a patch-signing key can be the
targets key. TUF signs the canonical JSON of a metadata document (it starts with
`{`); an artifact signature covers `trust.keys.SIGNATURE_CONTEXT` first, so one
key used for both can never make a signature valid for the other.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from micropatch.errors import RepositoryError, SignatureError
from micropatch.faults import checkpoint
from micropatch.files import read_bounded, write_atomic
from micropatch.server.expiry import root_expiry_warning
from micropatch.server.tufkeys import signer, tuf_key
from micropatch.trust.keys import (
    PrivateKey,
    PublicKey,
    load_private_key,
    trusted_keys,
    utc_now,
)

log = logging.getLogger(__name__)
T = TypeVar("T", Root, Targets, Snapshot, Timestamp)

CONFIG = "repository.json"
MAX_CONFIG = 1 << 20  # repository.json and server.json are a few hundred bytes
PUBLIC = "public"
ONLINE = "online"
TRUSTED = "trusted"
SERVED = "server.json"  # written by a fleet server whose database decides the targets
ROLES = ("root", "targets", "snapshot", "timestamp")
# Days each role's metadata stays valid. The online roles are re-signed by
# `refresh` when less than half of their period is left, so a server that
# calls it more often than every half period never lets a client see them expire.
DEFAULT_EXPIRY = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_VERSIONED = re.compile(r"(\d+)\.(root|targets|snapshot)\.json")


class Repository:
    """An existing repository directory; every change is made under a file lock, so the
    server's requests and an operator's command never interleave their writes."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        config_path = self.dir / CONFIG
        try:
            config = json.loads(read_bounded(config_path, MAX_CONFIG))
        except FileNotFoundError:
            raise RepositoryError(
                f"{self.dir} is not a micropatch repository (no {CONFIG}); create one with "
                f"`micropatch repo init {self.dir}`"
            ) from None
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"{config_path}: cannot read: {exc}") from None
        self.expiry: dict[str, int] = {**DEFAULT_EXPIRY, **config.get("expiry", {})}

    # --- layout -------------------------------------------------------------------

    @property
    def public(self) -> Path:
        """The directory to serve: `metadata/` and `targets/`."""
        return self.dir / PUBLIC

    @property
    def metadata_dir(self) -> Path:
        return self.public / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.public / "targets"

    @property
    def online_dir(self) -> Path:
        return self.dir / ONLINE

    def trusted_keys(self) -> list[PublicKey]:
        """The patch-signing keys an uploaded artifact must be signed by: DIR/trusted."""
        try:
            return trusted_keys([self.dir / TRUSTED])
        except SignatureError as exc:
            raise RepositoryError(str(exc)) from None

    # --- reading ------------------------------------------------------------------

    def root(self) -> Metadata[Root]:
        return self._latest("root", Root)

    def targets(self) -> Metadata[Targets]:
        version = self.snapshot().signed.meta["targets.json"].version
        return self._read(f"{version}.targets.json", Targets)

    def snapshot(self) -> Metadata[Snapshot]:
        version = self.timestamp().signed.snapshot_meta.version
        return self._read(f"{version}.snapshot.json", Snapshot)

    def timestamp(self) -> Metadata[Timestamp]:
        return self._read("timestamp.json", Timestamp)

    def target_files(self) -> dict[str, TargetFile]:
        """The artifacts currently published, by target name."""
        return dict(self.targets().signed.targets)

    def online_key(self, role: str) -> PrivateKey:
        """The server's key for `role` (snapshot, timestamp) from DIR/online."""
        path = self.online_dir / f"{role}.key"
        try:
            return load_private_key(path)
        except SignatureError as exc:
            raise RepositoryError(
                f"the {role} key is missing or unreadable ({exc}); the server signs {role} "
                f"metadata with {path}"
            ) from None

    def served_by(self) -> str | None:
        """The database of the fleet server that decides what this repository lists
        (`mark_served`), or None."""
        try:
            return str(json.loads((self.dir / SERVED).read_text())["database"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def mark_served(self, database: str) -> None:
        """Record that a fleet server with this database decides what the repository
        lists: `repo add-target` and `remove-target` then refuse (the server would undo
        them)."""
        if self.served_by() != database:
            _atomic_write(self.dir / SERVED, json.dumps({"database": database}).encode())

    def online_targets_keys(self) -> list[PrivateKey]:
        """The targets keys the server holds (empty: publishing needs the offline keys)."""
        return [load_private_key(p) for p in sorted(self.online_dir.glob("targets-*.key"))]

    # --- changing -----------------------------------------------------------------

    def add_target(
        self,
        name: str,
        data: bytes,
        *,
        custom: dict[str, Any] | None = None,
        keys: Sequence[PrivateKey] | None = None,
        now: datetime.datetime | None = None,
    ) -> TargetFile:
        """Publish `data` as target `name`: write the file, then new targets, snapshot
        and timestamp metadata. `keys`: the targets keys (default: those in DIR/online)."""
        self.store_target(name, data)
        with self.locked():
            wanted = {n: t.custom for n, t in self.targets().signed.targets.items()}
            self._sync({**wanted, name: custom}, keys, now)
        return self.target_files()[name]

    def store_target(self, name: str, data: bytes) -> Path:
        """Write the file of target `name`, content-addressed (SHA256.NAME), unless it is
        there already. Clients fetch it only once the targets metadata lists it."""
        if not _TARGET_NAME.fullmatch(name):
            raise RepositoryError(
                f"{name!r} is not a target name: use letters, digits, '.', '_' or '-'"
            )
        path = self.targets_dir / f"{_sha256(data)}.{name}"
        if not path.exists():
            _atomic_write(path, data)
        return path

    def sync(
        self,
        wanted: Mapping[str, dict[str, Any] | None],
        *,
        keys: Sequence[PrivateKey] | None = None,
        now: datetime.datetime | None = None,
    ) -> bool:
        """Make the targets metadata list exactly `wanted` (target name → its `custom`
        field), re-signing targets, snapshot and timestamp only if it lists anything
        else: called again, it changes nothing. A target not listed yet must have been
        stored (`store_target`). Returns whether anything was re-signed."""
        with self.locked():
            return self._sync(wanted, keys, now)

    def remove_target(
        self,
        name: str,
        *,
        keys: Sequence[PrivateKey] | None = None,
        now: datetime.datetime | None = None,
    ) -> None:
        """Revoke target `name`: it leaves the targets metadata, so clients drop it. Its
        file stays for clients in the middle of an update and is never listed again."""
        with self.locked():
            wanted = {n: t.custom for n, t in self.targets().signed.targets.items()}
            if wanted.pop(name, False) is False:
                raise RepositoryError(f"no target {name!r} in {self.dir}")
            self._sync(wanted, keys, now)

    def refresh(self, now: datetime.datetime | None = None, *, force: bool = False) -> list[str]:
        """Re-sign the online roles whose metadata has less than half of its period left
        (all of them with `force`): timestamp, snapshot, and targets when its keys are
        online. Returns the roles re-signed."""
        now = now or utc_now()
        warning = root_expiry_warning(self, now)
        if warning:
            log.warning("%s", warning)
        done: list[str] = []
        with self.locked():

            def due(md: Metadata[Any], role: str) -> bool:
                left = md.signed.expires - now
                return force or left < datetime.timedelta(days=self.expiry[role]) / 2

            online_targets = self.online_targets_keys()
            if online_targets and due(self.targets(), "targets"):
                self._change_targets(lambda t: None, online_targets, now)
                return ["targets", "snapshot", "timestamp"]
            snapshot = self.snapshot()
            if due(snapshot, "snapshot"):
                self.sign_snapshot_and_timestamp(
                    self.targets(), self.online_key("snapshot"), self.online_key("timestamp"), now
                )
                return ["snapshot", "timestamp"]
            if due(self.timestamp(), "timestamp"):
                self._timestamp(snapshot, self.online_key("timestamp"), now)
                done.append("timestamp")
        return done

    def roles(self) -> list[tuple[str, int, datetime.datetime]]:
        """Each role's current version and expiry: root, targets, snapshot, timestamp."""
        roles = (self.root(), self.targets(), self.snapshot(), self.timestamp())
        return [(md.signed.type, md.signed.version, md.signed.expires) for md in roles]

    # --- internals ----------------------------------------------------------------

    def _sync(
        self,
        wanted: Mapping[str, dict[str, Any] | None],
        keys: Sequence[PrivateKey] | None,
        now: datetime.datetime | None,
    ) -> bool:
        listed = self.targets().signed.targets
        fresh = {}
        for name, custom in sorted(wanted.items()):
            target = listed.get(name)
            if target is None or target.custom != custom:
                target = self._stored(name)
                if custom is not None:
                    target.unrecognized_fields["custom"] = custom
            fresh[name] = target
        if fresh.keys() == listed.keys() and all(fresh[n] is listed[n] for n in fresh):
            return False
        self._change_targets(lambda t: setattr(t, "targets", fresh), keys, now)
        added, removed = fresh.keys() - listed.keys(), listed.keys() - fresh.keys()
        log.info("targets now %d: added %s, removed %s", len(fresh),
                 ", ".join(sorted(added)) or "-", ", ".join(sorted(removed)) or "-")  # fmt: skip
        return True

    def _stored(self, name: str) -> TargetFile:
        """The target file `name` as stored by `store_target` (its hash checked)."""
        for path in self.targets_dir.glob(f"*.{name}"):
            digest, _, rest = path.name.partition(".")
            if rest != name or not re.fullmatch(r"[0-9a-f]{64}", digest):
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise RepositoryError(f"cannot read {path}: {exc.strerror}") from None
            if _sha256(data) == digest:
                return TargetFile.from_data(name, data, ["sha256"])
            log.error("%s: its content does not match its name (a damaged file)", path)
        raise RepositoryError(
            f"target {name}: its file is not in {self.targets_dir} (deleted?): publish the "
            "artifact again"
        )

    def _change_targets(
        self, change: Any, keys: Sequence[PrivateKey] | None, now: datetime.datetime | None
    ) -> None:
        now = now or utc_now()
        keys = list(keys) if keys is not None else self.online_targets_keys()
        root = self.root().signed
        role = root.roles["targets"]
        allowed = set(role.keyids)
        signers = []
        for key in keys:
            keyid = tuf_key(key.public).keyid
            if keyid not in allowed:
                raise RepositoryError(
                    f"{key.public.path or key.public.name}: {key.public.describe()} is not a "
                    f"targets key of the repository {self.dir}"
                )
            signers.append(signer(key))
        if len(signers) < role.threshold:
            where = "given" if keys else f"online in {self.online_dir}"
            raise RepositoryError(
                f"the targets role needs {role.threshold} signature(s), but {len(signers)} "
                f"targets key(s) are {where}: sign with the targets (patch-signing) keys, e.g. "
                f"`micropatch repo add-target {self.dir} FILE --key TARGETS.key`"
            )
        targets = self.targets()
        change(targets.signed)
        targets.signed.version += 1
        targets.signed.expires = now + datetime.timedelta(days=self.expiry["targets"])
        targets.signatures.clear()
        for s in signers:
            targets.sign(s, append=True)
        self.write_versioned(targets, "targets")
        checkpoint("repository-targets-written")
        self.sign_snapshot_and_timestamp(
            targets, self.online_key("snapshot"), self.online_key("timestamp"), now
        )

    def sign_snapshot_and_timestamp(
        self,
        targets: Metadata[Targets],
        snapshot_key: PrivateKey,
        timestamp_key: PrivateKey,
        now: datetime.datetime,
        *,
        bump: bool = True,
    ) -> None:
        if bump:
            snapshot = self.snapshot()
            snapshot.signed.version += 1
        else:
            snapshot = Metadata(Snapshot())
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        snapshot.signed.expires = now + datetime.timedelta(days=self.expiry["snapshot"])
        snapshot.signatures.clear()
        snapshot.sign(signer(snapshot_key))
        self.write_versioned(snapshot, "snapshot")
        checkpoint("repository-snapshot-written")
        self._timestamp(snapshot, timestamp_key, now, first=not bump)

    def _timestamp(
        self,
        snapshot: Metadata[Snapshot],
        key: PrivateKey,
        now: datetime.datetime,
        *,
        first: bool = False,
    ) -> None:
        timestamp = Metadata(Timestamp()) if first else self.timestamp()
        if not first:
            timestamp.signed.version += 1
        data = snapshot.to_bytes(JSONSerializer(compact=False))
        # Length and hash, not only the version: a mirror cannot swap in another
        # snapshot of the same version.
        timestamp.signed.snapshot_meta = MetaFile(
            version=snapshot.signed.version,
            length=len(data),
            hashes={"sha256": _sha256(data)},
        )
        timestamp.signed.expires = now + datetime.timedelta(days=self.expiry["timestamp"])
        timestamp.signatures.clear()
        timestamp.sign(signer(key))
        self.write(self.metadata_dir / "timestamp.json", timestamp)  # last: the switch
        checkpoint("repository-timestamp-written")

    def write_versioned(self, md: Metadata[Any], role: str) -> None:
        self.write(self.metadata_dir / f"{md.signed.version}.{role}.json", md)

    def write(self, path: Path, md: Metadata[Any]) -> None:
        _atomic_write(path, md.to_bytes(JSONSerializer(compact=False)))

    def _latest(self, role: str, kind: type[T]) -> Metadata[T]:
        versions = [
            int(m.group(1))
            for p in self.metadata_dir.iterdir()
            if (m := _VERSIONED.fullmatch(p.name)) and m.group(2) == role
        ]
        if not versions:
            raise RepositoryError(f"{self.metadata_dir}: no {role} metadata")
        return self._read(f"{max(versions)}.{role}.json", kind)

    def _read(self, name: str, kind: type[T]) -> Metadata[T]:
        path = self.metadata_dir / name
        try:
            md = Metadata.from_file(str(path))
        except Exception as exc:  # tuf raises several kinds; each means the same here
            raise RepositoryError(f"{path}: cannot read metadata: {exc}") from None
        if not isinstance(md.signed, kind):
            raise RepositoryError(f"{path}: is {md.signed.type} metadata, not {kind.type}")
        return md

    @contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes | str) -> None:
    """A public file of the repository, written whole (micropatch.files.write_atomic)."""
    try:
        write_atomic(path, data, mode=0o644)
    except OSError as exc:
        raise RepositoryError(f"cannot write {path}: {exc.strerror}") from None

"""The TUF repository: signed metadata and artifacts as static files.

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

Root keys never live in `DIR`: `init` writes them to a separate directory
that the operator moves off the machine (docs/server.md, "Key ceremony"), and
`sign_root`, run on the offline machine, renews the root before it expires or
rotates its keys (root version N+1, signed by a threshold of N's root keys).

Keys are micropatch Ed25519 keys (`trust.keys`), so a patch-signing key can be
the targets key. TUF signs the canonical JSON of a metadata document (it starts
with `{`); an artifact signature covers `trust.keys.SIGNATURE_CONTEXT` first,
so one key used for both can never make a signature valid for the other.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import CanonicalJSONSerializer, JSONSerializer

from micropatch.errors import RepositoryError, SignatureError
from micropatch.files import read_bounded, write_atomic
from micropatch.trust.keys import (
    PrivateKey,
    PublicKey,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    trusted_keys,
    utc_now,
    write_key_pair,
)

log = logging.getLogger(__name__)
T = TypeVar("T", Root, Targets, Snapshot, Timestamp)

CONFIG = "repository.json"
MAX_CONFIG = 1 << 20
PUBLIC = "public"
ONLINE = "online"
TRUSTED = "trusted"
ROLES = ("root", "targets", "snapshot", "timestamp")
# Days each role's metadata stays valid. The online roles are re-signed by
# `refresh` when less than half of their period is left, so a server that
# calls it more often than every half period never lets a client see them expire.
DEFAULT_EXPIRY = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
# `refresh` warns when the root expires within this many days: it must be renewed offline.
ROOT_WARNING = 30
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_VERSIONED = re.compile(r"(\d+)\.(root|targets|snapshot)\.json")


def signer(key: PrivateKey) -> CryptoSigner:
    """A securesystemslib signer of a micropatch key."""
    private = Ed25519PrivateKey.from_private_bytes(key.seed)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def tuf_key(key: PublicKey) -> SSlibKey:
    """The TUF key of a micropatch public key."""
    return SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(key.raw))


@dataclass(frozen=True)
class Ceremony:
    """What `Repository.init` wrote: where the offline keys are, and which keys sign what."""

    repository: Path
    offline_dir: Path
    root_keys: tuple[Path, ...]
    targets_keys: tuple[Path, ...]  # the private keys written or given (may be offline)
    online_keys: tuple[Path, ...]


@dataclass(frozen=True)
class RootSigning:
    """What `Repository.sign_root` wrote: the new root version, and its new keys if any."""

    version: int
    expires: datetime.datetime
    path: Path  # DIR/public/metadata/N.root.json
    threshold: int
    root_keyids: tuple[str, ...]  # the TUF key ids of the new root's root keys
    new_keys: tuple[Path, ...]  # private keys generated into the offline directory
    offline_dir: Path | None


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

    # --- creating -----------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: str | Path,
        *,
        offline_dir: str | Path | None = None,
        root_keys: int = 3,
        root_threshold: int = 2,
        targets_keys: Sequence[PrivateKey] = (),
        targets_threshold: int = 1,
        online_targets: bool = False,
        trusted: Sequence[PublicKey] = (),
        expiry: dict[str, int] | None = None,
        now: datetime.datetime | None = None,
    ) -> Ceremony:
        """The key ceremony: generate `root_keys` root keys (into `offline_dir`, default
        DIR/offline-keys, to be moved off the machine), take the patch-signing keys as
        the targets keys (or generate one into `offline_dir`), generate the online
        snapshot and timestamp keys into DIR/online, and write version 1 of every role.

        `online_targets`: also copy the targets keys into DIR/online, so the server can
        publish through its API (docs/server.md says what that trades away).
        `trusted`: the patch-signing keys an uploaded artifact must be signed by
        (DIR/trusted; default: the targets keys).
        """
        directory = Path(directory)
        offline = Path(offline_dir) if offline_dir is not None else directory / "offline-keys"
        now = now or utc_now()
        if not 1 <= root_threshold <= root_keys:
            raise RepositoryError(
                f"root threshold {root_threshold} must be between 1 and the number of root "
                f"keys ({root_keys})"
            )
        count = max(len(targets_keys), 1)
        if not 1 <= targets_threshold <= count:
            raise RepositoryError(
                f"targets threshold {targets_threshold} must be between 1 and the number of "
                f"targets keys ({count})"
            )
        if (directory / CONFIG).exists():
            raise RepositoryError(f"{directory} is already a repository; refusing to replace it")
        periods = {**DEFAULT_EXPIRY, **(expiry or {})}
        for role, days in periods.items():
            if role not in ROLES or days < 1:
                raise RepositoryError(f"expiry for {role!r}: must be a role and at least 1 day")
        for d in (directory, offline, directory / ONLINE):
            d.mkdir(parents=True, exist_ok=True)
        (directory / PUBLIC / "metadata").mkdir(parents=True, exist_ok=True)
        (directory / PUBLIC / "targets").mkdir(parents=True, exist_ok=True)
        (directory / TRUSTED).mkdir(exist_ok=True)
        os.chmod(offline, 0o700)
        os.chmod(directory / ONLINE, 0o700)

        def new_key(name: str, where: Path) -> tuple[PrivateKey, Path]:
            key = _generate(name, now)
            return key, _write_key(key, where)

        roots = [new_key(f"root-{i + 1}", offline) for i in range(root_keys)]
        if targets_keys:
            targets = [(key, Path(key.public.path)) for key in targets_keys]
        else:
            targets = [new_key("targets", offline)]
        for public in trusted or [key.public for key, _ in targets]:
            _atomic_write(
                directory / TRUSTED / f"{public.name}-{public.keyid[:12]}.pub",
                json.dumps(public.to_json(), indent=2) + "\n",
            )
        snapshot_key, snapshot_path = new_key("snapshot", directory / ONLINE)
        timestamp_key, timestamp_path = new_key("timestamp", directory / ONLINE)
        online = [snapshot_path, timestamp_path]
        if online_targets:
            for i, (key, _) in enumerate(targets):
                try:
                    path, _ = write_key_pair(key, directory / ONLINE / f"targets-{i + 1}")
                except SignatureError as exc:
                    raise RepositoryError(str(exc)) from None
                online.append(path)

        root = Root(expires=now + datetime.timedelta(days=periods["root"]))
        root.consistent_snapshot = True
        for key, _ in roots:
            root.add_key(tuf_key(key.public), "root")
        for key, _ in targets:
            root.add_key(tuf_key(key.public), "targets")
        root.add_key(tuf_key(snapshot_key.public), "snapshot")
        root.add_key(tuf_key(timestamp_key.public), "timestamp")
        root.roles["root"].threshold = root_threshold
        root.roles["targets"].threshold = targets_threshold
        _atomic_write(
            directory / CONFIG,
            json.dumps({"format": "micropatch-repository", "expiry": periods}, indent=2) + "\n",
        )
        repo = cls(directory)
        root_md = Metadata(root)
        for key, _ in roots:
            root_md.sign(signer(key), append=True)
        repo._write_versioned(root_md, "root")
        repo._write(repo.metadata_dir / "root.json", root_md)
        targets_md = Metadata(Targets(expires=now + datetime.timedelta(days=periods["targets"])))
        for key, _ in targets:
            targets_md.sign(signer(key), append=True)
        repo._write_versioned(targets_md, "targets")
        repo._snapshot_and_timestamp(targets_md, snapshot_key, timestamp_key, now, bump=False)
        return Ceremony(
            directory,
            offline,
            tuple(p for _, p in roots),
            tuple(p for _, p in targets),
            tuple(online),
        )

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
        if not _TARGET_NAME.fullmatch(name):
            raise RepositoryError(
                f"{name!r} is not a target name: use letters, digits, '.', '_' or '-'"
            )
        target = TargetFile.from_data(name, data, ["sha256"])
        if custom:
            target.unrecognized_fields["custom"] = custom
        with self._locked():
            path = self.targets_dir / f"{target.hashes['sha256']}.{name}"
            if not path.exists():
                _atomic_write(path, data)
            self._change_targets(lambda t: t.targets.__setitem__(name, target), keys, now)
        log.info("published target %s (%d bytes)", name, len(data))
        return target

    def remove_target(
        self,
        name: str,
        *,
        keys: Sequence[PrivateKey] | None = None,
        now: datetime.datetime | None = None,
    ) -> None:
        """Revoke target `name`: it leaves the targets metadata, so clients drop it. Its
        file stays for clients in the middle of an update and is never listed again."""
        with self._locked():
            if name not in self.targets().signed.targets:
                raise RepositoryError(f"no target {name!r} in {self.dir}")
            self._change_targets(lambda t: t.targets.pop(name), keys, now)
        log.info("removed target %s", name)

    def refresh(self, now: datetime.datetime | None = None, *, force: bool = False) -> list[str]:
        """Re-sign the online roles whose metadata has less than half of its period left
        (all of them with `force`): timestamp, snapshot, and targets when its keys are
        online. Returns the roles re-signed."""
        now = now or utc_now()
        warning = self.root_expiry_warning(now)
        if warning:
            log.warning("%s", warning)
        done: list[str] = []
        with self._locked():

            def due(md: Metadata[Any], role: str) -> bool:
                left = md.signed.expires - now
                return force or left < datetime.timedelta(days=self.expiry[role]) / 2

            online_targets = self.online_targets_keys()
            if online_targets and due(self.targets(), "targets"):
                self._change_targets(lambda t: None, online_targets, now)
                return ["targets", "snapshot", "timestamp"]
            snapshot = self.snapshot()
            if due(snapshot, "snapshot"):
                self._snapshot_and_timestamp(
                    self.targets(), self.online_key("snapshot"), self.online_key("timestamp"), now
                )
                return ["snapshot", "timestamp"]
            if due(self.timestamp(), "timestamp"):
                self._timestamp(snapshot, self.online_key("timestamp"), now)
                done.append("timestamp")
        return done

    def sign_root(
        self,
        keys: Sequence[PrivateKey],
        *,
        expires_in: int | None = None,
        new_root_keys: int = 0,
        root_threshold: int | None = None,
        offline_dir: str | Path | None = None,
        remove_root_keys: Sequence[str] = (),
        now: datetime.datetime | None = None,
    ) -> RootSigning:
        """Renew or rotate the root: write root version N+1 from the newest root N.

        The new root expires `expires_in` days from now (default: the repository's root
        period). `new_root_keys`: generate that many root keys into `offline_dir` (which
        must not be inside the repository) and add them; `remove_root_keys`: TUF or
        micropatch key ids (or unique prefixes of at least 8 digits) of root keys to drop;
        `root_threshold`: the new root threshold (default: unchanged). `keys`: private root
        keys to sign with. N+1 must be signed by a threshold of N's root keys (what clients
        trust now) and by a threshold of its own, checked before anything is written. The
        other roles' keys are unchanged, so nothing else is re-signed.
        """
        now = now or utc_now()
        days = self.expiry["root"] if expires_in is None else expires_in
        if days < 1:
            raise RepositoryError(f"the root must stay valid at least 1 day, not {days}")
        if new_root_keys < 0:
            raise RepositoryError(f"cannot generate {new_root_keys} root keys")
        offline: Path | None = None
        if new_root_keys:
            if offline_dir is None:
                raise RepositoryError(
                    "new root keys need an offline directory to be written to (--offline-dir), "
                    "outside the repository"
                )
            offline = Path(offline_dir)
            inside = self.dir.resolve()
            if offline.resolve() == inside or inside in offline.resolve().parents:
                raise RepositoryError(
                    f"{offline} is inside the repository {self.dir}: root keys are never "
                    "written beside the repository; give a directory on offline media"
                )
        with self._locked():
            current = self.root()
            old = current.signed
            new = Metadata[Root].from_bytes(current.to_bytes())
            root = new.signed
            root.version = old.version + 1
            root.expires = now + datetime.timedelta(days=days)
            new.signatures.clear()
            for wanted in remove_root_keys:
                root.revoke_key(self._root_keyid(old, wanted), "root")
            generated = [
                _generate(f"root-v{root.version}-{i + 1}", now) for i in range(new_root_keys)
            ]
            if offline is not None:
                for key in generated:
                    for suffix in (".key", ".pub"):
                        if (offline / f"{key.public.name}{suffix}").exists():
                            raise RepositoryError(
                                f"{offline / key.public.name}{suffix} already exists; give "
                                "another offline directory"
                            )
            for key in generated:
                root.add_key(tuf_key(key.public), "root")
            role = root.roles["root"]
            if root_threshold is not None:
                role.threshold = root_threshold
            if not 1 <= role.threshold <= len(role.keyids):
                raise RepositoryError(
                    f"root threshold {role.threshold} must be between 1 and the number of root "
                    f"keys of version {root.version} ({len(role.keyids)})"
                )
            relevant = set(old.roles["root"].keyids) | set(role.keyids)
            strangers = []
            for key in [*keys, *generated]:
                s = signer(key)
                if s.public_key.keyid in relevant:
                    new.sign(s, append=True)
                else:
                    strangers.append(key.public.path or key.public.name)
            self._check_root_signatures(current, new, strangers)
            written = []
            if offline is not None:
                offline.mkdir(parents=True, exist_ok=True)
                os.chmod(offline, 0o700)
                written = [_write_key(key, offline) for key in generated]
            self._write_versioned(new, "root")
            self._write(self.metadata_dir / "root.json", new)
        log.info("signed root version %d, expires %s", root.version, root.expires)
        return RootSigning(
            root.version,
            root.expires,
            self.metadata_dir / f"{root.version}.root.json",
            role.threshold,
            tuple(role.keyids),
            tuple(written),
            offline,
        )

    def roles(self) -> list[tuple[str, int, datetime.datetime]]:
        """Each role's current version and expiry: root, targets, snapshot, timestamp."""
        timestamp = self.timestamp()
        snapshot = self._read(f"{timestamp.signed.snapshot_meta.version}.snapshot.json", Snapshot)
        version = snapshot.signed.meta["targets.json"].version
        targets = self._read(f"{version}.targets.json", Targets)
        return [
            (md.signed.type, md.signed.version, md.signed.expires)
            for md in (self.root(), targets, snapshot, timestamp)
        ]

    def root_expiry_warning(self, now: datetime.datetime | None = None) -> str | None:
        """A warning when the root expires within `ROOT_WARNING` days (None otherwise).
        Reads root.json only, the newest root, so the server can ask every refresh."""
        now = now or utc_now()
        root = self._read("root.json", Root).signed
        left = root.expires - now
        if left >= datetime.timedelta(days=ROOT_WARNING):
            return None
        when = "expired" if left <= datetime.timedelta(0) else f"expires in {_days(left)}"
        return (
            f"the root metadata of {self.dir} (version {root.version}) {when}, on "
            f"{root.expires:%Y-%m-%d %H:%M} UTC: clients stop updating then; sign a new root "
            f"with `micropatch repo sign-root {self.dir} --root-key ROOT.key …` on the offline "
            'machine (docs/server.md, "Renewing and rotating the root")'
        )

    # --- internals ----------------------------------------------------------------

    def _root_keyid(self, root: Root, wanted: str) -> str:
        """The TUF key id of the root key `wanted`: a .pub file, or a TUF or micropatch
        key id, or a unique prefix of one of at least 8 hex digits."""
        role = root.roles["root"]
        if wanted.endswith(".pub") or os.sep in wanted:
            keyid = tuf_key(load_public(wanted)).keyid
            if keyid not in role.keyids:
                raise RepositoryError(
                    f"{wanted} is not a root key of version {root.version} of {self.dir}"
                )
            return keyid
        wanted = wanted.lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", wanted):
            raise RepositoryError(
                f"{wanted!r}: give a root public key (.pub) or a key id (at least 8 hex digits)"
            )
        found = set()
        for keyid in role.keyids:
            raw = bytes.fromhex(root.keys[keyid].keyval["public"])
            if keyid.startswith(wanted) or key_id(raw).startswith(wanted):
                found.add(keyid)
        if len(found) != 1:
            what = "no root key" if not found else f"{len(found)} root keys"
            raise RepositoryError(
                f"{what} of version {root.version} of {self.dir} has the key id {wanted}; "
                f"its root keys: {_key_ids({k: root.keys[k] for k in role.keyids})}"
            )
        return found.pop()

    def _check_root_signatures(
        self, current: Metadata[Root], new: Metadata[Root], strangers: Sequence[str]
    ) -> None:
        """python-tuf's own checks, as a client makes them: `new` signed by a threshold
        of the current root's keys, and by a threshold of its own."""
        for by, version in ((current, current.signed.version), (new, None)):
            try:
                by.verify_delegate("root", new)
            except UnsignedMetadataError:
                payload = CanonicalJSONSerializer().serialize(new.signed)
                result = by.signed.get_verification_result("root", payload, new.signatures)
                whose = (
                    f"root keys of version {version} (the keys clients trust now)"
                    if version is not None
                    else "its own root keys"
                )
                extra = (
                    f"; not root keys of version {current.signed.version}: "
                    + ", ".join(map(str, strangers))
                    if strangers
                    else ""
                )
                raise RepositoryError(
                    f"root version {new.signed.version} needs {result.threshold} signature(s) "
                    f"by {whose}, but {len(result.signed)} valid one(s) were given{extra}: "
                    f"sign with --root-key for at least {result.threshold} of them (key ids "
                    f"{_key_ids({**result.signed, **result.unsigned})}); "
                    "nothing was written"
                ) from None

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
        self._write_versioned(targets, "targets")
        self._snapshot_and_timestamp(
            targets, self.online_key("snapshot"), self.online_key("timestamp"), now
        )

    def _snapshot_and_timestamp(
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
        self._write_versioned(snapshot, "snapshot")
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
        self._write(self.metadata_dir / "timestamp.json", timestamp)  # last: the switch

    def _write_versioned(self, md: Metadata[Any], role: str) -> None:
        self._write(self.metadata_dir / f"{md.signed.version}.{role}.json", md)

    def _write(self, path: Path, md: Metadata[Any]) -> None:
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
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _generate(name: str, now: datetime.datetime) -> PrivateKey:
    try:
        return generate_key(name, now=now)
    except SignatureError as exc:
        raise RepositoryError(str(exc)) from None


def _write_key(key: PrivateKey, where: Path) -> Path:
    """Write `key` as WHERE/NAME.key and .pub (never replacing a file); the .key path."""
    try:
        private_path, _ = write_key_pair(key, where / key.public.name)
    except SignatureError as exc:
        raise RepositoryError(str(exc)) from None
    return private_path


def _key_ids(keys: dict[str, Any]) -> str:
    """The micropatch key ids (those in the .pub files) of TUF keys, abbreviated."""
    return ", ".join(key_id(bytes.fromhex(k.keyval["public"]))[:16] for k in keys.values())


def _days(delta: datetime.timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.0f} day(s)" if days >= 1 else f"{delta.total_seconds() / 3600:.0f} hour(s)"


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes | str) -> None:
    """A public file of the repository, written whole (micropatch.files.write_atomic)."""
    try:
        write_atomic(path, data, mode=0o644)
    except OSError as exc:
        raise RepositoryError(f"cannot write {path}: {exc.strerror}") from None


def load_keys(paths: Sequence[str | Path]) -> list[PrivateKey]:
    """Private keys from files, as RepositoryError on any problem."""
    try:
        return [load_private_key(p) for p in paths]
    except SignatureError as exc:
        raise RepositoryError(str(exc)) from None


def load_public(path: str | Path) -> PublicKey:
    try:
        return load_public_key(path)
    except SignatureError as exc:
        raise RepositoryError(str(exc)) from None

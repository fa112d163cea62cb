"""The offline key ceremony of a TUF repository: creating one (`init_repository`: root
keys written to a directory that leaves the machine, targets keys, the online
snapshot and timestamp keys, version 1 of every role) and signing a new root
(`sign_root`: renewed before it expires, or rotated to new keys), run on the offline
machine with a threshold of the current root keys. docs/server.md, "Key ceremony"
and "Renewing and rotating the root".
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization.json import CanonicalJSONSerializer

from micropatch.errors import RepositoryError, SignatureError
from micropatch.files import write_atomic
from micropatch.server.repository import (
    CONFIG,
    DEFAULT_EXPIRY,
    ONLINE,
    PUBLIC,
    ROLES,
    TRUSTED,
    Repository,
)
from micropatch.server.tufkeys import (
    generate,
    key_ids,
    load_public,
    signer,
    tuf_key,
    write_key,
)
from micropatch.trust.keys import PrivateKey, PublicKey, key_id, utc_now, write_key_pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ceremony:
    """What `init_repository` wrote: where the offline keys are, and which keys sign what."""

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


def init_repository(
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
        key = generate(name, now)
        return key, write_key(key, where)

    roots = [new_key(f"root-{i + 1}", offline) for i in range(root_keys)]
    if targets_keys:
        targets = [(key, Path(key.public.path)) for key in targets_keys]
    else:
        targets = [new_key("targets", offline)]
    for public in trusted or [key.public for key, _ in targets]:
        write_atomic(
            directory / TRUSTED / f"{public.name}-{public.keyid[:12]}.pub",
            json.dumps(public.to_json(), indent=2) + "\n",
            mode=0o644,
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
    write_atomic(
        directory / CONFIG,
        json.dumps({"format": "micropatch-repository", "expiry": periods}, indent=2) + "\n",
        mode=0o644,
    )
    repo = Repository(directory)
    root_md = Metadata(root)
    for key, _ in roots:
        root_md.sign(signer(key), append=True)
    repo.write_versioned(root_md, "root")
    repo.write(repo.metadata_dir / "root.json", root_md)
    targets_md = Metadata(Targets(expires=now + datetime.timedelta(days=periods["targets"])))
    for key, _ in targets:
        targets_md.sign(signer(key), append=True)
    repo.write_versioned(targets_md, "targets")
    repo.sign_snapshot_and_timestamp(targets_md, snapshot_key, timestamp_key, now, bump=False)
    return Ceremony(
        directory,
        offline,
        tuple(p for _, p in roots),
        tuple(p for _, p in targets),
        tuple(online),
    )


def sign_root(
    repo: Repository,
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
    days = repo.expiry["root"] if expires_in is None else expires_in
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
        inside = repo.dir.resolve()
        if offline.resolve() == inside or inside in offline.resolve().parents:
            raise RepositoryError(
                f"{offline} is inside the repository {repo.dir}: root keys are never "
                "written beside the repository; give a directory on offline media"
            )
    with repo.locked():
        current = repo.root()
        old = current.signed
        new = Metadata[Root].from_bytes(current.to_bytes())
        root = new.signed
        root.version = old.version + 1
        root.expires = now + datetime.timedelta(days=days)
        new.signatures.clear()
        for wanted in remove_root_keys:
            root.revoke_key(_root_keyid(repo, old, wanted), "root")
        generated = [generate(f"root-v{root.version}-{i + 1}", now) for i in range(new_root_keys)]
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
        _check_root_signatures(current, new, strangers)
        written = []
        if offline is not None:
            offline.mkdir(parents=True, exist_ok=True)
            os.chmod(offline, 0o700)
            written = [write_key(key, offline) for key in generated]
        repo.write_versioned(new, "root")
        repo.write(repo.metadata_dir / "root.json", new)
    log.info("signed root version %d, expires %s", root.version, root.expires)
    return RootSigning(
        root.version,
        root.expires,
        repo.metadata_dir / f"{root.version}.root.json",
        role.threshold,
        tuple(role.keyids),
        tuple(written),
        offline,
    )


def _root_keyid(repo: Repository, root: Root, wanted: str) -> str:
    """The TUF key id of the root key `wanted`: a .pub file, or a TUF or micropatch
    key id, or a unique prefix of one of at least 8 hex digits."""
    role = root.roles["root"]
    if wanted.endswith(".pub") or os.sep in wanted:
        keyid = tuf_key(load_public(wanted)).keyid
        if keyid not in role.keyids:
            raise RepositoryError(
                f"{wanted} is not a root key of version {root.version} of {repo.dir}"
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
            f"{what} of version {root.version} of {repo.dir} has the key id {wanted}; "
            f"its root keys: {key_ids({k: root.keys[k] for k in role.keyids})}"
        )
    return found.pop()


def _check_root_signatures(
    current: Metadata[Root], new: Metadata[Root], strangers: Sequence[str]
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
                f"{key_ids({**result.signed, **result.unsigned})}); "
                "nothing was written"
            ) from None

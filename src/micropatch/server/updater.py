"""The client side of distribution: a TUF (ngclient) client of a micropatch repository.

The agent uses it to learn which artifacts are published and to download them.
Two independent checks stand between a mirror and a process:

1. TUF (python-tuf's ngclient): the metadata is signed by the thresholds of
   keys the trusted root names, fresh (not expired: no freeze), not older
   than what this client saw before (no rollback), consistent (the snapshot
   names the targets version, the timestamp the snapshot's hash: no
   mix-and-match), and a target's bytes have the length and hash the signed
   targets metadata lists (no arbitrary artifact);
2. the artifact's own signature, by a patch-signing key this host trusts
   (`trust.admission.admit`): a repository that is compromised in full still
   cannot make a host apply a patch nobody it trusts signed.

Every refusal is an `UpdateError` (or the `SignatureError` / `ArtifactError` of
the admission policy) whose message names the attack it looks like.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from micropatch.errors import UpdateError
from micropatch.files import read_bounded
from micropatch.trust.admission import Admitted, admit
from micropatch.trust.keys import PublicKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A published artifact as the signed targets metadata describes it."""

    name: str
    length: int
    sha256: str
    patch_id: str | None
    version: int | None
    artifact_id: str | None
    module: dict[str, Any]  # name, build_id, sha256 of the module the patch is for


class PatchUpdater:
    """A client of one repository. `cache_dir` keeps the trusted metadata (so a rollback
    is detected across restarts) and the downloaded artifacts.

    `root`: the trusted root metadata (root.json written by `micropatch repo init`),
    shipped to the host out of band; None uses the root already in the cache.
    `keys`: the patch-signing keys whose artifact signatures this host accepts.
    """

    def __init__(
        self,
        url: str,
        cache_dir: str | Path,
        *,
        keys: Sequence[PublicKey],
        root: bytes | None = None,
        fetcher: FetcherInterface | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.keys = list(keys)
        cache = Path(cache_dir)
        self._metadata_dir = cache / "metadata"
        self._targets_dir = cache / "targets"
        self._metadata_dir.mkdir(parents=True, exist_ok=True)
        self._targets_dir.mkdir(parents=True, exist_ok=True)
        if root is None and not (self._metadata_dir / "root.json").exists():
            raise UpdateError(
                f"no trusted root for {self.url}: give the root.json that `micropatch repo "
                f"init` wrote (shipped to this host out of band), or put it in "
                f"{self._metadata_dir}"
            )
        self._root = root
        self._fetcher = fetcher
        self._updater: Updater | None = None

    def _new(self) -> Updater:
        # A new ngclient Updater per refresh: it refreshes once in its life by design.
        return Updater(
            metadata_dir=str(self._metadata_dir),
            metadata_base_url=f"{self.url}/metadata/",
            target_dir=str(self._targets_dir),
            target_base_url=f"{self.url}/targets/",
            fetcher=self._fetcher,
            config=UpdaterConfig(),
            bootstrap=self._root,
        )

    def refresh(self) -> None:
        """Fetch and verify the newest metadata (root, timestamp, snapshot, targets)."""
        with _explained(self.url, "refresh"):
            updater = self._new()
            updater.refresh()
        self._updater = updater

    def targets(self) -> list[Target]:
        """The published artifacts, from the metadata verified by the last `refresh`."""
        updater = self._refreshed()
        # The top-level targets metadata that refresh() verified: ngclient keeps it in
        # its trusted set, which has no public accessor for a listing.
        trusted = updater._trusted_set.targets.targets
        return [_target(info) for _, info in sorted(trusted.items())]

    def download(self, name: str) -> bytes:
        """The bytes of target `name`, verified against the signed length and hash (a
        cached copy is used when it still matches)."""
        updater = self._refreshed()
        with _explained(self.url, f"target {name}"):
            info = updater.get_targetinfo(name)
            if info is None:
                raise UpdateError(
                    f"{self.url}: no target {name!r} in the signed targets metadata: it was "
                    "never published, or it was revoked"
                )
            path = updater.find_cached_target(info) or updater.download_target(info)
        try:
            return read_bounded(path, info.length)  # what TUF verified, nothing more
        except OSError as e:
            raise UpdateError(f"{self.url}: target {name}: cannot read {path}: {e.strerror}") from e

    def fetch(self, name: str) -> Admitted:
        """Download target `name` and admit it: TUF, then the artifact's own signature
        by a key of `keys` (`trust.admission.admit`)."""
        data = self.download(name)
        return admit(data, name=f"{self.url}/targets/{name}", keys=self.keys)

    def _refreshed(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater


def _target(info: Any) -> Target:
    custom = info.custom.get("micropatch", {}) if isinstance(info.custom, dict) else {}
    return Target(
        name=info.path,
        length=info.length,
        sha256=info.hashes.get("sha256", ""),
        patch_id=custom.get("patch_id"),
        version=custom.get("version"),
        artifact_id=custom.get("artifact_id"),
        module=dict(custom.get("module", {})),
    )


class _explained:
    """Turns python-tuf's exceptions into an UpdateError naming the attack each one
    stands for; the original stays as the cause."""

    def __init__(self, url: str, what: str) -> None:
        self.url, self.what = url, what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> Literal[False]:
        if exc is None or isinstance(exc, UpdateError):
            return False
        reason = _reason(exc)
        if reason is None:
            return False
        error = UpdateError(f"{self.url}: {self.what}: refused: {reason}: {exc}")
        raise error from exc


def _reason(exc: BaseException) -> str | None:
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return (
            "expired metadata (a freeze attack, or a repository whose online keys stopped signing)"
        )
    if isinstance(exc, tuf_errors.EqualVersionNumberError | tuf_errors.BadVersionNumberError):
        return (
            "metadata older than, or inconsistent with, what this client trusts (a rollback "
            "or mix-and-match attack)"
        )
    if isinstance(
        exc, tuf_errors.LengthOrHashMismatchError | tuf_errors.DownloadLengthMismatchError
    ):
        return (
            "a file does not have the length or hash the signed metadata lists (a tampered "
            "artifact, or mix-and-match metadata)"
        )
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return "metadata not signed by the threshold of trusted keys (forged or tampered)"
    if isinstance(exc, tuf_errors.DownloadError):
        return "cannot download from the repository"
    if isinstance(exc, tuf_errors.RepositoryError):
        return "the repository served invalid metadata"
    return None

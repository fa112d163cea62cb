"""What the server checks in an uploaded artifact, and what it records of it.

Only `trust.artifact` runs on the bytes: parsing, the content id, the
signatures and the consistency of the source with the recorded facts
(`patch_of`). No compiler and no assembler runs on what a client uploaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from micropatch.trust.artifact import Artifact, loads, patch_of, verify
from micropatch.trust.keys import PublicKey


def check(data: bytes, name: str, keys: Sequence[PublicKey]) -> Artifact:
    """The artifact in `data` if it is well formed, consistent, and signed by one of
    `keys`; ArtifactError or SignatureError saying why not."""
    artifact = loads(data, name)
    verify(artifact, keys)
    patch_of(artifact)
    return artifact


def describe(artifact: Artifact) -> dict[str, Any]:
    """The facts a client needs to choose an artifact without downloading it: the
    `custom` field of its TUF target, and the server's record of it."""
    payload = artifact.payload
    module = payload.module
    return {
        "patch_id": payload.patch.id,
        "version": payload.patch.version,
        "title": payload.patch.title,
        "artifact_id": artifact.id,
        "module": {"name": module.name, "build_id": module.build_id, "sha256": module.sha256},
    }

"""What the server checks in an uploaded artifact, and what it records of it.

Only `trust.artifact` runs on the bytes: parsing, the content id, the
signatures and the consistency of the source with the recorded facts
(`patch_of`, `python_patch_of` for a CPython artifact). No compiler and no
assembler runs on what a client uploaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from micropatch.trust.artifact import (
    AnyArtifact,
    PythonArtifact,
    from_any_envelope,
    patch_of,
    verify,
)
from micropatch.trust.envelope import read_envelope
from micropatch.trust.keys import PublicKey
from micropatch.trust.pypayload import python_patch_of


def check(data: bytes, name: str, keys: Sequence[PublicKey]) -> AnyArtifact:
    """The artifact in `data` (native or CPython) if it is well formed, consistent,
    and signed by one of `keys`; ArtifactError or SignatureError saying why not."""
    artifact = from_any_envelope(read_envelope(data, name))
    verify(artifact, keys)
    if isinstance(artifact, PythonArtifact):
        python_patch_of(artifact.payload, name)
    else:
        patch_of(artifact)
    return artifact


def describe(artifact: AnyArtifact) -> dict[str, Any]:
    """The facts a client needs to choose an artifact without downloading it: the
    `custom` field of its TUF target, and the server's record of it. A CPython
    patch's module is known by its name and its source's SHA-256 (no build-id)."""
    payload = artifact.payload
    module = payload.module
    python = isinstance(artifact, PythonArtifact)
    return {
        "patch_id": payload.patch.id,
        "version": payload.patch.version,
        "title": payload.patch.title,
        "artifact_id": artifact.id,
        "runtime": "cpython" if python else "native",
        "module": {"name": module.name, "build_id": None if python else module.build_id,  # type: ignore[union-attr]
                   "sha256": module.sha256},
    }  # fmt: skip

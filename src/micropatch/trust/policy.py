"""The one admission policy: what may be applied to a process, with which keys.

`admit` takes the bytes of a patch file (a signed artifact, or a TOML source),
the trusted keys and the options, and returns an `Admitted` patch or raises a
specific error. It prints nothing and reads no global state: the CLI, `dev
run`, the agent and the server all call it, and each decides what to show.
The live engine takes only an `Admitted`, so nothing reaches a process
without passing here.

The policy:
- a signed artifact is admitted if its id matches its content and at least
  one signature is by a trusted, unexpired key; the patch is parsed from the
  very bytes that were verified, and its C bodies are the signed machine code
  (no compiler runs on the applying host);
- with `allow_unsigned` (development only), a TOML source is admitted as is,
  and an artifact without signatures, or with no keys to check them, is
  admitted unverified; each such case is reported in `warnings`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from micropatch.bodies.toolchain import Toolchain
from micropatch.errors import ArtifactError, NotAdmitted
from micropatch.patch.model import Patch
from micropatch.patch.python import PythonPatch
from micropatch.patch.source import parse_source
from micropatch.trust.artifact import (
    MAX_SIZE,
    Artifact,
    PythonArtifact,
    compiled_bodies,
    loads_any,
    patch_of,
    verify,
)
from micropatch.trust.keys import PublicKey
from micropatch.trust.pypayload import python_patch_of
from micropatch.trust.signatures import Verification


@dataclass(frozen=True)
class Admitted:
    """A patch the policy lets through, with the toolchain that compiles its bodies."""

    patch: Patch
    toolchain: Toolchain
    artifact: Artifact | None = None  # None: an unsigned TOML source
    verification: Verification | None = None  # None: signatures were not checked
    warnings: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.patch.id

    @property
    def version(self) -> int:
        return self.patch.version


@dataclass(frozen=True)
class AdmittedPython:
    """A CPython patch the policy lets through (always a built artifact: its code
    is compiled for one Python version)."""

    patch: PythonPatch
    artifact: PythonArtifact
    verification: Verification | None = None  # None: signatures were not checked
    warnings: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.patch.id

    @property
    def version(self) -> int:
        return self.patch.version


def is_source(data: bytes, name: str = "") -> bool:
    """A TOML source rather than an artifact: by suffix, else by content (an
    artifact is a JSON object; a TOML document cannot start with `{`)."""
    if name.endswith(".toml"):
        return True
    if name.endswith(".mpatch"):
        return False
    return not data[:4096].lstrip().startswith(b"{")


def admit(
    data: bytes,
    *,
    name: str,
    keys: Sequence[PublicKey] | None,
    allow_unsigned: bool = False,
    toolchain: Toolchain | None = None,
    now: datetime.datetime | None = None,
) -> Admitted:
    """Apply the policy to the bytes of a native patch file; `name` says where they
    came from in messages. `keys`: the trusted keys (None: none could be found,
    which only `allow_unsigned` accepts). `toolchain`: compiles an unsigned
    source's bodies (default: a new one). Raises NotAdmitted, ArtifactError,
    SignatureError or PatchFormatError saying why; a CPython patch is refused
    here (see `admit_any`).
    """
    admitted = admit_any(
        data, name=name, keys=keys, allow_unsigned=allow_unsigned, toolchain=toolchain, now=now
    )
    if isinstance(admitted, AdmittedPython):
        raise NotAdmitted(
            f"{name} is a CPython artifact (a patch of Python functions), where a native patch "
            "is expected"
        )
    return admitted


def admit_any(
    data: bytes,
    *,
    name: str,
    keys: Sequence[PublicKey] | None,
    allow_unsigned: bool = False,
    toolchain: Toolchain | None = None,
    now: datetime.datetime | None = None,
) -> Admitted | AdmittedPython:
    """`admit` for a patch of either runtime: the same rules for both."""
    if is_source(data, name):
        if not allow_unsigned:
            raise NotAdmitted(
                f"{name} is a patch source, and only signed artifacts are applied: build and "
                f"sign it (micropatch build {name} --module MODULE_FILE --key KEY.key), then "
                "apply the .mpatch file; for development only, --allow-unsigned applies a "
                "source as is"
            )
        patch = parse_source(data, name)
        if isinstance(patch, PythonPatch):
            raise NotAdmitted(
                f"{name} is a CPython patch source: its code must first be compiled for the "
                f"target's Python version (micropatch build {name} --module FILE.py "
                "[--python PYTHON]); --allow-unsigned then applies the unsigned .mpatch"
            )
        warning = f"applying the unsigned patch source {name} (--allow-unsigned: development only)"
        return Admitted(patch, toolchain or Toolchain(), warnings=(warning,))
    artifact = loads_any(data, name)  # read once: the bytes verified are the bytes applied
    verification = None
    warnings: tuple[str, ...] = ()
    if keys is None or (allow_unsigned and not artifact.signatures):
        if not allow_unsigned:
            raise NotAdmitted(
                f"{name}: no trusted keys to check its signatures; pass --trust KEY.pub or "
                "install the signers' keys in the trust directory"
            )
        warnings = (
            f"applying {name} without checking its signatures (--allow-unsigned: "
            "development only)",
        )
    else:
        verification = verify(artifact, keys, now)
        warnings = tuple(f"{name}: ignored a signature: {note}" for note in verification.ignored)
    # Parsed from the very bytes that were hashed and verified: what is applied is
    # what was signed, checked against the recorded module identity and sites.
    if isinstance(artifact, PythonArtifact):
        patch_py = python_patch_of(artifact.payload, artifact.name)
        return AdmittedPython(patch_py, artifact, verification, warnings)
    patch = patch_of(artifact)
    return Admitted(
        patch, Toolchain.signed(compiled_bodies(artifact)), artifact, verification, warnings
    )


def admit_file(
    path: str | Path,
    *,
    keys: Sequence[PublicKey] | None,
    allow_unsigned: bool = False,
    toolchain: Toolchain | None = None,
    now: datetime.datetime | None = None,
) -> Admitted:
    """`admit` for a file: reads it once, at most the largest artifact size."""
    return admit(
        read_patch_file(path),
        name=str(path),
        keys=keys,
        allow_unsigned=allow_unsigned,
        toolchain=toolchain,
        now=now,
    )


def admit_any_file(
    path: str | Path,
    *,
    keys: Sequence[PublicKey] | None,
    allow_unsigned: bool = False,
    now: datetime.datetime | None = None,
) -> Admitted | AdmittedPython:
    """`admit_any` for a file."""
    return admit_any(
        read_patch_file(path), name=str(path), keys=keys, allow_unsigned=allow_unsigned, now=now
    )


def read_patch_file(path: str | Path) -> bytes:
    """The bytes of a patch file, read once, at most the largest artifact size."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror}") from exc

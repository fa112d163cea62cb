"""Admission, in one place: what may be applied to a process, with which keys.

`admit` takes the bytes of a patch file (a signed artifact, or a TOML source),
the trusted keys and the options, and returns an `Admitted` patch or raises a
specific error. It prints nothing and reads no global state: the CLI, `dev
run`, the agent and the server all call it, and each decides what to show.
The live engine takes only an `Admitted`, so nothing reaches a process
without passing here.

The rules:
- a signed artifact is admitted if its id matches its content and at least
  one signature is by a trusted, unexpired key; the signatures are checked
  before anything in the payload is read, the patch is read from the very
  bytes that were verified (as the artifact records it, `trust.recorded`: no
  model framework, no source parser), and its C bodies are the signed machine
  code (no compiler runs on the applying host);
- with `allow_unsigned` (development only), a TOML source is admitted as is,
  and an artifact without signatures, or with no keys to check them, is
  admitted unverified; each such case is reported in `warnings`.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from micropatch.errors import MicropatchError, NotAdmitted
from micropatch.trust.envelope import Envelope, read, read_envelope
from micropatch.trust.keys import PublicKey
from micropatch.trust.recorded import recorded_patch
from micropatch.trust.signatures import Verification, verify_signatures

if TYPE_CHECKING:
    from micropatch.bodies.cbody import CompiledC
    from micropatch.bodies.toolchain import Toolchain
    from micropatch.patch.python import PythonPatch
    from micropatch.patch.view import PatchView
    from micropatch.trust.artifact import Artifact, PythonArtifact


class _Admission:
    """What an admitted patch of either runtime says of itself."""

    if TYPE_CHECKING:  # fields of each dataclass below
        patch: PatchView | PythonPatch
        verification: Verification | None

    @property
    def id(self) -> str:
        return self.patch.id

    @property
    def version(self) -> int:
        return self.patch.version

    def described(self, name: str) -> str | None:
        """`verified NAME: fix v2 for libfoo.so.1, signed by key 'release' (…)`, or
        None if no signature was checked."""
        if self.verification is None:
            return None
        signers = ", ".join(k.describe() for k in self.verification.signers)
        return f"verified {name}: {self.id} v{self.version} for {self._target}, signed by {signers}"

    @property
    def _target(self) -> str:
        return self.patch.target.module


@dataclass(frozen=True)
class Admitted(_Admission):
    """A patch admission lets through, with the toolchain that compiles its bodies."""

    patch: PatchView
    envelope: Envelope | None = None  # None: an unsigned TOML source
    verification: Verification | None = None  # None: signatures were not checked
    warnings: tuple[str, ...] = ()
    compiled: Mapping[str, CompiledC] = field(default_factory=dict)  # signed C bodies
    source_toolchain: Toolchain | None = None  # an unsigned source's (the caller's)
    runtime = "native"

    @cached_property
    def toolchain(self) -> Toolchain:
        """What compiles and assembles the bodies: for a signed artifact, one that runs
        only its signed C code. Made on first use: a trampoline the artifact carries
        precomputed is placed without it (`live.placed`), and the assembler never loads."""
        if self.source_toolchain is not None:
            return self.source_toolchain
        from micropatch.bodies.toolchain import Toolchain

        return Toolchain.signed(self.compiled)

    @cached_property
    def artifact(self) -> Artifact | None:
        """The artifact with its whole payload validated (None for a source): made on
        first use, since applying needs only the recorded patch."""
        if self.envelope is None:
            return None
        from micropatch.trust.artifact import from_envelope

        return from_envelope(self.envelope)


@dataclass(frozen=True)
class AdmittedPython(_Admission):
    """A CPython patch admission lets through (always a built artifact: its code
    is compiled for one Python version). `runtime` says which engine applies it."""

    patch: PythonPatch
    artifact: PythonArtifact
    verification: Verification | None = None  # None: signatures were not checked
    warnings: tuple[str, ...] = ()
    runtime = "cpython"

    @property
    def _target(self) -> str:
        return f"Python module {self.patch.target.module}"


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
    """Admit or refuse the bytes of a patch file; `name` says where they came
    from in messages. `keys`: the trusted keys (None: none could be found,
    which only `allow_unsigned` accepts). `toolchain`: compiles an unsigned
    source's bodies (default: a new one). Raises NotAdmitted, ArtifactError,
    SignatureError or PatchFormatError saying why; a CPython patch is refused
    here (the agent does not carry them yet: see `admit_any`).
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
    """`admit` for a patch of either runtime: the same rules for both. The runtime
    is data in the artifact (`payload.runtime`), read after its signatures."""
    if is_source(data, name):
        if not allow_unsigned:
            raise NotAdmitted(
                f"{name} is a patch source, and only signed artifacts are applied: build and "
                f"sign it (micropatch build {name} --module MODULE_FILE --key KEY.key), then "
                "apply the .mpatch file; for development only, --allow-unsigned applies a "
                "source as is"
            )
        from micropatch.patch.python import PythonPatch
        from micropatch.patch.source import parse_source

        patch = parse_source(data, name)
        if isinstance(patch, PythonPatch):
            raise NotAdmitted(
                f"{name} is a CPython patch source: its code must first be compiled for the "
                f"target's Python version (micropatch build {name} --module FILE.py "
                "[--python PYTHON]); --allow-unsigned then applies the unsigned .mpatch"
            )
        warning = f"applying the unsigned patch source {name} (--allow-unsigned: development only)"
        if toolchain is None:
            from micropatch.bodies.toolchain import Toolchain

            toolchain = Toolchain()
        return Admitted(patch, warnings=(warning,), source_toolchain=toolchain)
    envelope = read_envelope(data, name)  # read once: the bytes verified are the bytes applied
    verification = None
    warnings: tuple[str, ...] = ()
    if keys is None or (allow_unsigned and not envelope.signatures):
        if not allow_unsigned:
            raise NotAdmitted(
                f"{name}: no trusted keys to check its signatures; pass --trust KEY.pub or "
                "install the signers' keys in the trust directory"
            )
        warnings = (
            f"applying {name} without checking its signatures (--allow-unsigned: development only)",
        )
    else:
        verification = verify_signatures(name, envelope.canonical, envelope.signatures, keys, now)
        warnings = tuple(f"{name}: ignored a signature: {note}" for note in verification.ignored)
    # Read from the very bytes that were hashed and verified: what is applied is
    # what was signed, checked against the recorded module identity and sites.
    if envelope.payload.get("runtime") == "cpython":
        from micropatch.trust.artifact import PythonArtifact, from_any_envelope
        from micropatch.trust.pypayload import python_patch_of

        artifact = from_any_envelope(envelope)
        assert isinstance(artifact, PythonArtifact)
        patch_py = python_patch_of(artifact.payload, artifact.name)
        return AdmittedPython(patch_py, artifact, verification, warnings)
    recorded, compiled = recorded_patch(envelope.payload, name)
    return Admitted(recorded, envelope, verification, warnings, compiled)


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
        read(path),
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
    """`admit_any` for a file: reads it once, at most the largest artifact size."""
    data = read(path)
    return admit_any(data, name=str(path), keys=keys, allow_unsigned=allow_unsigned, now=now)


def runtime_of_file(path: str | Path) -> str | None:
    """The runtime a patch file declares ("cpython"; "native" when it says none), read
    without checking anything else; None if it cannot be read as a patch."""
    import json

    try:
        data = read(path)
        if not is_source(data, str(path)):
            runtime = json.loads(data)["payload"].get("runtime")
        else:
            import tomllib  # only for a source: an artifact is JSON

            runtime = tomllib.loads(data.decode("utf-8")).get("target", {}).get("runtime")
    except (MicropatchError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    return str(runtime) if runtime else "native"

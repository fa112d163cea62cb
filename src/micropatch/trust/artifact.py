"""Artifacts (.mpatch): a patch verified against its module file, signed.

`micropatch.build.artifact.build` writes what it proved about a patch and its
module into a JSON document::

    {"id": SHA-256 of the canonical payload,
     "payload": {"format": "micropatch-artifact", "format_version": 1,
                 "patch": {...the source TOML and its parsed model...},
                 "module": {...}, "sites": [...], "builder": {...}},
     "signatures": [{"keyid": ..., "sig": ...}, ...]}

The canonical payload is its JSON with sorted keys, no whitespace and ASCII
escapes; the id (the content address) and every Ed25519 signature are over
those bytes. Loading recomputes them from what was parsed, so nothing outside
the payload, not the file's layout nor its name, is trusted.

The source is authoritative: `patch_of` parses the payload's source again and
checks it against the recorded facts, so the patch a process receives is
exactly the one that was verified and signed. The parsed model is stored
for readers; docs/signing.md describes every field.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Self, TypeVar

from pydantic import BaseModel, ValidationError

from micropatch.bodies.cbody import CompiledC
from micropatch.errors import ArtifactError
from micropatch.files import write_atomic
from micropatch.patch.model import Patch
from micropatch.patch.source import parse_patch
from micropatch.patch.view import readings
from micropatch.trust.canonical import canonical_json, digest
from micropatch.trust.envelope import SUFFIX, Envelope, read, read_envelope
from micropatch.trust.keys import PrivateKey, PublicKey, Signature
from micropatch.trust.payload import Payload
from micropatch.trust.pypayload import RUNTIME as PYTHON_RUNTIME
from micropatch.trust.pypayload import PythonPayload
from micropatch.trust.recorded import ModuleFact, SiteFact, check_facts, recorded_patch
from micropatch.trust.signatures import Verification, verify_signatures

# --- the artifact ---------------------------------------------------------------


P = TypeVar("P", Payload, PythonPayload)


@dataclass(frozen=True)
class _Signed(Generic[P]):
    """What every artifact is, whatever its runtime: a payload, its canonical bytes
    and signatures over them. `name` says where it came from, for messages."""

    payload: P
    canonical: bytes  # exactly the bytes the id and signatures are over
    signatures: tuple[Signature, ...] = ()
    name: str = "<artifact>"

    @property
    def id(self) -> str:
        """The content address: SHA-256 of the canonical payload, hex."""
        return digest(self.canonical)

    @property
    def file_name(self) -> str:
        """`<patch-id>-v<version>-<first 12 hex of the id>.mpatch`"""
        return f"{self.payload.patch.id}-v{self.payload.patch.version}-{self.id[:12]}{SUFFIX}"

    def signed(self, key: PrivateKey, now: datetime.datetime | None = None) -> Self:
        """This artifact with one more signature (a key signs it once)."""
        signature = key.sign(self.canonical, now)
        others: tuple[Signature, ...] = tuple(
            x for x in self.signatures if x.keyid != signature.keyid
        )
        return type(self)(self.payload, self.canonical, (*others, signature), self.name)

    def to_bytes(self) -> bytes:
        """The file: indented for people; the canonical form is recomputed on load."""
        document = {
            "id": self.id,
            "payload": json.loads(self.canonical),
            "signatures": [s.to_json() for s in self.signatures],
        }
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("ascii")

    def write(self, path: str | Path) -> Path:
        """Write the artifact to `path` (a directory: under its default file name)."""
        path = Path(path)
        if path.is_dir():
            path = path / self.file_name
        try:
            return write_atomic(path, self.to_bytes(), mode=0o644)  # never half an artifact
        except OSError as exc:
            raise ArtifactError(f"cannot write {path}: {exc.strerror}") from None


class Artifact(_Signed[Payload]):
    """A native artifact: a patch of machine code in one module build."""


class PythonArtifact(_Signed[PythonPayload]):
    """A CPython artifact: a patch of Python functions in one module source
    (docs/python-patches.md)."""


AnyArtifact = Artifact | PythonArtifact


def make(payload: Payload, name: str) -> Artifact:
    """An unsigned artifact of `payload`; `name` says where it came from, for messages."""
    return Artifact(payload, canonical_json(payload.model_dump(mode="json")), (), name)


def make_python(payload: PythonPayload, name: str) -> PythonArtifact:
    """An unsigned CPython artifact of `payload`."""
    return PythonArtifact(payload, canonical_json(payload.model_dump(mode="json")), (), name)


# --- loading ----------------------------------------------------------------------


def load(path: str | Path) -> Artifact:
    """Read a native artifact file and check its structure and id (not its
    signatures: see `verify`). ArtifactError naming the file and the problem."""
    return _native(load_any(path))


def load_any(path: str | Path) -> AnyArtifact:
    """Read an artifact file of either runtime (`load`)."""
    return from_any_envelope(read_envelope(read(path), str(path)))


def loads(data: bytes, name: str = "<artifact>") -> Artifact:
    """Parse a native artifact from bytes; `name` says where they came from in messages."""
    return from_envelope(read_envelope(data, name))


def from_envelope(envelope: Envelope) -> Artifact:
    """The native artifact of a parsed envelope, its whole payload validated."""
    return _native(from_any_envelope(envelope))


def from_any_envelope(envelope: Envelope) -> AnyArtifact:
    """The artifact of a parsed envelope, of either runtime (`payload.runtime` is
    "cpython" for a Python patch, absent for a native one)."""
    python = envelope.payload.get("runtime") == PYTHON_RUNTIME
    model: type[BaseModel] = PythonPayload if python else Payload
    try:
        payload = model.model_validate(envelope.payload)
    except ValidationError as exc:
        raise ArtifactError(f"{envelope.name}: {_validation_problems(exc)}") from None
    if isinstance(payload, PythonPayload):
        return PythonArtifact(payload, envelope.canonical, envelope.signatures, envelope.name)
    assert isinstance(payload, Payload)
    return Artifact(payload, envelope.canonical, envelope.signatures, envelope.name)


def _native(artifact: AnyArtifact) -> Artifact:
    if isinstance(artifact, PythonArtifact):
        raise ArtifactError(
            f"{artifact.name}: a CPython artifact (a patch of Python functions), where a native "
            "one is expected"
        )
    return artifact


def _validation_problems(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = "payload" + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
        )
        kind = error["type"]
        if kind == "missing":
            text = "required field is missing"
        elif kind == "extra_forbidden":
            text = "unknown field"
        elif kind == "value_error":
            text = str(error.get("ctx", {}).get("error", error["msg"]))
        else:
            text = error["msg"][:1].lower() + error["msg"][1:]
        problems.append(f"{where}: {text}")
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:" + "".join(f"\n  {p}" for p in problems[:20])


# --- verifying and applying ------------------------------------------------------


def verify(
    artifact: AnyArtifact, trusted: Iterable[PublicKey], now: datetime.datetime | None = None
) -> Verification:
    """At least one signature over the canonical payload by a trusted, unexpired key;
    SignatureError saying why not."""
    return verify_signatures(artifact.name, artifact.canonical, artifact.signatures, trusted, now)


def patch_of(artifact: Artifact) -> Patch:
    """The patch to apply: parsed from the payload's source, checked against the
    recorded module identity and sites, with every site's expected bytes set to
    the original bytes that `build` verified (or the source's `expect`, where it
    covers more than the site: `build` verified those too)."""
    payload = artifact.payload
    patch = parse_patch(payload.patch.source, f"{artifact.name}: {payload.patch.source_name}")
    if (patch.id, patch.version) != (payload.patch.id, payload.patch.version):
        raise ArtifactError(
            f"{artifact.name}: its source is patch {patch.id} v{patch.version}, but it is "
            f"labelled {payload.patch.id} v{payload.patch.version}; the artifact is "
            "inconsistent, rebuild it"
        )
    module = ModuleFact(payload.module.name, payload.module.build_id, payload.module.sha256)
    sites = [SiteFact(s.patchlet, s.at, s.original_bytes) for s in payload.sites]
    expects = check_facts(patch, module, sites, artifact.name)
    patchlets = tuple(
        p.model_copy(update={"expect": e}) for p, e in zip(patch.patchlets, expects, strict=True)
    )
    filled = patch.model_copy(update={"patchlets": patchlets})
    # What apply reads is the recorded model (trust.recorded): it must say what the
    # source says, field for field.
    recorded, _ = recorded_patch(json.loads(artifact.canonical), artifact.name)
    for (name, ours), (_, theirs) in zip(readings(filled), readings(recorded), strict=True):
        if ours != theirs:
            raise ArtifactError(
                f"{artifact.name}: its recorded model says {name} = {theirs!r}, its source "
                f"{ours!r}; the artifact is inconsistent, rebuild it"
            )
    return filled


def compiled_bodies(artifact: Artifact) -> dict[str, CompiledC]:
    """The C bodies built and signed with the artifact, keyed by their source text:
    the host that applies it runs these bytes and needs no compiler."""
    patch = patch_of(artifact)
    compiled = {}
    for site in artifact.payload.sites:
        source = patch.patchlets[site.patchlet].c
        if source is not None and site.c_code is not None and site.c_entry is not None:
            compiled[source] = CompiledC(bytes.fromhex(site.c_code), site.c_entry)
    return compiled

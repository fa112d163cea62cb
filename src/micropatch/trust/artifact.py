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
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

from pydantic import BaseModel, ValidationError

from micropatch import __version__
from micropatch.bodies.cbody import CompiledC
from micropatch.errors import ArtifactError
from micropatch.patch.model import Patch
from micropatch.patch.source import parse_patch
from micropatch.trust.canonical import canonical_json, digest
from micropatch.trust.keys import PrivateKey, PublicKey, Signature
from micropatch.trust.payload import Payload
from micropatch.trust.pypayload import RUNTIME as PYTHON_RUNTIME
from micropatch.trust.pypayload import PythonPayload
from micropatch.trust.signatures import Verification, verify_signatures

FORMAT = "micropatch-artifact"
FORMAT_VERSION = 1
SUFFIX = ".mpatch"
MAX_SIZE = 64 << 20  # no real artifact comes near; refuse before parsing a huge file



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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(self.to_bytes())
            os.replace(tmp, path)  # readers never see half an artifact
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ArtifactError(f"cannot write {path}: {exc.strerror}") from None
        return path


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
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read artifact: {exc.strerror}") from None
    return loads_any(data, str(path))


def loads(data: bytes, name: str = "<artifact>") -> Artifact:
    """Parse a native artifact from bytes; `name` says where they came from in messages."""
    return _native(loads_any(data, name))


def _native(artifact: AnyArtifact) -> Artifact:
    if isinstance(artifact, PythonArtifact):
        raise ArtifactError(
            f"{artifact.name}: a CPython artifact (a patch of Python functions), where a native "
            "one is expected"
        )
    return artifact


def loads_any(data: bytes, name: str = "<artifact>") -> AnyArtifact:
    """Parse an artifact of either runtime from bytes (`payload.runtime` is
    "cpython" for a Python patch, absent for a native one)."""

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"{name}: {problem}")

    if len(data) > MAX_SIZE:
        raise bad(f"is larger than {MAX_SIZE >> 20} MiB, which no artifact is")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"not an artifact: not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        at_end = exc.pos >= len(text.rstrip())
        where = "the end" if at_end else f"line {exc.lineno}, column {exc.colno}"
        what = exc.msg[:1].lower() + exc.msg[1:]
        raise bad(
            f"not an artifact: invalid JSON at {where} ({what}); truncated or corrupt?"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise bad(f"not an artifact: invalid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise bad("not an artifact: expected a JSON object with id, payload and signatures")
    missing = [k for k in ("id", "payload", "signatures") if k not in document]
    if missing:
        raise bad(f"not an artifact: missing field {', '.join(map(repr, missing))}")
    extra = sorted(set(document) - {"id", "payload", "signatures"})
    if extra:
        raise bad(f"unknown top-level field {extra[0]!r} (allowed: id, payload, signatures)")
    raw = document["payload"]
    if not isinstance(raw, dict):
        raise bad("payload: must be a JSON object")
    _check_format(raw, bad)
    try:
        canonical = canonical_json(raw)
    except ArtifactError as exc:
        raise bad(f"payload: {exc}") from None
    claimed = document["id"]
    actual = digest(canonical)
    if claimed != actual:
        raise bad(
            f"the payload's SHA-256 is {actual}, but the artifact says {claimed!r}: it was "
            "modified or corrupted after it was built"
        )
    python = raw.get("runtime") == PYTHON_RUNTIME
    model: type[BaseModel] = PythonPayload if python else Payload
    try:
        payload = model.model_validate(raw)
    except ValidationError as exc:
        raise bad(_validation_problems(exc)) from None
    if not isinstance(document["signatures"], list):
        raise bad("signatures: must be a list")
    signatures = []
    for i, entry in enumerate(document["signatures"]):
        try:
            signatures.append(Signature.from_json(entry))
        except ValueError as exc:
            raise bad(f"signatures[{i}]: {exc}") from None
    if isinstance(payload, PythonPayload):
        return PythonArtifact(payload, canonical, tuple(signatures), name)
    assert isinstance(payload, Payload)
    return Artifact(payload, canonical, tuple(signatures), name)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two values for one key would make "the" payload depend on the parser.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_format(raw: dict[str, Any], bad: Callable[[str], ArtifactError]) -> None:
    kind, version = raw.get("format"), raw.get("format_version")
    if kind != FORMAT:
        raise bad(f"payload.format: {kind!r} is not {FORMAT!r}; not a micropatch artifact")
    if type(version) is not int:
        raise bad(f"payload.format_version: must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        newer = " it was built by a newer micropatch: upgrade" if version > FORMAT_VERSION else ""
        raise bad(
            f"payload.format_version: version {version} is not supported (this micropatch "
            f"{__version__} reads version {FORMAT_VERSION});{newer or ' rebuild it'}"
        )


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


def full_expect(given: bytes | None, original: bytes) -> bytes | None:
    """The bytes to expect at a site: the site's original bytes, or the author's
    `expect` where it covers more (up to `resume`, say), which `build` checked
    against the module file; None if the two disagree where both speak."""
    if given is None:
        return original
    common = min(len(given), len(original))
    if given[:common] != original[:common]:
        return None
    return given if len(given) > len(original) else original


def patch_of(artifact: Artifact) -> Patch:
    """The patch to apply: parsed from the payload's source, checked against the
    recorded module identity and sites, with every site's expected bytes set to
    the original bytes that `build` verified (or the source's `expect`, where it
    covers more than the site: `build` verified those too)."""
    payload = artifact.payload

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(
            f"{artifact.name}: {problem}; the artifact is inconsistent, rebuild it"
        )

    patch = parse_patch(payload.patch.source, f"{artifact.name}: {payload.patch.source_name}")
    target, module = patch.target, payload.module
    if (patch.id, patch.version) != (payload.patch.id, payload.patch.version):
        raise bad(
            f"its source is patch {patch.id} v{patch.version}, but it is labelled "
            f"{payload.patch.id} v{payload.patch.version}"
        )
    if target.module != module.name:
        raise bad(f"its source targets {target.module}, but it was built for {module.name}")
    if target.build_id is not None and target.build_id != module.build_id:
        raise bad(
            f"its source targets build-id {target.build_id}, but it was built against "
            f"build-id {module.build_id}"
        )
    if target.sha256 is not None and target.sha256 != module.sha256:
        raise bad(
            f"its source targets sha256 {target.sha256}, but it was built against {module.sha256}"
        )
    sites = sorted(payload.sites, key=lambda s: s.patchlet)
    if [s.patchlet for s in sites] != list(range(len(patch.patchlets))):
        raise bad(
            f"its source has {len(patch.patchlets)} patchlets, but sites are recorded for "
            f"patchlets {[s.patchlet for s in sites]}"
        )
    patchlets = []
    for site, patchlet in zip(sites, patch.patchlets, strict=True):
        if site.at != patchlet.at:
            raise bad(
                f"patchlet[{site.patchlet}] is at {patchlet.at!r} in its source, but its site "
                f"was recorded for {site.at!r}"
            )
        expect = full_expect(patchlet.expect, site.original_bytes)
        if expect is None:
            assert patchlet.expect is not None
            raise bad(
                f"patchlet[{site.patchlet}] expects {patchlet.expect.hex(' ')}, but the site "
                f"recorded holds {site.original_bytes.hex(' ')}"
            )
        patchlets.append(patchlet.model_copy(update={"expect": expect}))
    return patch.model_copy(update={"patchlets": tuple(patchlets)})


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

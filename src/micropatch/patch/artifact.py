"""Built patch artifacts (.mpatch): a patch verified against its module file, signed.

`build` compiles every patchlet of a source against the module file, with
no process involved, and records what it proved: the module's identity, and
per patchlet its module offset, the site's length and original bytes, and
whether the trampoline steps over the red zone. The result is a JSON
document::

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
import hashlib
import json
import os
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from micropatch import __version__
from micropatch.elf.identity import ModuleIdentity, identify
from micropatch.elf.image import ElfImage
from micropatch.elf.location import Location
from micropatch.errors import ArtifactError, ElfError, MicropatchError, ModuleMismatch
from micropatch.patch.cbody import CompiledC, compile_c, provide_compiled
from micropatch.patch.model import Patch
from micropatch.patch.plan import ModuleView, PlannedSite, plan_patch
from micropatch.patch.signing import (
    PrivateKey,
    PublicKey,
    Signature,
    Verification,
    format_time,
    parse_time,
    utc_now,
    verify_signatures,
)
from micropatch.patch.source import parse_patch
from micropatch.x86.trampoline import build_trampoline

FORMAT = "micropatch-artifact"
FORMAT_VERSION = 1
SUFFIX = ".mpatch"
MAX_SIZE = 64 << 20  # no real artifact comes near; refuse before parsing a huge file

# Where `build` and `inspect --module` pretend a position-independent module
# is loaded, and where its trampolines go: any page-aligned address works,
# since a site's bytes and offsets do not depend on it. A non-PIE executable
# is placed at its own image base, where it always loads.
PLACEHOLDER_BASE = 0x7F00_0000_0000
_PAGE = 4096
_CAVE_GAP = 1 << 20


def canonical_json(value: object) -> bytes:
    """The canonical bytes of a JSON value: sorted keys, no whitespace, ASCII only.

    ArtifactError if the value has no canonical form (floats, NaN, nesting too
    deep to encode).
    """
    _refuse_floats(value)
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (ValueError, TypeError, RecursionError) as exc:
        raise ArtifactError(f"value has no canonical JSON form: {exc}") from None


def _refuse_floats(value: object, depth: int = 0) -> None:
    # Floats have several spellings of one value; an artifact has no use for them.
    if depth > 200:
        raise ArtifactError("value has no canonical JSON form: nested more than 200 levels")
    if isinstance(value, float):
        raise ArtifactError(f"value has no canonical JSON form: float {value!r}")
    if isinstance(value, dict):
        for item in value.values():
            _refuse_floats(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_floats(item, depth + 1)


def digest(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()


# --- the payload --------------------------------------------------------------


class _Strict(BaseModel):
    # Strict and closed: a reader of version 1 refuses what it does not know,
    # and every field is required, so the model dumps back to what was hashed.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _hex(value: str, size: int | None = None) -> str:
    if len(value) % 2 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("must be lowercase hex digits, two per byte")
    if size is not None and len(value) != 2 * size:
        raise ValueError(f"must be {2 * size} hex digits")
    return value


class PatchFacts(_Strict):
    """The patch: its source (authoritative) and the model parsed from it."""

    id: str
    version: int
    title: str | None
    source_name: str
    source: str
    model: dict[str, Any]


class ModuleFacts(_Strict):
    """The module file the patch was built and verified against."""

    name: str  # the patch's [target] module: the name matched in /proc/PID/maps
    file: str  # base name of the file given to `build`
    build_id: str | None
    sha256: str
    pie: bool  # position-independent (PIE or shared object); else loads at its own address

    @field_validator("build_id")
    @classmethod
    def _build_id(cls, value: str | None) -> str | None:
        return None if value is None else _hex(value)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        return _hex(value, 32)


class SiteFacts(_Strict):
    """What `build` proved about one patchlet's site."""

    patchlet: int = Field(ge=0)
    at: str
    offset: int = Field(ge=0)  # module offset of the site
    length: int = Field(ge=5, le=64)  # bytes the jump overwrites: whole instructions
    original: str  # those bytes in the module file, hex
    resume: int | None = Field(ge=0)  # module offset to continue at; None: after the site
    skip_red_zone: bool  # the trampoline steps over the 128-byte red zone first
    # A C body as built (hex) and the offset of `patchlet` in it: the host that
    # applies the artifact runs these signed bytes, and needs no compiler.
    c_code: str | None = None
    c_entry: int | None = Field(default=None, ge=0)

    @field_validator("original")
    @classmethod
    def _original(cls, value: str) -> str:
        return _hex(value)

    @field_validator("c_code")
    @classmethod
    def _c_code(cls, value: str | None) -> str | None:
        return None if value is None else _hex(value)

    @property
    def original_bytes(self) -> bytes:
        return bytes.fromhex(self.original)


class BuilderFacts(_Strict):
    name: str
    version: str
    built_at: str

    @field_validator("built_at")
    @classmethod
    def _time(cls, value: str) -> str:
        parse_time(value)
        return value


class Payload(_Strict):
    """Everything the id and the signatures cover."""

    format: str
    format_version: int
    patch: PatchFacts
    module: ModuleFacts
    sites: list[SiteFacts] = Field(min_length=1)
    builder: BuilderFacts


# --- the artifact ---------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A loaded or freshly built artifact. `name` says where it came from, for messages."""

    payload: Payload
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

    def signed(self, key: PrivateKey, now: datetime.datetime | None = None) -> Artifact:
        """This artifact with one more signature (a key signs it once)."""
        signature = key.sign(self.canonical, now)
        others = tuple(s for s in self.signatures if s.keyid != signature.keyid)
        return Artifact(self.payload, self.canonical, (*others, signature), self.name)

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


def _make(payload: Payload, name: str) -> Artifact:
    return Artifact(payload, canonical_json(payload.model_dump(mode="json")), (), name)


# --- loading ----------------------------------------------------------------------


def load(path: str | Path) -> Artifact:
    """Read an artifact file and check its structure and id (not its signatures:
    see `verify`). ArtifactError naming the file and the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read artifact: {exc.strerror}") from None
    return loads(data, str(path))


def loads(data: bytes, name: str = "<artifact>") -> Artifact:
    """Parse an artifact from bytes; `name` says where they came from in messages."""

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
    try:
        payload = Payload.model_validate(raw)
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
    artifact: Artifact, trusted: Iterable[PublicKey], now: datetime.datetime | None = None
) -> Verification:
    """At least one signature over the canonical payload by a trusted, unexpired key;
    SignatureError saying why not."""
    return verify_signatures(artifact.name, artifact.canonical, artifact.signatures, trusted, now)


@dataclass(frozen=True)
class Verified:
    """An artifact that passed `open_verified`, and the patch to give the engine."""

    artifact: Artifact
    verification: Verification
    patch: Patch


def open_verified(
    path: str | Path, trusted: Iterable[PublicKey], now: datetime.datetime | None = None
) -> Verified:
    """The apply policy in one call: load the artifact, check its id and a
    signature by a trusted, unexpired key, and derive the patch from the very
    bytes that were verified (`patch_of`)."""
    loaded = load(path)
    verification = verify(loaded, trusted, now)
    return Verified(loaded, verification, patch_of(loaded))


def patch_of(artifact: Artifact) -> Patch:
    """The patch to apply: parsed from the payload's source, checked against the
    recorded module identity and sites, with every site's expected bytes set to
    the original bytes that `build` verified."""
    payload = artifact.payload

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(
            f"{artifact.name}: {problem}; the artifact is inconsistent, rebuild it"
        )

    _provide_compiled_c(payload)
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
        expect = site.original_bytes
        if patchlet.expect is not None and not expect.startswith(patchlet.expect):
            raise bad(
                f"patchlet[{site.patchlet}] expects {patchlet.expect.hex(' ')}, but the site "
                f"recorded holds {expect.hex(' ')}"
            )
        patchlets.append(patchlet.model_copy(update={"expect": expect}))
    return patch.model_copy(update={"patchlets": tuple(patchlets)})


# --- building --------------------------------------------------------------------


def open_module(path: str | Path) -> FileModule:
    """A module file as if loaded: at PLACEHOLDER_BASE if it is position-independent,
    else at its own image base. No process is involved; `pid` is 0."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            identity = identify(f)
            image = ElfImage.from_file(f, path.name)
    except OSError as exc:
        raise ElfError(f"cannot read module file {path}: {exc.strerror}") from None
    return _file_module(path, identity, image)


@dataclass(frozen=True)
class FileModule:
    """A module file placed at an address, as the planner sees a loaded one."""

    path: str
    base: int
    identity: ModuleIdentity
    image: ElfImage

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def high(self) -> int:
        span = max(s.offset + s.memsz for s in self.image.segments)
        return self.base + (span + _PAGE - 1) // _PAGE * _PAGE

    def address(self, offset: int) -> int:
        return self.base + offset


def _file_module(path: Path, identity: ModuleIdentity, image: ElfImage) -> FileModule:
    base = PLACEHOLDER_BASE if image.is_pie_or_shared else image.image_base
    return FileModule(str(path), base, identity, image)


ELSEWHERE = 0x7FFF_F000_0000
"""Stand-in for another module's symbol at build time: far from the module, as a
shared library usually is from an executable, so that code which could only reach
it with a rel32 (`call {libc.so.6!abort}`) fails here rather than in a process;
`mov rax, {libc.so.6!abort}` then `call rax` reaches anything."""


def _elsewhere(location: Location) -> int:
    return ELSEWHERE + location.addend


def placeholder_cave(module: ModuleView) -> int:
    """A page-aligned address just above the module, in reach of every site."""
    return (module.high + _CAVE_GAP + _PAGE - 1) // _PAGE * _PAGE


def check_identity(patch: Patch, module: ModuleView, source: str) -> None:
    """ModuleMismatch unless the module file is the build the patch targets."""
    target, identity = patch.target, module.identity
    problems = []
    if target.build_id is not None and identity.build_id != target.build_id:
        problems.append(f"build-id {identity.build_id or 'none'} (patch: {target.build_id})")
    if target.sha256 is not None and identity.sha256 != target.sha256:
        problems.append(f"sha256 {identity.sha256} (patch: {target.sha256})")
    if problems:
        raise ModuleMismatch(
            f"{module.path} is not the build {source} was written for: it has "
            + " and ".join(problems)
            + "; build against the exact module file the patch targets"
        )


def build(
    source: str | Path, module_file: str | Path, *, now: datetime.datetime | None = None
) -> Artifact:
    """Compile and verify every patchlet of the source against the module file;
    the unsigned artifact (sign it with `Artifact.signed`).

    Raises what the checks raise (PatchFormatError, ElfError, ModuleMismatch,
    SiteError, AssemblyError, ...), each naming the patchlet and the problem.
    """
    source = Path(source)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{source}: cannot read patch source: {exc.strerror}") from None
    patch = parse_patch(data, str(source))
    text = data.decode("utf-8")  # parse_patch refused anything else
    module = open_module(module_file)
    check_identity(patch, module, str(source))
    planned = plan_patch(patch, module, _elsewhere)
    cave = placeholder_cave(module)
    for p in planned:
        _check_trampoline(patch, p, cave)
    sites = [_facts(patch, p, module) for p in planned]
    filled = patch.model_copy(
        update={
            "patchlets": tuple(
                pl.model_copy(update={"expect": bytes.fromhex(s.original)})
                for pl, s in zip(patch.patchlets, sites, strict=True)
            )
        }
    )
    moment = now or _build_time()
    payload = Payload(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        patch=PatchFacts(
            id=patch.id,
            version=patch.version,
            title=patch.info.title,
            source_name=source.name,
            source=text,
            model=filled.model_dump(mode="json", by_alias=True),
        ),
        module=ModuleFacts(
            name=patch.target.module,
            file=Path(module_file).name,
            build_id=module.identity.build_id,
            sha256=module.identity.sha256,
            pie=module.image.is_pie_or_shared,
        ),
        sites=sites,
        builder=BuilderFacts(name="micropatch", version=__version__, built_at=format_time(moment)),
    )
    return _make(payload, str(source))


def _build_time() -> datetime.datetime:
    # Reproducible builds: the same inputs and SOURCE_DATE_EPOCH give the same id.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
    return utc_now()


def _check_trampoline(patch: Patch, planned: PlannedSite, cave: int) -> None:
    """Build the trampoline once at a placeholder: relocating the displaced
    instructions must work before any process sees the patch."""
    try:
        build_trampoline(
            cave,
            planned.site,
            planned.body_for(cave),  # a stand-in: the engine places the real counter
            resume=planned.resume,
            skip_red_zone=planned.skip_red_zone,
        )
    except MicropatchError as exc:
        raise type(exc)(f"patch {patch.id}, {planned.where}: {exc}") from None


def _provide_compiled_c(payload: Payload) -> None:
    """Hand the C bodies built and signed with the artifact to the body compiler, keyed
    by their source text, before the source is parsed (parsing compiles C bodies)."""
    try:
        tables = tomllib.loads(payload.patch.source).get("patchlet", [])
    except tomllib.TOMLDecodeError:
        return  # parse_patch reports it
    for site in payload.sites:
        if site.c_code is None or site.c_entry is None or site.patchlet >= len(tables):
            continue
        source = tables[site.patchlet].get("c")
        if isinstance(source, str):
            provide_compiled(source, CompiledC(bytes.fromhex(site.c_code), site.c_entry))


def _facts(patch: Patch, planned: PlannedSite, module: ModuleView) -> SiteFacts:
    patchlet = patch.patchlets[planned.index]
    compiled = compile_c(patchlet.c) if patchlet.c is not None else None
    return SiteFacts(
        patchlet=planned.index,
        at=patchlet.at,
        offset=planned.site.address - module.base,
        length=planned.site.length,
        original=planned.site.original.hex(),
        resume=None if planned.resume is None else planned.resume - module.base,
        skip_red_zone=planned.skip_red_zone,
        c_code=compiled.text.hex() if compiled else None,
        c_entry=compiled.entry if compiled else None,
    )


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PLACEHOLDER_BASE",
    "SUFFIX",
    "Artifact",
    "Payload",
    "SiteFacts",
    "Verified",
    "build",
    "canonical_json",
    "check_identity",
    "load",
    "loads",
    "open_module",
    "open_verified",
    "patch_of",
    "placeholder_cave",
    "verify",
]
